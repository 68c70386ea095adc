"""QDoRA (DoRA on a quantized base) through ``lorajax.factored``: the column norms come from the kernel each forward
product dequantizes anyway, so a QDoRA training step dequantizes each kernel as often as a QLoRA step (forward and
backward), not a third time; and its numbers are DoRA's on the dequantized kernel.

The dequantizations are counted in the step's jaxpr as lookups in the 16-entry NF4 codebook (one ``gather`` from a
``(16,)`` operand per dequantized kernel).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _jaxprs import equations
from test_dora import dense_dora

import lorajax


def nf4_lookups(jaxpr) -> int:
    """Gathers from the 16-entry NF4 codebook in ``jaxpr`` and its sub-jaxprs: one per dequantized NF4 kernel."""
    return sum(e.primitive.name == "gather" and tuple(e.invars[0].aval.shape) == (16,) for e in equations(jaxpr))


def mlp(p, x):
    return jnp.tanh(x @ p["fc1"]["kernel"]) @ p["fc2"]["kernel"]


def _params(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    w = {"fc1": {"kernel": rng.standard_normal((64, 32)) / 8}, "fc2": {"kernel": rng.standard_normal((32, 16)) / 6}}
    w = jax.tree.map(lambda v: jnp.asarray(v, dtype), w)
    return lorajax.quantize(w, where=["fc1", "fc2"], dtype="nf4", block_size=32, double_quant=True)


def _trained(q, dora: bool, where=("fc1", "fc2")):
    """Factors and magnitudes moved off their init, so every term of the norms counts; (trained, frozen)."""
    p = lorajax.lorafy(q, rank=4, where=list(where), dora=dora, key=jax.random.key(0), init="gaussian")
    t, frozen = lorajax.partition(p)
    t = jax.tree.map(lambda v: v + 0.1 * jnp.cos(jnp.arange(v.size, dtype=v.dtype).reshape(v.shape)), t)
    return t, frozen


def _step_lookups(dora: bool, fast: bool) -> int:
    t, frozen = _trained(_params(), dora)
    fac = lorajax.factored(mlp, fast_weight_grads=fast)
    x = jnp.ones((8, 64))
    loss = lambda t: jnp.sum(fac(lorajax.combine(t, frozen), x) ** 2)
    return nf4_lookups(jax.make_jaxpr(jax.jit(jax.value_and_grad(loss)))(t).jaxpr)


@pytest.mark.parametrize("fast", [True, False], ids=["custom_vjp", "checkpoint"])
def test_a_qdora_step_dequantizes_each_kernel_as_often_as_a_qlora_step(fast):
    qlora, qdora = _step_lookups(False, fast), _step_lookups(True, fast)
    if fast:
        assert qlora == 3  # two kernels forward, and fc2 going back (fc1's input needs no gradient)
    assert qdora == qlora, f"QDoRA dequantizes {qdora} times per step, QLoRA {qlora}"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_qdora_forward_and_gradients_are_dora_on_the_dequantized_kernel(dtype):
    q = _params(dtype)
    t, frozen = _trained(q, True)
    dq = lorajax.dequantize(q)  # the kernels in their own dtype: what the products read
    x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 64)), jnp.float32)
    fac = lorajax.factored(mlp, strict=True)

    def reference(t):  # the dense DoRA kernel (norm detached) on the dequantized kernels, float32 autodiff
        ks = {}
        for name in ("fc1", "fc2"):
            w = dq[name]["kernel"].astype(jnp.float32)
            node = t[name]["kernel"]
            v = w + frozen[name]["kernel"].scale * node.a @ node.b
            n = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(v * v, axis=0)))
            ks[name] = {"kernel": node.magnitude / n * v}
        return ks

    loss_f = lambda t: jnp.sum(fac(lorajax.combine(t, frozen), x) ** 2)
    loss_r = lambda t: jnp.sum(mlp(reference(t), x) ** 2)
    # The forward against float64 numpy (an independent computation of the same formula).
    ks = {}
    for name in ("fc1", "fc2"):
        node = t[name]["kernel"]
        m = np.asarray(node.magnitude)
        ks[name] = dense_dora(np.asarray(dq[name]["kernel"].astype(jnp.float32)), node.a, node.b, m, 1.0, (0,))
    ks = {k: {"kernel": v} for k, v in ks.items()}
    want = np.tanh(np.asarray(x, np.float64) @ ks["fc1"]["kernel"]) @ ks["fc2"]["kernel"]
    np.testing.assert_allclose(fac(lorajax.combine(t, frozen), x), want, rtol=1e-4, atol=1e-5)
    (lf, gf), (lr, gr) = jax.value_and_grad(loss_f)(t), jax.value_and_grad(loss_r)(t)
    np.testing.assert_allclose(lf, lr, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(gr)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))
    # merge reads the same kernel (dequantized in float32; for bf16 kernels that differs by rounding only)
    merged = lorajax.merge(lorajax.combine(t, frozen))
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(mlp(merged, x), want, rtol=tol, atol=tol)


def test_qdora_kernels_formed_for_an_unfactored_use_take_the_norms_of_what_they_form():
    t, frozen = _trained(_params(), True)
    p = lorajax.combine(t, frozen)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((8, 64)), jnp.float32)
    twice = lambda p, x: mlp({k: {"kernel": 2.0 * v["kernel"]} for k, v in p.items()}, x)  # `mul` forms W
    with pytest.warns(lorajax.FallbackWarning):
        got = lorajax.factored(twice)(p, x)
    np.testing.assert_allclose(got, twice(lorajax.merge(p), x), rtol=1e-5, atol=1e-5)


def _assert_factored_equals_merge(model, t, frozen, x):
    """Loss and gradients through ``factored(strict=True)`` against the merged model's (float32 sums of a few hundred
    terms: loss to 1e-5, gradients to 1e-4 or 1e-5 of the largest entry)."""
    loss_f = lambda t: jnp.sum(lorajax.factored(model, strict=True)(lorajax.combine(t, frozen), x) ** 2)
    loss_m = lambda t: jnp.sum(model(lorajax.merge(lorajax.combine(t, frozen)), x) ** 2)
    (lf, gf), (lm, gm) = jax.value_and_grad(loss_f)(t), jax.value_and_grad(loss_m)(t)
    np.testing.assert_allclose(lf, lm, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(gm)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_qdora_through_an_embedding_lookup_and_a_scan_equals_merge():
    rng = np.random.default_rng(3)
    w = {"emb": {"embedding": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)}}
    w["layers"] = {"kernel": jnp.asarray(rng.standard_normal((2, 32, 32)) / 6, jnp.float32)}
    q = lorajax.quantize(w, where=["emb", "layers"], dtype="nf4", block_size=32, layout={"layers/kernel": "sio"})

    def model(p, ids):
        h = p["emb"]["embedding"][ids]
        h, _ = jax.lax.scan(lambda h, k: (jnp.tanh(h @ k), None), h, p["layers"]["kernel"])
        return h

    t, frozen = _trained(q, True, ["emb", "layers"])
    ids = jnp.array([[1, 5, 9], [63, 0, 2]])
    _assert_factored_equals_merge(model, t, frozen, ids)
    # one lookup per layer forward (scanned: one in the loop body) and back, none for the norms
    fac = lorajax.factored(model, strict=True)
    n = lambda dora_t, fz: nf4_lookups(
        jax.make_jaxpr(jax.grad(lambda t: jnp.sum(fac(lorajax.combine(t, fz), ids) ** 2)))(dora_t).jaxpr
    )
    plain_t, plain_f = lorajax.partition(lorajax.lorafy(q, rank=4, where=["emb", "layers"], key=jax.random.key(0)))
    assert n(t, frozen) == n(plain_t, plain_f) + 1  # the embedding's norms read its dense view (one lookup more)


@pytest.mark.parametrize(
    "form",
    [
        "rows_of_a_3d_batch",
        "more_rows_than_one_pass_repays",  # aᵀW then keeps its own matmul
        "kernel_on_the_left",
        "fan_out_split_into_heads",
        "heads_merged_into_fan_out",
    ],
)
def test_qdora_products_of_every_shape_equal_merge(form):
    """aᵀW shares the forward product's matmul (r more rows, on one device): every layout of that product keeps DoRA's
    values and gradients (against the merged model, which forms each kernel)."""
    rng = np.random.default_rng(4)
    shapes = {"fan_out_split_into_heads": (32, 4, 8), "heads_merged_into_fan_out": (4, 8, 32)}
    layouts = {"fan_out_split_into_heads": "ioo", "heads_merged_into_fan_out": "iio"}
    shape = shapes.get(form, (32, 24))
    w = {"k": {"kernel": jnp.asarray(rng.standard_normal(shape) / 6, jnp.float32)}}
    q = lorajax.quantize(w, where=["k"], dtype="nf4", block_size=32, layout={"k/kernel": layouts.get(form, "io")})
    products = {
        "rows_of_a_3d_batch": lambda k, x: x @ k,
        "more_rows_than_one_pass_repays": lambda k, x: jnp.tile(x, (20, 1, 1)) @ k,
        "kernel_on_the_left": lambda k, x: jnp.einsum("df,bsd->fbs", k, x),
        "fan_out_split_into_heads": lambda k, x: jnp.einsum("bsd,dhk->bshk", x, k),
        "heads_merged_into_fan_out": lambda k, x: jnp.einsum("bshk,hkd->bsd", jnp.reshape(x, (2, 3, 4, 8)), k),
    }
    model = lambda p, x: jnp.tanh(products[form](p["k"]["kernel"], x))
    t, frozen = _trained(q, True, ["k"])
    _assert_factored_equals_merge(model, t, frozen, jnp.asarray(rng.standard_normal((2, 3, 32)), jnp.float32))
