"""lorajax.factored: outputs and LoRA gradients equal the merge path, without forming W."""

from __future__ import annotations

import dataclasses
import re
import warnings

import chex
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import EPS32, assert_within, order_bound, sum_bound
from flax import nnx

import lorajax
from lorajax import FallbackWarning

RTOL, ATOL = 1e-5, 1e-5


def _perturb(params, seed=0):
    """Random non-zero A and B everywhere, so every gradient is non-trivial."""
    leaves, treedef = jax.tree.flatten(params, is_leaf=lorajax.is_lora)
    out = []
    for n, x in enumerate(leaves):
        if lorajax.is_lora(x):
            ka, kb = jax.random.split(jax.random.key(seed + n))
            a = jax.tree.map(lambda v, k=ka: 0.3 * jax.random.normal(k, v.shape, v.dtype), x.a)
            b = jax.tree.map(lambda v, k=kb: 0.3 * jax.random.normal(k, v.shape, v.dtype), x.b)
            x = dataclasses.replace(x, a=a, b=b)
        out.append(x)
    return jax.tree.unflatten(treedef, out)


def check(fn, params, *inputs, n_targets=None):
    """factored(fn) == fn(merge) for outputs and for the gradients of every A and B."""
    if n_targets is not None:
        assert sum(map(lorajax.is_lora, jax.tree.leaves(params, is_leaf=lorajax.is_lora))) == n_targets
    ffn = lorajax.factored(fn)
    trainable, frozen = lorajax.partition(params)

    def loss(path_fn):
        def f(t):
            out = path_fn(lorajax.combine(t, frozen))
            return sum(jnp.sum(jnp.sin(o)) for o in jax.tree.leaves(out)), out

        return jax.jit(jax.grad(f, has_aux=True))

    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        g_f, out_f = loss(lambda p: ffn(p, *inputs))(trainable)
    g_m, out_m = loss(lambda p: fn(lorajax.merge(p), *inputs))(trainable)
    chex.assert_trees_all_close(out_f, out_m, rtol=RTOL, atol=ATOL)
    # Gradients are sums over many elements: compare relative to their scale.
    for gf, gm in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_m)):
        scale = float(jnp.max(jnp.abs(gm))) + 1e-6
        np.testing.assert_allclose(np.asarray(gf) / scale, np.asarray(gm) / scale, rtol=RTOL, atol=10 * ATOL)
    assert jax.tree.leaves(g_f), "no trainable leaves"
    return out_f


def _linen(model, x, where, rank=2, layout=None, seed=0):
    params = model.init(jax.random.key(seed), x)["params"]
    lp = lorajax.lorafy(params, rank=rank, where=where, key=jax.random.key(seed + 1), alpha=3.0, layout=layout)
    return _perturb({"params": lp}, seed)


# --- layer types -----------------------------------------------------------------------------------------------


def test_dense():
    model = nn.Dense(6)
    x = jax.random.normal(jax.random.key(2), (2, 3, 5))
    params = _linen(model, x, r".*kernel")
    check(model.apply, params, x, n_targets=1)


def test_dense_general_qkv_out():
    model = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, deterministic=True)
    x = jax.random.normal(jax.random.key(3), (2, 5, 6))
    params = _linen(model, x, lorajax.attn_all)
    check(lambda p, x: model.apply(p, x, x), params, x, n_targets=4)


def test_einsum():
    model = nn.Einsum((6, 2, 3), "bsd,dhk->bshk")
    x = jax.random.normal(jax.random.key(4), (2, 4, 6))
    params = _linen(model, x, r".*kernel", layout={r".*": "ioo"})
    check(model.apply, params, x, n_targets=1)


