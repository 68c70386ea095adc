"""LoftQ (``lorafy(..., init="loftq")``): a quantized base fitted together with the factors.

Parity with PEFT 0.21 runs on committed fixtures (tests/fixtures/make_peft_loftq_fixtures.py): PEFT's
LoftQ quantizes with bitsandbytes' NF4 without double quantization, our ``"_nodq"`` storage, so its
base weights (the dequantized ``Q``) and its ``B @ A`` are compared with ours; PEFT does not divide
the LoRA scale out, so ``B @ A`` is compared with our ``scale * a @ b``. Other layouts, iteration
counts and storages are checked against LoftQ written out here with NumPy's SVD and the public
``lorajax.quantize``/``dequantize``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import lorajax

FIXTURES = Path(__file__).parent / "fixtures" / "peft" / "loftq"
CASES = ("iter1", "iter3_alpha8", "iter5_rank2")
TOL = 1e-4  # relative Frobenius error, the bar


def rel(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def weights(shape, seed=0):
    """Gaussian weights whose last axis (fan-out) has log-normal scales: a quantization error with a non-flat
    spectrum, so every rank-r truncation is well separated and two SVD implementations agree."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, shape) * 0.05 * jnp.exp(0.7 * jax.random.normal(k2, shape[-1:]))


@jax.jit
def _base_and_merged(node):
    return lorajax.dequantize(node.base, jnp.float32), lorajax.merge(node).astype(jnp.float32)


def base_and_delta(params, name):
    """The node's base dequantized (float32) and ``merge - base``: what LoftQ put in Q and in ``scale * a @ b``."""
    node = params[name]["kernel"] if "kernel" in params[name] else params[name]["weight"]
    q, merged = (np.asarray(x) for x in _base_and_merged(node))
    return q, merged - q


@functools.cache
def _round_trip(layout, storage):
    def go(x):
        q = lorajax.quantize({"k": x}, where=lambda p, leaf: True, layout=lambda p, leaf: layout, **dict(storage))
        return lorajax.dequantize(q, jnp.float32)["k"]

    return jax.jit(go)  # one compile per shape instead of one per operation


def quantized(x, layout, **storage):
    """``x`` through the public quantize/dequantize, in ``layout``."""
    return np.asarray(_round_trip(layout, tuple(sorted(storage.items())))(jnp.asarray(x, jnp.float32)))


def reference(w, layout, rank, iters, **storage):
    """LoftQ by hand: ``Q_t = quant(W - L R)``, ``L R`` the rank-r SVD of ``W - Q_t``; returns ``(Q_T, L_T R_T)``."""
    lay = lorajax.Layout(layout)
    w = np.asarray(w, np.float32)
    order = lay.stack + lay.fan_in + lay.fan_out
    moved = np.transpose(w, order).shape
    fan_in, fan_out = lay.sizes(w.shape)

    def low_rank(x):
        m = np.transpose(x, order).reshape(*(w.shape[k] for k in lay.stack), fan_in, fan_out).astype(np.float64)
        u, s, vh = np.linalg.svd(m, full_matrices=False)
        approx = (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]
        return np.transpose(approx.reshape(moved), np.argsort(order)).astype(np.float32)

    res = w
    for _ in range(iters):
        q = quantized(res, layout, **storage)
        lr = low_rank(w - q)
        res = w - lr
    return q, lr


# ------------------------------------------------------------------------------------------------ PEFT parity


def _fixture(case):
    base = load_file(FIXTURES / "base.safetensors")
    got = load_file(FIXTURES / f"{case}.safetensors")
    with safe_open(FIXTURES / f"{case}.safetensors", "np") as f:
        meta = f.metadata()
    return base, got, int(meta["r"]), float(meta["lora_alpha"]), int(meta["loftq_iter"])


