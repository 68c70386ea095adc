"""The design card's own loop is safe: no key needed, optax.masked never moves a frozen leaf.

The card, word for word::

    params = lorajax.lorafy(params, rank=8, where=attn_qv)
    tx = optax.masked(optax.adamw(1e-3), lorajax.mask)
    loss = lambda p: loss_fn(model.apply({"params": lorajax.merge(p)}, x))
    export = lorajax.merge(params)

``optax.masked`` hands the unmasked leaves' gradients through as updates, so this is only
safe because ``merge`` and ``factored`` give every frozen leaf an exactly zero gradient.
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lorajax


class CardBlock(nn.Module):
    """SelfAttention + LayerNorm + two Dense layers: untargeted kernels, biases and norms around the targets."""

    @nn.compact
    def __call__(self, x):
        x = x + nn.SelfAttention(num_heads=2, deterministic=True)(nn.LayerNorm()(x))
        h = nn.gelu(nn.Dense(32, name="fc1")(nn.LayerNorm()(x)))
        return x + nn.Dense(16, name="fc2")(h)


def card_setup():
    model = CardBlock()
    x = jax.random.normal(jax.random.key(0), (4, 6, 16))
    y = jax.random.normal(jax.random.key(1), (4, 6, 16))
    params = model.init(jax.random.key(2), x)["params"]
    return model, params, x, y


def run_steps(loss, params, tx, steps=10):
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        value, g = jax.value_and_grad(loss)(p)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s, value

    losses = []
    for _ in range(steps):
        params, state, value = step(params, state)
        losses.append(float(value))
    return params, losses


def moved_and_kept(before, after):
    """Paths of leaves that changed and that stayed bit-identical, with their mask flag."""
    flags = jax.tree_util.tree_flatten_with_path(lorajax.mask(before))[0]
    out = {True: {"moved": [], "kept": []}, False: {"moved": [], "kept": []}}
    for (path, trains), b, a in zip(flags, jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        same = np.array_equal(np.asarray(b), np.asarray(a)) and np.asarray(b).dtype == np.asarray(a).dtype
        out[bool(trains)]["kept" if same else "moved"].append(jax.tree_util.keystr(path))
    return out


@pytest.mark.parametrize("path", ["merge", "factored"])
@pytest.mark.parametrize("mask_form", ["callable", "tree"])
def test_the_card_loop_keeps_every_frozen_leaf_bit_identical(path, mask_form):
    model, params, x, y = card_setup()
    params = lorajax.lorafy(params, rank=8, where=lorajax.attn_qv)  # the card: no key
    mask = lorajax.mask if mask_form == "callable" else lorajax.mask(params)
    tx = optax.masked(optax.adamw(1e-3, weight_decay=0.1), mask)
    if path == "merge":
        loss = lambda p: jnp.mean((model.apply({"params": lorajax.merge(p)}, x) - y) ** 2)
    else:
        apply = lorajax.factored(model.apply)
        loss = lambda p: jnp.mean((apply({"params": p}, x) - y) ** 2)
    trained, losses = run_steps(loss, params, tx)
    assert losses[-1] < losses[0]
    leaves = moved_and_kept(params, trained)
    assert leaves[False]["moved"] == []  # not one frozen leaf moved: bases, untargeted kernels, biases, norms
    assert len(leaves[False]["kept"]) > 10
    assert leaves[True]["kept"] == []  # every factor trained (b starts at zero; a moves once b is nonzero)
    export = lorajax.merge(trained)
    assert jax.tree.structure(export) == jax.tree.structure(card_setup()[1])


@pytest.mark.parametrize("path", ["merge", "factored"])
def test_also_leaves_train_in_both_paths_and_nothing_else_does(path):
    model, params, x, y = card_setup()
    params = lorajax.lorafy(params, rank=4, where=lorajax.attn_qv, also=r".*/bias|.*LayerNorm.*/scale")
    m = lorajax.mask(params)
    assert m["fc1"]["bias"].value and m["LayerNorm_0"]["scale"].value and not m["fc1"]["kernel"]
    tx = optax.masked(optax.adamw(1e-3, weight_decay=0.1), lorajax.mask)
    apply = model.apply if path == "merge" else lorajax.factored(model.apply)
    merge = lorajax.merge if path == "merge" else (lambda p: p)
    loss = lambda p: jnp.mean((apply({"params": merge(p)}, x) - y) ** 2)
    trained, losses = run_steps(loss, params, tx)
    assert losses[-1] < losses[0]
    leaves = moved_and_kept(params, trained)
    assert leaves[False]["moved"] == []
    assert leaves[True]["kept"] == []
    assert any("fc2" in p and "bias" in p for p in leaves[True]["moved"])
    assert any("LayerNorm_1" in p and "scale" in p for p in leaves[True]["moved"])


def test_forgotten_declaration_cannot_silently_train_nothing():
    _, params, _, _ = card_setup()
    params = lorajax.lorafy(params, rank=4, where=lorajax.attn_qv)
    for call in (
        lambda: lorajax.mask(params, also=r".*/bias"),
        lambda: lorajax.masked(optax.adam(1e-3), also=r".*/bias"),
        lambda: lorajax.partition(params, also=r".*/bias"),
        lambda: lorajax.summary(params, also=r".*/bias"),
    ):
        with pytest.raises(TypeError, match=r"also= moved to lorafy\(\.\.\., also=\.\.\.\)"):
            call()


def test_nnx_card_loop_freezes_and_trains_declared_leaves():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=rngs)
            self.norm = nnx.LayerNorm(8, rngs=rngs)
            self.out = nnx.Linear(8, 8, rngs=rngs)

        def __call__(self, x):
            return self.out(self.norm(x + self.attn(x)))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    lora = lorajax.lorafy(state, rank=2, where=lorajax.attn_qv, also=["norm"])
    loss = lambda p: jnp.mean((nnx.merge(graphdef, lorajax.merge(p))(x) - 1.0) ** 2)
    trained, losses = run_steps(loss, lora, optax.masked(optax.adamw(1e-2, weight_decay=0.1), lorajax.mask))
    assert losses[-1] < losses[0]
    leaves = moved_and_kept(lora, trained)
    assert leaves[False]["moved"] == []
    assert leaves[True]["kept"] == []
    assert any("norm" in p for p in leaves[True]["moved"]) and any("out" in p for p in leaves[False]["kept"])


def test_equinox_card_loop_freezes_and_trains_declared_leaves():
    mlp = eqx.nn.MLP(6, 3, 8, depth=2, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (5, 6))
    lora = lorajax.lorafy(mlp, rank=2, where=r"layers/0/weight", also=r"layers/2/bias")
    loss = lambda m: jnp.mean((jax.vmap(lorajax.merge(m))(x) - 1.0) ** 2)
    params, static = eqx.partition(lora, eqx.is_array)
    tx = optax.masked(optax.adamw(1e-2, weight_decay=0.1), lorajax.mask)
    trained, losses = run_steps(lambda p: loss(eqx.combine(p, static)), params, tx)
    assert losses[-1] < losses[0]
    leaves = moved_and_kept(params, trained)
    assert leaves[False]["moved"] == []
    assert leaves[True]["kept"] == []
    assert len(leaves[False]["kept"]) >= 5  # layer-0 base and bias, layers 1 and 2's weights, layer-1 bias


def test_lorafy_without_key_is_deterministic_and_key_changes_the_draw():
    _, params, _, _ = card_setup()
    first = lorajax.lorafy(params, rank=4, where=lorajax.attn_qv)
    second = lorajax.lorafy(params, rank=4, where=lorajax.attn_qv)
    np.testing.assert_array_equal(
        lorajax.adapter(first)["SelfAttention_0/query/kernel"].a,
        lorajax.adapter(second)["SelfAttention_0/query/kernel"].a,
    )
    other = lorajax.lorafy(params, rank=4, where=lorajax.attn_qv, key=jax.random.key(7))
    assert not np.array_equal(
        lorajax.adapter(first)["SelfAttention_0/query/kernel"].a,
        lorajax.adapter(other)["SelfAttention_0/query/kernel"].a,
    )
    default = lorajax.lorafy(params, rank=4, where=lorajax.attn_qv, key=jax.random.key(0))
    np.testing.assert_array_equal(
        lorajax.adapter(first)["SelfAttention_0/value/kernel"].a,
        lorajax.adapter(default)["SelfAttention_0/value/kernel"].a,
    )  # the documented key


def test_merge_check_finite_names_every_non_finite_target():
    _, params, _, _ = card_setup()
    lora = lorajax.lorafy(params, rank=4, where=lorajax.attn_all)
    q, o = lora["SelfAttention_0"]["query"]["kernel"], lora["SelfAttention_0"]["out"]["kernel"]
    lora["SelfAttention_0"]["query"]["kernel"] = q.__class__(q.base, q.a.at[0, 0].set(jnp.nan), q.b + 1.0, q.spec)
    lora["SelfAttention_0"]["out"]["kernel"] = o.__class__(o.base, o.a, o.b.at[0].set(jnp.inf), o.spec)
    with pytest.raises(
        ValueError, match=r"merge: .*\(2 problems\)[\s\S]*out/kernel: 256 of 256[\s\S]*query/kernel: 16 of"
    ):
        lorajax.merge(lora, check_finite=True)
    merged = lorajax.merge(lora)  # without the check, the caller gets what they asked for
    assert not bool(jnp.isfinite(merged["SelfAttention_0"]["query"]["kernel"]).all())
    clean = lorajax.lorafy(params, rank=4, where=lorajax.attn_all)
    lorajax.merge(clean, check_finite=True)  # a finite model passes