@pytest.mark.parametrize(
    "kw",
    [
        dict(kernel_size=(3,), strides=(2,), kernel_dilation=(2,), feature_group_count=2),
        dict(kernel_size=(3, 2), strides=(2, 1), kernel_dilation=(1, 2), padding="VALID"),
        dict(kernel_size=(3, 3), feature_group_count=4, input_dilation=(2, 1), padding=((2, 1), (1, 1))),
    ],
)
def test_conv(kw):
    ndim = len(kw["kernel_size"])
    model = nn.Conv(features=8, name="conv", **kw)
    x = jax.random.normal(jax.random.key(5), (2,) + (9,) * ndim + (4,))
    params = _linen(model, x, r".*kernel", layout={r".*": "w" * ndim + "io"})
    check(model.apply, params, x, n_targets=1)


class _EmbedLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        emb = nn.Embed(11, 6, name="embed")
        h = emb(tokens)
        h = nn.Dense(6)(jnp.tanh(h))
        return emb.attend(h)


def test_embed_lookup_and_attend():
    tokens = jax.random.randint(jax.random.key(6), (2, 5), 0, 11)
    params = _linen(_EmbedLM(), tokens, r".*(embedding|kernel)")
    check(_EmbedLM().apply, params, tokens, n_targets=2)


class _ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.Dense(8, name="fc1")(x)
        return x + nn.Dense(x.shape[-1], name="fc2")(nn.gelu(h)), None


class _Scanned(nn.Module):
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        block = nn.remat(_ScanBlock) if self.remat else _ScanBlock
        stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
        return stack(name="layers")(x, None)[0]


@pytest.mark.parametrize("remat", [False, True])
def test_nn_scan_stacked(remat):
    x = jax.random.normal(jax.random.key(7), (2, 4, 6))
    model = _Scanned(remat=remat)
    params = _linen(model, x, r".*kernel", layout={r".*": "sio"})
    check(model.apply, params, x, n_targets=2)


class _RematMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.remat(nn.Dense)(7, name="up")(x)
        return nn.Dense(5, name="down")(nn.relu(x))


def test_nn_remat():
    x = jax.random.normal(jax.random.key(8), (3, 5))
    params = _linen(_RematMLP(), x, r".*kernel")
    check(_RematMLP().apply, params, x, n_targets=2)


def test_tiny_gpt_all_linear():
    from _models import TinyGPT

    model = TinyGPT(vocab=24, d_model=16, heads=2, layers=1)
    tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 24)
    params = model.init(jax.random.key(0), tokens)["params"]
    lp = _perturb({"params": lorajax.lorafy(params, rank=2, where=lorajax.all_linear, key=jax.random.key(0))})
    check(model.apply, lp, tokens)