@pytest.mark.parametrize("case", CASES)
def test_matches_peft(case):
    base, peft, r, alpha, iters = _fixture(case)
    params = {m: {"weight": jnp.asarray(base[f"{m}.weight"])} for m in ("fc1", "fc2")}
    init = "loftq_nodq" if iters == 1 else f"loftq_iter_{iters}_nodq"
    lora = lorajax.lorafy(params, rank=r, alpha=alpha, where=["fc1", "fc2"], init=init)
    for m in ("fc1", "fc2"):
        node = lora[m]["weight"]
        assert node.spec.init == init and node.base.kind == "nf4" and not node.base.double_quant
        w, q_peft, ba = base[f"{m}.weight"], peft[f"{m}.weight"], peft[f"{m}.lora_B"] @ peft[f"{m}.lora_A"]
        s = np.linalg.svd(w - q_peft, compute_uv=False)
        assert (s[r - 1] - s[r]) / s[r - 1] > 0.01, "fixture: the rank-r truncation must be well separated"
        q, delta = base_and_delta(lora, m)
        assert rel(q, q_peft) <= TOL, (m, rel(q, q_peft))
        assert rel(delta, ba) <= TOL, (m, rel(delta, ba))
        # Factor by factor, up to each rank-1 term's sign: PEFT's A is sqrt(S) Vh, ours divides the scale out.
        root = np.sqrt(node.scale)
        a, b = np.asarray(node.a).T * root, np.asarray(node.b).T * root  # (r, in), (out, r) as PEFT's
        sign = np.sign(np.sum(a * peft[f"{m}.lora_A"], axis=1))
        np.testing.assert_allclose(a * sign[:, None], peft[f"{m}.lora_A"], atol=TOL * np.abs(a).max())
        np.testing.assert_allclose(b * sign[None, :], peft[f"{m}.lora_B"], atol=TOL * np.abs(b).max())
        # The scale is divided out: the model starts near W whatever alpha is (PEFT's is Q + scale * B @ A).
        assert np.linalg.norm(w - q - delta) < np.linalg.norm(w - q_peft)


@pytest.mark.torch
def test_fixtures_regenerate(tmp_path):
    import importlib.util

    path = Path(__file__).parent / "fixtures" / "make_peft_loftq_fixtures.py"
    spec = importlib.util.spec_from_file_location("make_peft_loftq_fixtures", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.write(tmp_path, list(CASES))
    for name in ("base", *CASES):
        got, want = load_file(tmp_path / f"{name}.safetensors"), load_file(FIXTURES / f"{name}.safetensors")
        assert sorted(got) == sorted(want)
        for key in want:
            if "lora_A" in key or "lora_B" in key:
                continue  # compared as products below
            np.testing.assert_allclose(got[key], want[key], atol=1e-6, rtol=0, err_msg=f"{name}: {key}")
        # A and B come out of a truncated SVD that LAPACK computes in a machine-dependent order: entries move by a
        # few float32 ulps of the largest singular value (3.3e-6 seen on one CPU). Their product B @ A is what the
        # model uses and what the test pins: to 1e-5 of its norm (float32 SVD error ~ n * eps * sigma_max).
        for key in [k for k in want if "lora_A" in k]:
            other = key.replace("lora_A", "lora_B")
            got_ba, want_ba = got[other] @ got[key], want[other] @ want[key]
            err = np.linalg.norm(got_ba - want_ba) / np.linalg.norm(want_ba)
            assert err < 1e-5, f"{name}: {other} @ {key}: relative error {err:.2e}"


# ------------------------------------------------------------------------------------------------ the algorithm


def test_error_decreases_with_iterations_and_beats_quantization_alone():
    w = weights((64, 64), seed=1)
    plain = np.linalg.norm(np.asarray(w) - quantized(w, "io"))  # QLoRA's base: NF4, block 64, double quant
    errors = []
    for init in ("loftq", "loftq_iter_2", "loftq_iter_4"):
        lora = lorajax.lorafy({"fc": {"kernel": w}}, rank=8, alpha=16, where=["fc"], init=init)
        q, delta = base_and_delta(lora, "fc")
        errors.append(np.linalg.norm(np.asarray(w) - q - delta))
        assert errors[-1] < np.linalg.norm(np.asarray(w) - q)  # the factors reduce what Q leaves
    assert errors[0] < 0.7 * plain, (errors, plain)
    assert errors[0] > errors[1] > errors[2], errors


def test_one_round_base_is_plain_quantization():
    """One round quantizes W itself: the base is lorajax.quantize's, code for code."""
    w = weights((64, 64), seed=2)
    lora = lorajax.lorafy({"fc": {"kernel": w}}, rank=4, where=["fc"], init="loftq")
    plain = jax.jit(lambda x: lorajax.quantize({"fc": {"kernel": x}}, where=["fc"]))(w)["fc"]["kernel"]
    base = lora["fc"]["kernel"].base
    assert (base.kind, base.block_size, base.double_quant, base.dtype) == ("nf4", 64, True, np.dtype("float32"))
    for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    ("shape", "layout", "init", "storage"),
    [
        ((64, 64), "io", "loftq_iter_2", {}),
        ((32, 4, 16), "ioo", "loftq_iter_2_nodq", {"double_quant": False}),  # DenseGeneral (d_model, heads, head)
        ((3, 64, 32), "sio", "loftq_iter_3", {}),  # stacked layers: one quantization, one SVD per layer
        ((64, 64), "io", "loftq_iter_2_int8", {"dtype": "int8"}),
        ((64, 64), "oi", "loftq_fp8", {"dtype": "fp8"}),
    ],
)
def test_matches_reference_loftq(shape, layout, init, storage):
    w = weights(shape, seed=3)
    rank, iters = 4, int(init.split("_iter_")[1].split("_")[0]) if "_iter_" in init else 1
    lora = lorajax.lorafy(
        {"k": {"kernel": w}}, rank=rank, alpha=2.0, where=["k"], init=init, layout={"k/kernel": layout}
    )
    node = lora["k"]["kernel"]
    assert node.layout.axes == layout and node.spec.init == init
    assert node.base.kind == storage.get("dtype", "nf4")
    q, delta = base_and_delta(lora, "k")
    q_ref, delta_ref = reference(w, layout, rank, iters, **storage)
    assert rel(q, q_ref) <= TOL and rel(delta, delta_ref) <= TOL, (rel(q, q_ref), rel(delta, delta_ref))
    assert np.linalg.norm(np.asarray(w) - q - delta) < np.linalg.norm(np.asarray(w) - quantized(w, layout, **storage))


