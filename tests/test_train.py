"""mask, masked, partition and combine: only the factors (and chosen extras) ever train."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _models import lm_loss, tiny_gpt
from _tolerances import assert_within, order_bound

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
    # The independent reference: the chain rule through merge, W + s a b, from the merged kernel's gradient G
    # (a plain dense backward pass): grad a = s G b.T, grad b = s a.T G, in float64 from float32 G. Both programs
    # compute G by that same backward pass and differ from this only in the order of the last product (length
    # fan-in for grad b, fan-out for grad a): order_bound of s |G| |b|.T, s |a|.T |G|.
    g_dense = jax.jit(jax.grad(lambda w: lm_loss(model.apply({"params": w}, tokens), tokens)))(lorajax.merge(params))
    is_lora = lorajax.is_lora
    nodes = jax.tree.leaves(params, is_leaf=is_lora)
    dense = jax.tree.leaves(jax.tree.map(lambda n, g: g if is_lora(n) else None, params, g_dense, is_leaf=is_lora))
    full = jax.tree.leaves(lorajax.partition(g_full)[0], is_leaf=is_lora)
    part = jax.tree.leaves(g_part, is_leaf=is_lora)
    lora = [n for n in nodes if is_lora(n)]
    assert len(lora) == len(dense) == len(full) == len(part) == 4
    for n, g, gf, gp in zip(lora, dense, full, part, strict=True):
        a, b = np.asarray(n.a, np.float64), np.asarray(n.b, np.float64).reshape(n.b.shape[0], -1)
        g, s = np.asarray(g, np.float64).reshape(a.shape[0], -1), float(n.scale)
        want_a, bound_a = s * g @ b.T, order_bound(s * abs(g) @ abs(b).T, b.shape[1])
        want_b, bound_b = (s * a.T @ g).reshape(n.b.shape), order_bound(s * abs(a).T @ abs(g), a.shape[0])
        for what, got in (("partition", gp), ("merge", gf)):
            assert_within(got.a, want_a, bound_a, f"{what} grad a")
            assert_within(got.b, want_b, bound_b.reshape(n.b.shape), f"{what} grad b")
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