class _NNXModel(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(10, 6, rngs=rngs)
        self.fc1 = nnx.Linear(6, 8, rngs=rngs)
        self.conv = nnx.Conv(8, 4, kernel_size=(3,), rngs=rngs)

    def __call__(self, tokens):
        return self.conv(nnx.relu(self.fc1(self.embed(tokens))))


def test_nnx_model():
    graphdef, state = nnx.split(_NNXModel(nnx.Rngs(0)))
    lstate = _perturb(lorajax.lorafy(state, rank=2, where=r".*(kernel|embedding)", key=jax.random.key(1)))
    tokens = jax.random.randint(jax.random.key(2), (2, 5), 0, 10)

    def fn(st, t):
        return nnx.merge(graphdef, st)(t)

    check(fn, lstate, tokens, n_targets=3)


class _EqxModel(eqx.Module):
    lin: eqx.nn.Linear
    conv: eqx.nn.Conv2d

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(3, 4, kernel_size=3, stride=2, key=k1)
        self.lin = eqx.nn.Linear(4 * 3 * 3, 5, key=k2)

    def __call__(self, x):
        return self.lin(jnp.tanh(self.conv(x)).reshape(-1))


def test_equinox_model():
    model = _EqxModel(jax.random.key(0))
    lmodel = _perturb(lorajax.lorafy(model, rank=2, where=r".*weight", key=jax.random.key(1)))
    x = jax.random.normal(jax.random.key(3), (4, 3, 7, 7))
    check(lambda m, x: jax.vmap(m)(x), lmodel, x, n_targets=2)


# --- plain functions: dimension numbers, control flow, transforms --------------------------------------------------


def _node(key, shape, layout, rank=2, alpha=4.0):
    k0, k1, k2 = jax.random.split(key, 3)
    lay = lorajax.Layout(layout)
    return lorajax.LoRA(
        jax.random.normal(k0, shape),
        jax.random.normal(k1, lay.a_shape(shape, rank)),
        jax.random.normal(k2, lay.b_shape(shape, rank)),
        lorajax.LoRASpec(rank, alpha, lay),
    )


@pytest.mark.parametrize(
    "name",
    [
        "kernel_lhs",
        "transpose_weight",
        "batched",
        "reshape_heads",
        "contract_both",
        "bf16_view",
        "outer_stack",
        "expand_squeeze",
        "custom_jvp",
        "index_stacked",
        "slice_columns",
    ],
)
def test_dot_general_forms(name):
    k = jax.random.key(9)
    x = jax.random.normal(jax.random.key(10), (3, 4, 6))
    if name == "kernel_lhs":  # torch-style weight (out, in) @ x.T
        p, fn = _node(k, (5, 6), "oi"), lambda w, x: jnp.einsum("oi,bsi->obs", w, x)
    elif name == "transpose_weight":
        p, fn = _node(k, (5, 6), "oi"), lambda w, x: x @ w.T
    elif name == "batched":  # stacked kernel used as a dot batch dimension
        p, fn = _node(k, (3, 6, 5), "sio"), lambda w, x: jnp.einsum("bsi,bio->bso", x, w)
    elif name == "reshape_heads":  # (d, heads*hd) kernel reshaped to heads
        p, fn = _node(k, (6, 8), "io"), lambda w, x: jnp.einsum("bsi,ihk->bshk", x, w.reshape(6, 2, 4))
    elif name == "contract_both":  # contract over fan-in and fan-out at once
        p, fn = _node(k, (4, 6), "io"), lambda w, x: jnp.einsum("bsi,si->b", x, w)
    elif name == "bf16_view":
        p, fn = (
            _node(k, (6, 5), "io"),
            lambda w, x: (x.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)).astype(jnp.float32),
        )
    elif name == "outer_stack":  # stacked axis left free in the output
        p, fn = _node(k, (2, 6, 5), "sio"), lambda w, x: jnp.einsum("bsi,lio->lbso", x, w)
    elif name == "expand_squeeze":  # broadcast_in_dim / squeeze / size-1 axes between kernel and dot
        p, fn = _node(k, (6, 5), "io"), lambda w, x: jnp.einsum("bsi,zio->bszo", x, jnp.squeeze(w[None, :, None], 2))
    elif name == "index_stacked":  # a Python loop over a stacked kernel: slice + squeeze, dynamic_slice
        p = _node(k, (3, 6, 5), "sio")
        fn = lambda w, x: (
            sum(x @ w[i] for i in range(3))
            + jax.lax.fori_loop(
                0, 3, lambda i, h: h + x @ jax.lax.dynamic_index_in_dim(w, i, keepdims=False), jnp.zeros((3, 4, 5))
            )
        )
    elif name == "slice_columns":  # a fused qkv kernel split by slicing its fan-out
        p = _node(k, (6, 9), "io")
        fn = lambda w, x: (x @ w[:, :3]) * (x @ w[:, 3:6]) + x @ w[:, 6::2] @ jnp.ones((2, 3))
    else:

        @jax.custom_jvp
        def mm(x, w):
            return x @ w

        mm.defjvp(lambda primals, tangents: (mm(*primals), tangents[0] @ primals[1] + primals[0] @ tangents[1]))
        p, fn = _node(k, (6, 5), "io"), lambda w, x: jnp.tanh(mm(x, w))
    out = lorajax.factored(fn)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        got = out(p, x)
    want = fn(lorajax.merge(p), x)
    tol = 2e-2 if name == "bf16_view" else RTOL
    chex.assert_trees_all_close(got, want, rtol=tol, atol=tol)
    if name != "bf16_view":
        check(fn, p, x)