def test_jit_eval_shape_and_bf16():
    w = weights((64, 64), seed=4)
    params = {"fc": {"kernel": w}}
    go = lambda p: lorajax.lorafy(p, rank=4, where=["fc"], init="loftq_iter_2")
    eager, jitted = go(params), jax.jit(go)(params)
    for x, y in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=1e-5)
    abstract = jax.eval_shape(go, params)["fc"]["kernel"]
    assert isinstance(abstract.base, lorajax.QuantizedKernel) and abstract.base.shape == (64, 64)
    assert jax.tree.structure(abstract) == jax.tree.structure(eager["fc"]["kernel"])
    half = lorajax.lorafy({"fc": {"kernel": w.astype(jnp.bfloat16)}}, rank=4, where=["fc"], init="loftq")
    assert half["fc"]["kernel"].base.dtype == jnp.bfloat16
    assert lorajax.merge(half)["fc"]["kernel"].dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------------ bad input


def test_unfit_kernels_are_listed_by_path():
    params = {
        "ok": {"kernel": weights((64, 64))},
        "tiny": {"kernel": jnp.ones((4, 8))},
        "nan": {"kernel": jnp.full((64, 64), jnp.nan)},
    }
    with pytest.raises(ValueError, match=r"(?s)lorafy: init='loftq' cannot read every target \(2 problems\)") as e:
        lorajax.lorafy(params, rank=2, where=["ok", "tiny", "nan"], init="loftq")
    assert "tiny/kernel with shape (4, 8): holds 32 weights per matrix, fewer than one NF4 block" in str(e.value)
    assert "nan/kernel with shape (64, 64): holds NaN or Inf" in str(e.value)
    assert "ok/kernel" not in str(e.value)
    # int8 has no blocks: a small kernel is fine there.
    assert lorajax.lorafy(params, rank=2, where=["tiny"], init="loftq_int8")["tiny"]["kernel"].base.kind == "int8"


def test_quantized_or_integer_base_is_refused():
    q = lorajax.quantize({"fc": {"kernel": weights((64, 64))}}, where=["fc"])
    with pytest.raises(ValueError, match=r"fc/kernel with shape \(64, 64\): init='loftq' .* already a QuantizedKernel"):
        lorajax.lorafy(q, rank=2, where=["fc"], init="loftq")
    with pytest.raises(TypeError, match=r"lorafy: fc/kernel with shape \(64, 64\) has dtype int32"):
        lorajax.lorafy({"fc": {"kernel": jnp.ones((64, 64), jnp.int32)}}, rank=2, where=["fc"], init="loftq")


@pytest.mark.parametrize("name", ["loftq_iter_0", "loftq_iter_", "loftq_int4", "loftq_nodq_iter_2"])
def test_bad_names(name):
    with pytest.raises(ValueError, match=r"lorafy: init must be .*'loftq_iter_<k>'"):
        lorajax.lorafy({"fc": {"kernel": weights((64, 64))}}, rank=2, where=["fc"], init=name)
