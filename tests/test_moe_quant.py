"""QLoRA expert banks and LoRA dropout through factored's expert dispatch forms (gather ``W[idx]``, ``ragged_dot``).

- Quantized banks: the MoE block of tests/_moe_models.py with its expert banks ``lorajax.quantize``d (NF4, as
  QLoRA; int8 and fp8 banks run the same code, seen equal too) and per-expert LoRA (and DoRA) on top runs
  ``factored(strict=True)`` with warnings as errors, and equals
  ``fn(lorajax.merge(params))`` (the dequantized base plus the update) in values and in the factors' gradients, to
  1e-5 of the output's scale (float32 sums in another order; seen: about 2e-7).
- Dropout: a linear expert layer at full rank (``r = d_in = d_out``) so that each row's dropped input can be solved
  back from the LoRA term: ``drop(x) = ΔY · (s·A_e·B_e)⁻¹``. It must be ``x`` with each entry either zeroed or
  scaled by ``1/(1-p)`` (PEFT's ``lora_dropout`` on the adapter's input only; the base sees the whole ``x``), the
  mask fresh per key, and ``lora_deterministic=True`` the merge path. On an NF4 bank too.
"""

import warnings

import _moe_models as moe
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax

WHERE = "|".join([*moe.EXPERTS, "shared/up/kernel", "shared/down/kernel"])


def _qlora(fn, dtype="nf4", dora=False):
    params = moe.params()
    layouts = lorajax.infer_layouts(fn, params, moe.X)
    quantized = lorajax.quantize(params, where="experts/up|experts/down", layout=layouts, dtype=dtype, block_size=32)
    assert all(lorajax.is_quantized(quantized["experts"][k]) for k in ("up", "down"))
    return lorajax.lorafy(quantized, rank=moe.R, where=WHERE, layout=layouts, init=moe.random_init, dora=dora)


@pytest.mark.parametrize(
    ("form", "dtype", "dora"),
    [
        ("gathered", "nf4", False),
        ("ragged", "nf4", False),
        ("gathered", "nf4", True),
        ("ragged", "nf4", True),
        ("dense", "nf4", True),
    ],  # DoRA on a quantized bank: n computed before the bank is read per token or group
)
def test_quantized_expert_banks_equal_the_merge_path(form, dtype, dora):
    fn = moe.FORMS[form]
    lora = _qlora(fn, dtype, dora)
    train, frozen = lorajax.partition(lora)
    loss = lambda f: lambda t: jnp.mean(f(lorajax.combine(t, frozen), moe.X) ** 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fac = lorajax.factored(fn, strict=True)
        got = jax.jit(fac)(lora, moe.X)
        g_fact = jax.jit(jax.grad(loss(fac)))(train)
    merged = lambda p, x: fn(lorajax.merge(p), x)
    want, g_merge = jax.jit(merged)(lora, moe.X), jax.jit(jax.grad(loss(merged)))(train)
    assert float(jnp.max(jnp.abs(want - fn(moe.params(), moe.X)))) > 1e-2  # the adapters change the output
    moe.close(got, want)
    for a, b in zip(jax.tree.leaves(g_fact), jax.tree.leaves(g_merge), strict=True):
        moe.close(a, b)
    if not dora:  # the merge path is the dequantized bank plus each expert's s·A_e·B_e
        node = lora["experts"]["up"]
        delta = node.scale * np.einsum("eir,ero->eio", node.a, node.b)
        want_up = np.asarray(lorajax.dequantize(node.base)) + delta
        np.testing.assert_allclose(lorajax.merge(lora)["experts"]["up"], want_up, rtol=1e-6, atol=1e-6)


E, D, T, K, P = 2, 8, 6, 2, 0.5  # experts, width (= rank), tokens, top-k, dropout rate


def _gather_layer(p, x, idx):
    rows = jnp.einsum("td,tkdf->tkf", x, p["w"][idx]).reshape(-1, D)  # rows (token, choice)
    return rows, idx.reshape(-1), jnp.repeat(jnp.arange(T), K)


def _ragged_layer(p, x, idx):
    flat = idx.reshape(-1)
    order = jnp.argsort(flat)
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    return jax.lax.ragged_dot(x[order // K], p["w"], sizes), flat[order], order // K  # rows sorted by expert


def _layer(quantized):
    w = moe.normal(7, (E, D, D))
    idx = jnp.asarray(np.random.default_rng(8).integers(0, E, (T, K)), jnp.int32)
    params = {"w": lorajax.quantize({"w": w}, where="w", layout={"w": "sio"}, block_size=32)["w"] if quantized else w}
    lora = lorajax.lorafy(params, rank=D, where="w", layout={"w": "sio"}, init=moe.random_init)
    return lora, idx


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "nf4"])
@pytest.mark.parametrize("form", ["gathered", "ragged"])
def test_lora_dropout_drops_the_adapters_input_per_entry(form, quantized):
    layer = {"gathered": _gather_layer, "ragged": _ragged_layer}[form]
    lora, idx = _layer(quantized)
    x = moe.normal(9, (T, D), 1.0)
    node = lora["w"]
    off = dict(
        lora, w=lorajax.LoRA(node.base, node.a, jnp.zeros_like(node.b), node.spec)
    )  # b = 0: the base's output alone
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fac = lorajax.factored(lambda p, x: layer(p, x, idx)[0], dropout=P, strict=True)
        base = fac(off, x, lora_rng=jax.random.key(0))
        draws = [fac(lora, x, lora_rng=jax.random.key(k)) for k in (1, 2)]
        deterministic = fac(lora, x, lora_deterministic=True)
    _, expert, token = layer(lorajax.merge(off), x, idx)
    moe.close(base, layer(lorajax.merge(off), x, idx)[0])  # dropout never touches the base's product
    moe.close(deterministic, layer(lorajax.merge(lora), x, idx)[0])
    m = node.scale * np.einsum("eir,ero->eio", np.asarray(node.a, np.float64), np.asarray(node.b, np.float64))
    masks = []
    for y in draws:
        delta = np.asarray(y, np.float64) - np.asarray(base, np.float64)
        dropped = np.einsum("no,noi->ni", delta, np.linalg.inv(m)[np.asarray(expert)])  # drop(x), row by row
        xs = np.asarray(x, np.float64)[np.asarray(token)]
        kept = np.abs(dropped - xs / (1 - P)) <= 1e-3 * np.abs(xs).max()
        zeroed = np.abs(dropped) <= 1e-3 * np.abs(xs).max()
        assert (kept | zeroed).all(), np.max(np.minimum(np.abs(dropped - xs / (1 - P)), np.abs(dropped)))
        masks.append(kept & ~zeroed)
        assert 0.2 < masks[-1].mean() < 0.8  # about 1 - P of the entries kept
    assert (masks[0] != masks[1]).any()  # a fresh mask per key