def test_control_flow_scan_cond_while_checkpoint():
    w = _node(jax.random.key(11), (6, 6), "io")
    ws = _node(jax.random.key(12), (3, 6, 6), "sio")

    def fn(p, x):
        def step(h, wl):
            return jnp.tanh(h @ wl + h @ p["w"]), h.sum()

        h, ys = jax.lax.scan(step, x, p["ws"])
        h = jax.checkpoint(lambda h: jnp.sin(h @ p["w"]))(h)
        h = jax.lax.cond(h.sum() > 0, lambda h: h @ p["w"], lambda h: -(h @ p["w"]), h)
        return h, ys

    x = jax.random.normal(jax.random.key(13), (2, 6))
    check(fn, {"w": w, "ws": ws}, x)


def test_while_loop():
    # Forward only: reverse-mode AD does not go through a while_loop with a dynamic trip count.
    p = {"w": _node(jax.random.key(11), (6, 6), "io")}

    def fn(p, x):
        return jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, jnp.tanh(c[1] @ p["w"])), (0, x))[1]

    x = jax.random.normal(jax.random.key(13), (2, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        got = lorajax.factored(fn)(p, x)
    chex.assert_trees_all_close(got, fn(lorajax.merge(p), x), rtol=RTOL, atol=ATOL)


def test_under_jit_vmap_value_and_grad():
    p = {"w": _node(jax.random.key(14), (6, 4), "io")}
    fn = lambda p, x: jnp.tanh(x @ p["w"])
    x = jax.random.normal(jax.random.key(15), (5, 6))
    ffn = lorajax.factored(fn)
    got = jax.jit(jax.vmap(ffn, in_axes=(None, 0)))(p, x)
    chex.assert_trees_all_close(got, fn(lorajax.merge(p), x), rtol=RTOL, atol=ATOL)
    t, f = lorajax.partition(p)
    v1, g1 = jax.value_and_grad(lambda t: ffn(lorajax.combine(t, f), x).sum())(t)
    v2, g2 = jax.value_and_grad(lambda t: fn(lorajax.merge(lorajax.combine(t, f)), x).sum())(t)
    chex.assert_trees_all_close((v1, g1), (v2, g2), rtol=RTOL, atol=ATOL)


def test_base_gets_no_gradient():
    p = {"w": _node(jax.random.key(16), (6, 4), "io")}
    g = jax.grad(lambda p: lorajax.factored(lambda p, x: (x @ p["w"]).sum())(p, jnp.ones((2, 6))))(p)
    assert not jnp.any(g["w"].base)
    assert jnp.any(g["w"].a)


# --- fallback, strict, no-W proof ---------------------------------------------------------------------------------


def test_forced_fallback_warns_and_stays_correct():
    p = {"w": _node(jax.random.key(17), (6, 4), "io")}
    fn = lambda p, x: x @ jnp.cos(p["w"]) + x @ p["w"]  # cos(W) cannot be factored
    x = jax.random.normal(jax.random.key(18), (3, 6))
    with pytest.warns(FallbackWarning, match=r"'w'.*`cos`"):
        got = lorajax.factored(fn)(p, x)
    chex.assert_trees_all_close(got, fn(lorajax.merge(p), x), rtol=RTOL, atol=ATOL)
    t, f = lorajax.partition(p)
    with pytest.warns(FallbackWarning):
        g1 = jax.grad(lambda t: lorajax.factored(fn)(lorajax.combine(t, f), x).sum())(t)
    g2 = jax.grad(lambda t: fn(lorajax.merge(lorajax.combine(t, f)), x).sum())(t)
    chex.assert_trees_all_close(g1, g2, rtol=RTOL, atol=ATOL)


def test_strict_raises():
    p = {"w": _node(jax.random.key(17), (6, 4), "io")}
    with pytest.raises(ValueError, match=r"'w'.*`cos`.*strict=True"):
        lorajax.factored(lambda p, x: x @ jnp.cos(p["w"]), strict=True)(p, jnp.ones((3, 6)))


def test_grad_step_forms_no_full_kernel():
    from _jaxprs import computed_shapes
    from _models import tiny_gpt

    model, params, tokens = tiny_gpt(d_model=24, batch=2, seq=5, vocab=40)
    lp = {"params": lorajax.lorafy(params, rank=2, where=lorajax.all_linear, key=jax.random.key(0))}
    t, f = lorajax.partition(lp)
    kernel_shapes = {n.shape for n in jax.tree.leaves(lp, is_leaf=lorajax.is_lora) if lorajax.is_lora(n)}
    kernel_shapes |= {s[1:] + s[:1] for s in kernel_shapes} | {s[::-1] for s in kernel_shapes}  # any orientation
    kernel_shapes |= {(s[0], s[1] * s[2]) for s in list(kernel_shapes) if len(s) == 3}
    kernel_shapes |= {(s[0] * s[1], s[2]) for s in list(kernel_shapes) if len(s) == 3}

    def step(apply):
        return jax.make_jaxpr(jax.grad(lambda t: apply(lorajax.combine(t, f), tokens).mean()))(t)

    fac = computed_shapes(step(lorajax.factored(model.apply)).jaxpr, only="dot_general")
    mer = computed_shapes(step(lambda p, x: model.apply(lorajax.merge(p), x)).jaxpr, only="dot_general")
    assert any(s in kernel_shapes for s in mer), "the check must be able to see dW in the merge path"
    assert fac and not [s for s in fac if s in kernel_shapes]


# --- dropout, retracing, per-example -------------------------------------------------------------------------------


def test_dropout_deterministic_and_active():
    p = {"w": _node(jax.random.key(19), (6, 4), "io")}
    fn = lambda p, x: x @ p["w"]
    x = jax.random.normal(jax.random.key(20), (8, 6))
    ffn = lorajax.factored(fn, dropout=0.5)
    want = fn(lorajax.merge(p), x)
    chex.assert_trees_all_close(ffn(p, x, lora_deterministic=True), want, rtol=RTOL, atol=ATOL)
    d1 = ffn(p, x, lora_rng=jax.random.key(0))
    d2 = ffn(p, x, lora_rng=jax.random.key(1))
    assert not np.allclose(d1, want, atol=1e-3) and not np.allclose(d1, d2, atol=1e-3)
    # The base path is untouched by dropout: only the LoRA term changes.
    base = x @ p["w"].base
    lora = (x @ p["w"].a) @ p["w"].b * p["w"].scale
    resid = np.asarray(d1 - base)
    assert np.abs(resid).max() > 0 and not np.allclose(resid, lora, atol=1e-3)
    with pytest.raises(ValueError, match="lora_rng"):
        ffn(p, x)
    with pytest.raises(ValueError, match=r"dropout=1\.5"):
        lorajax.factored(fn, dropout=1.5)


def test_compiles_once_per_structure():
    model = nn.Dense(4)
    x = jnp.ones((2, 3))
    params = _linen(model, x, r".*kernel")
    apply = lorajax.factored(chex.assert_max_traces(lambda p, x: model.apply(p, x), n=1))
    a = apply(params, x)
    b = apply(jax.tree.map(lambda v: v + 1.0, params), x + 1.0)
    assert a.shape == b.shape and len(apply.cache) == 1
    chex.clear_trace_counter()


def test_per_example_dense_and_gather():
    n, d, o, r, vocab = 3, 6, 5, 2, 9
    k = jax.random.split(jax.random.key(21), 6)
    a = jax.random.normal(k[0], (n, d, r))
    b = jax.random.normal(k[1], (n, r, o))
    w = lorajax.LoRA(
        jax.random.normal(k[2], (d, o)), a, b, lorajax.LoRASpec(r, float(r), lorajax.Layout("io")), per_example=True
    )
    ea = jax.random.normal(k[3], (n, vocab, r))
    eb = jax.random.normal(k[4], (n, r, d))
    e = lorajax.LoRA(
        jax.random.normal(k[5], (vocab, d)),
        ea,
        eb,
        lorajax.LoRASpec(r, float(r), lorajax.Layout("eo")),
        per_example=True,
    )
    tokens = jax.random.randint(jax.random.key(22), (n, 4), 0, vocab)

    def fn(p, t):
        h = jnp.take(p["e"], t, axis=0)
        return h @ p["w"]

    got = lorajax.factored(fn, strict=True)({"w": w, "e": e}, tokens)
    want = []
    for i in range(n):
        we = e.base + ea[i] @ eb[i]
        ww = w.base + a[i] @ b[i]
        want.append(we[tokens[i]] @ ww)
    chex.assert_trees_all_close(got, jnp.stack(want), rtol=1e-5, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)  # an error, not a warning followed by an error
        with pytest.raises(ValueError, match=r"'w'.*`cos`.*per-example"):
            lorajax.factored(lambda p, x: x @ jnp.cos(p["w"]))({"w": w}, jnp.ones((n, d)))


@pytest.mark.parametrize("fuse,flatten", [(True, True), (False, True), (True, False)])
def test_sibling_fusion_and_flatten_options(fuse, flatten):
    keys = jax.random.split(jax.random.key(23), 3)
    p = {n: _node(k, (6, 2, 4), "ioo", rank=r) for n, k, r in zip("qkv", keys, (2, 3, 2))}

    def fn(p, x):
        q, k, v = (jnp.einsum("bsd,dhk->bshk", x, p[n]) for n in "qkv")
        return jnp.einsum("bshk,bthk->bhst", q, k), v

    x = jax.random.normal(jax.random.key(24), (2, 5, 6))
    ffn = lorajax.factored(fn, fuse=fuse, flatten=flatten, strict=True)
    chex.assert_trees_all_close(ffn(p, x), fn(lorajax.merge(p), x), rtol=RTOL, atol=1e-4)
    n_dots = str(jax.make_jaxpr(ffn)(p, x)).count("dot_general")
    # 3 base dots + 1 score dot + second factors (3) + first factors (1 fused, or 3)
    assert n_dots == (8 if fuse and flatten else 10)


def test_per_example_stacked_in_scan():
    n, layers, d, r = 3, 2, 5, 2
    k = jax.random.split(jax.random.key(25), 3)
    a = jax.random.normal(k[0], (n, layers, d, r))
    b = jax.random.normal(k[1], (n, layers, r, d))
    base = jax.random.normal(k[2], (layers, d, d))
    w = lorajax.LoRA(base, a, b, lorajax.LoRASpec(r, float(r), lorajax.Layout("sio")), per_example=True)
    x = jax.random.normal(jax.random.key(26), (n, 4, d))

    def fn(w, x):
        return jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w)[0]

    got = lorajax.factored(fn, strict=True)(w, x)
    want = []
    for i in range(n):
        h = x[i]
        for layer in range(layers):
            h = jnp.tanh(h @ (base[layer] + a[i, layer] @ b[i, layer]))
        want.append(h)
    chex.assert_trees_all_close(got, jnp.stack(want), rtol=1e-5, atol=1e-5)


# --- trace cache, warnings, frozen leaves --------------------------------------------------------------------------


@dataclasses.dataclass
class _Config:
    """A mutable config: eq=True without frozen=True makes it unhashable, and it is a leaf of the arguments."""

    power: int


def test_unhashable_static_argument_is_keyed_by_value():
    """Guards against a stale trace for an unhashable static argument (a silently wrong result).

    The old cache keyed such an argument by ``id(x)``: a config mutated in place (same id) reused
    the trace made for the old value (the first loop fails on that code), a freed config's id could
    be recycled by a new one, and equal fresh configs each added a trace. The cache now compares the
    value with a copy taken when the trace was made.
    """
    p = {"w": _node(jax.random.key(30), (6, 4), "io")}
    fn = lambda p, cfg, x: (x @ p["w"]) ** cfg.power
    x = jax.random.normal(jax.random.key(31), (3, 6))
    ffn = lorajax.factored(fn)
    cfg = _Config(1)
    for power in (1, 2, 3):
        cfg.power = power  # in place: the id stays the same
        chex.assert_trees_all_close(ffn(p, cfg, x), fn(lorajax.merge(p), cfg, x), rtol=RTOL, atol=ATOL)
    for power in (2, 1, 2, 3, 1):  # fresh objects, freed after each call: ids get recycled
        got = ffn(p, _Config(power), x)
        chex.assert_trees_all_close(got, fn(lorajax.merge(p), _Config(power), x), rtol=RTOL, atol=ATOL)
    assert len(ffn.cache) == 3  # equal configs share a trace


def test_trace_cache_is_bounded():
    p = {"w": _node(jax.random.key(32), (6, 4), "io")}
    fn = lambda p, n, x: (x @ p["w"]) * n
    ffn = lorajax.factored(fn)
    x = jnp.ones((2, 6))
    for n in range(100):  # make_jaxpr traces without compiling: each n is one cache entry
        jax.make_jaxpr(lambda x, n=n: ffn(p, n, x))(x)
    assert 0 < len(ffn.cache) < 100
    chex.assert_trees_all_close(ffn(p, 99, x), fn(lorajax.merge(p), 99, x), rtol=RTOL, atol=ATOL)


def test_fallback_warns_once_per_primitive_and_path():
    p = {"w": _node(jax.random.key(33), (6, 6), "io"), "v": _node(jax.random.key(34), (6, 6), "io")}

    def fn(p, x):
        w = p["w"]
        h = x @ jnp.cos(w) + x @ jnp.cos(w)  # two uses of cos on one kernel
        h = h + jnp.sum(w * w)  # one use, the kernel on both sides
        h = jax.lax.cond(h.sum() > 0, lambda h: h @ jnp.cos(w), lambda h: h @ jnp.cos(w), h)  # one per branch
        return h + x @ jnp.cos(p["v"])  # another path: its own warning

    x = jax.random.normal(jax.random.key(35), (3, 6))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = lorajax.factored(fn)(p, x)
    assert all(issubclass(w.category, FallbackWarning) for w in caught)
    sites = sorted(re.search(r"kernel '(\w+)' .* reaches `(\w+)`", str(w.message)).groups() for w in caught)
    assert sites == [("v", "cos"), ("w", "cos"), ("w", "mul")], sites
    chex.assert_trees_all_close(got, fn(lorajax.merge(p), x), rtol=RTOL, atol=ATOL)


def test_frozen_leaves_get_zero_gradient_and_trainable_leaves_train():
    params = {
        "w": _node(jax.random.key(36), (6, 4), "io"),
        "bias": jnp.full((4,), 0.5),
        "tbias": jnp.full((4,), 0.25),
    }
    params = lorajax.trainable(params, r"tbias")
    assert isinstance(params["tbias"], lorajax.Trainable)

    def fn(p, x):  # the user's function sees a plain tree
        assert not isinstance(p["tbias"], lorajax.Trainable)
        return jnp.sum(jnp.tanh(x @ p["w"] + p["bias"] + p["tbias"]) ** 2)

    x = jax.random.normal(jax.random.key(37), (3, 6))
    g_f, gx_f = jax.grad(lorajax.factored(fn), argnums=(0, 1))(params, x)
    g_m, gx_m = jax.grad(lambda p, x: fn(lorajax.merge(p), x), argnums=(0, 1))(params, x)
    assert not np.any(np.asarray(g_f["bias"])), "a frozen leaf must get exactly zero gradient"
    assert not np.any(np.asarray(g_f["w"].base))
    assert np.all(np.asarray(g_f["tbias"].value) != 0)
    chex.assert_trees_all_close(g_f, g_m, rtol=RTOL, atol=ATOL)
    # Inputs hold no lorajax nodes: they are not frozen.
    assert np.any(np.asarray(gx_f))
    chex.assert_trees_all_close(gx_f, gx_m, rtol=RTOL, atol=ATOL)


def test_fast_weight_grads_equal_autodiff_and_can_be_turned_off_for_forward_mode():
    """The rank-major custom VJP gives autodiff's gradients; with it off, forward mode works through factored."""
    params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (16, 8))}}
    lp = lorajax.lorafy(params, rank=4, where=["dense"], key=jax.random.key(1))
    lp["dense"]["kernel"] = dataclasses.replace(lp["dense"]["kernel"], b=jax.random.normal(jax.random.key(2), (4, 8)))
    x = jax.random.normal(jax.random.key(3), (5, 16))
    fn = lambda p, x: jnp.tanh(x @ p["dense"]["kernel"]).sum()
    fast = jax.grad(lorajax.factored(fn))(lp, x)
    plain = jax.grad(lorajax.factored(fn, fast_weight_grads=False))(lp, x)
    reference = jax.grad(lambda p, x: fn(lorajax.merge(p), x))(lp, x)
    # Tolerances from error analysis (tests/_tolerances.py), not from one CPU: the three gradients sum the same
    # terms in different orders. Exact values in float64: z = x (W + s a b), g = 1 - tanh(z)^2,
    # da = s x^T g b^T, db = s a^T x^T g.
    node = lp["dense"]["kernel"]
    w, a, b, s = (np.asarray(v, np.float64) for v in (node.base, node.a, node.b, node.scale))
    x64 = np.asarray(x, np.float64)
    g = 1 - np.tanh(x64 @ (w + s * a @ b)) ** 2
    da, db = s * x64.T @ g @ b.T, s * a.T @ x64.T @ g
    abs_da, abs_db = s * abs(x64).T @ g @ abs(b).T, s * abs(a).T @ abs(x64).T @ g  # |g| = g
    for name, got in (("fast", fast), ("plain", plain), ("merge", reference)):
        assert not np.any(np.asarray(got["dense"]["kernel"].base)), f"{name}: the base is frozen"
    # fast and plain share the forward pass; only the order of the factor gradients' sums differs.
    assert_within(fast["dense"]["kernel"].a, plain["dense"]["kernel"].a, order_bound(abs_da, 5 + 8), "da fast/plain")
    assert_within(fast["dense"]["kernel"].b, plain["dense"]["kernel"].b, order_bound(abs_db, 16 + 5), "db fast/plain")
    # Against float64: the forward pass's error |dz| <= gamma(16 + 4 + 1) |x| (|W| + s |a| |b|) reaches g through
    # |d g / d z| = |2 tanh(z) (1 - tanh(z)^2)| <= 0.77 < 1, plus tanh's own few ulps (8 eps: |g| <= 1).
    dg = sum_bound(abs(x64) @ (abs(w) + s * abs(a) @ abs(b)), 16 + 4 + 1) + 8 * EPS32
    bound_a = s * abs(x64).T @ dg @ abs(b).T + sum_bound(abs_da, 5 + 8 + 1)
    bound_b = s * abs(a).T @ abs(x64).T @ dg + sum_bound(abs_db, 16 + 5 + 1)
    for name, got in (("fast", fast), ("plain", plain), ("merge", reference)):
        assert_within(got["dense"]["kernel"].a, da, bound_a, f"da {name} vs float64")
        assert_within(got["dense"]["kernel"].b, db, bound_b, f"db {name} vs float64")
    tangent = jnp.ones_like(x)
    _, jvp = jax.jvp(lambda x: lorajax.factored(fn, fast_weight_grads=False)(lp, x), (x,), (tangent,))
    _, jvp_ref = jax.jvp(lambda x: fn(lorajax.merge(lp), x), (x,), (tangent,))
    np.testing.assert_allclose(jvp, jvp_ref, rtol=1e-5)
