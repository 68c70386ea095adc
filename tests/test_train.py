"""mask, masked, partition and combine: only the factors (and chosen extras) ever train."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _models import lm_loss, tiny_gpt

import lorajax


def lorafied_gpt(where=lorajax.attn_qv):
    model, params, tokens = tiny_gpt()
    return model, lorajax.lorafy(params, rank=4, where=where, key=jax.random.key(1)), tokens


def count(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


def test_ten_masked_adam_steps_lower_loss_and_freeze_everything_else():
    model, params, tokens = lorafied_gpt()
    tx = lorajax.masked(optax.adam(1e-2))
    opt_state = tx.init(params)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(lambda p: lm_loss(model.apply({"params": lorajax.merge(p)}, tokens), tokens))(p)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    start = params
    losses = []
    for _ in range(10):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05
    flags = jax.tree.leaves(lorajax.mask(start))
    for trains, before, after in zip(flags, jax.tree.leaves(start), jax.tree.leaves(params), strict=True):
        if not trains:
            np.testing.assert_array_equal(before, after)  # bitwise: frozen leaves never move
    trainable = count(lorajax.partition(start)[0])
    assert trainable == lorajax.summary(start).trainable
    assert count(opt_state) <= 2 * trainable + 1  # Adam's mu and nu (and a step count): nothing for frozen leaves


def test_plain_optax_masked_lets_frozen_gradients_through_but_ours_does_not():
    """The trap the README warns about, shown, and the safe one-liner."""
    _, params, _ = lorafied_gpt()
    grads = jax.tree.map(jnp.ones_like, params)
    trap = optax.masked(optax.sgd(1.0), lorajax.mask)
    updates, _ = trap.update(grads, trap.init(params), params)
    kernel = lambda t: t["Block_0"]["SelfAttention_0"]["query"]["kernel"]
    assert float(jnp.abs(kernel(updates).base).sum()) > 0  # optax.masked passes the frozen gradient through
    safe = lorajax.masked(optax.sgd(1.0))
    updates, _ = safe.update(grads, safe.init(params), params)
    chex.assert_trees_all_equal(kernel(updates).base, jnp.zeros_like(kernel(params).base))
    np.testing.assert_array_equal(kernel(updates).a, -1.0)
    assert float(jnp.abs(updates["lm_head"]["kernel"]).sum()) == 0


def test_also_trains_chosen_extra_leaves():
    _, params, _ = lorafied_gpt()
    m = lorajax.mask(lorajax.trainable(params, r".*/bias|lm_head/.*"))
    assert m["lm_head"]["kernel"].value and m["Block_0"]["fc1"]["bias"].value
    assert not m["Block_0"]["fc1"]["kernel"] and not m["Block_0"]["LayerNorm_0"]["scale"]
    model, params, _ = tiny_gpt()
    params = lorajax.lorafy(params, rank=4, where=lorajax.attn_qv, key=jax.random.key(1), also=["lm_head"])
    tx = lorajax.masked(optax.sgd(1.0))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["lm_head"]["kernel"].value, -1.0)
    # A module-name list picks the whole module (PEFT's modules_to_save), bias included.
    np.testing.assert_array_equal(updates["lm_head"]["bias"].value, -1.0)
    assert float(jnp.abs(updates["Block_0"]["fc1"]["bias"]).sum()) == 0


def test_partition_grad_matches_merge_grad_and_forms_no_base_gradient():
    model, params, tokens = lorafied_gpt()
    trainable, frozen = lorajax.partition(params)
    assert all(x is not None for x in jax.tree.leaves(trainable))
    loss = lambda p: lm_loss(model.apply({"params": lorajax.merge(p)}, tokens), tokens)
    g_part = jax.jit(jax.grad(lambda t: loss(lorajax.combine(t, frozen))))(trainable)
    g_full = jax.jit(jax.grad(loss))(params)
    chex.assert_trees_all_close(g_part, lorajax.partition(g_full)[0], rtol=1e-6, atol=1e-7)
    assert count(g_part) == lorajax.summary(params).trainable  # no base-sized gradient leaf exists


def test_combine_round_trip_is_identity():
    _, params, _ = lorafied_gpt(lorajax.all_linear)
    t, f = lorajax.partition(lorajax.trainable(params, r".*/bias"))
    rebuilt = lorajax.combine(t, f)
    assert jax.tree.structure(rebuilt) == jax.tree.structure(lorajax.trainable(params, r".*/bias"))
    for a, b in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(params), strict=True):
        assert a is b


def test_masked_compiles_once():
    _, params, _ = lorafied_gpt()
    tx = lorajax.masked(optax.adam(1e-3))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def update(g, s, p):
        return tx.update(g, s, p)

    state = tx.init(params)
    for scale in (1.0, 2.0):
        update(jax.tree.map(lambda x: scale * jnp.ones_like(x), params), state, params)
    chex.clear_trace_counter()


def test_mask_rejects_nothing_silently():
    _, params, _ = lorafied_gpt()
    with pytest.raises(TypeError, match="where must be a preset"):
        lorajax.trainable(params, 3)
