"""QLoRA's quantized bases: NF4 (+ double quantization), int8 and fp8 against bitsandbytes' own arrays.

The references are in tests/fixtures/bnb/, written by bitsandbytes 0.50 with its generator
(tests/fixtures/bnb/make_bnb_fixtures.py); the torch-marked test regenerates them and compares.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from _tolerances import assert_within, sum_bound
from safetensors.flax import load_file

import lorajax

FIXTURES = Path(__file__).parent / "fixtures" / "bnb"
QUANT = load_file(str(FIXTURES / "quant.safetensors"))
CKPT = FIXTURES / "linear4bit.safetensors"
TORCH_LAYOUT = {"linear": "oi", "ragged": "oi", "conv": "oiww", "bf16": "oi"}
ALL = lambda path, leaf: True


def _quantize(w, layout, **kw):
    return lorajax.quantize({"w": w}, where=ALL, layout={".*": layout}, **kw)["w"]


def _equal(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a == b).mean())


@pytest.mark.parametrize("name", list(TORCH_LAYOUT))
@pytest.mark.parametrize("block", [64, 128])
def test_nf4_codes_and_absmax_equal_bitsandbytes(name, block):
    w = QUANT[name]
    q = _quantize(w, TORCH_LAYOUT[name], block_size=block, double_quant=False)
    key = f"{name}.nf4_{block}"
    assert _equal(q.codes[0], QUANT[f"{key}.packed"]) == 1.0
    assert _equal(q.scales[0], QUANT[f"{key}.absmax"]) == 1.0
    back = lorajax.dequantize(q)
    assert back.dtype == w.dtype
    assert _equal(back, QUANT[f"{key}.dequant"]) == 1.0


@pytest.mark.parametrize("name", list(TORCH_LAYOUT))
@pytest.mark.parametrize("block", [64, 128])
def test_nf4_double_quant_equals_bitsandbytes(name, block):
    w = QUANT[name]
    key = f"{name}.nf4_{block}_dq"
    q = _quantize(w, TORCH_LAYOUT[name], block_size=block, double_quant=True)
    assert _equal(q.codes[0], QUANT[f"{key}.packed"]) == 1.0
    # The 8-bit codes of the absmaxes. The offset (their float32 mean) may differ from PyTorch's in the last bit:
    # a float32 sum's rounding depends on the reduction order (PyTorch's CPU cascade sum depends on the SIMD width).
    assert _equal(q.scales[0], QUANT[f"{key}.absmax"]) >= 0.9999
    assert np.allclose(q.offset[0], QUANT[f"{key}.offset"][0], rtol=2**-22, atol=0)
    # With bitsandbytes' offset and nested absmax, every dequantized weight is bitsandbytes' bit for bit ...
    same = dataclasses.replace(
        q,
        nested=QUANT[f"{key}.nested_absmax"][None],
        offset=QUANT[f"{key}.offset"],
        scales=QUANT[f"{key}.absmax"][None],
    )
    assert _equal(lorajax.dequantize(same), QUANT[f"{key}.dequant"]) == 1.0
    # ... and with lorajax's own offset each is within an ulp or two of it (of float32, or of bf16 for a bf16 weight).
    rtol = 2e-6 if w.dtype == jnp.float32 else 2**-7
    got, want = (np.asarray(x, np.float32) for x in (lorajax.dequantize(q), QUANT[f"{key}.dequant"]))
    np.testing.assert_allclose(got, want, rtol=rtol)


@pytest.mark.parametrize(
    ("name", "layout", "to_ours"),
    [
        ("linear", "io", lambda w: w.T),  # Flax Dense: (in, out)
        ("conv", "wwio", lambda w: jnp.transpose(w, (2, 3, 1, 0))),  # Flax Conv: (kh, kw, in, out)
        ("linear", "ioo", lambda w: w.T.reshape(128, 6, 8)),  # DenseGeneral query kernel (d_model, heads, head_dim)
        ("linear", "iio", lambda w: w.T.reshape(8, 16, 48)),  # attention output kernel (heads, head_dim, d_model)
        ("linear", "eo", lambda w: w),  # an embedding table (rows, dim), quantized row-major like bnb's Embedding4bit
    ],
)
def test_blocks_run_along_fan_in_in_pytorch_order(name, layout, to_ours):
    w = QUANT[name]
    q = _quantize(to_ours(w), layout, block_size=64, double_quant=False)
    key = f"{name}.nf4_64"
    assert _equal(q.codes[0], QUANT[f"{key}.packed"]) == 1.0
    assert _equal(q.scales[0], QUANT[f"{key}.absmax"]) == 1.0
    assert _equal(lorajax.dequantize(q), to_ours(QUANT[f"{key}.dequant"])) == 1.0


def test_stacked_kernels_quantize_layer_by_layer():
    a, b = QUANT["linear"], QUANT["linear"][::-1] * 2
    q = _quantize(jnp.stack([a.T, b.T]), "sio", block_size=64, double_quant=True)
    one = [_quantize(x.T, "io", block_size=64, double_quant=True) for x in (a, b)]
    for k in range(2):
        for field in ("codes", "scales", "nested", "offset"):
            assert _equal(getattr(q, field)[k], getattr(one[k], field)[0]) == 1.0
    back = lorajax.dequantize(q)
    assert _equal(back, jnp.stack([lorajax.dequantize(x) for x in one])) == 1.0


@pytest.mark.parametrize("name", list(TORCH_LAYOUT))
def test_int8_rowwise_equals_bitsandbytes(name):
    w = QUANT[name]
    q = _quantize(w, TORCH_LAYOUT[name], dtype="int8")
    rows = w.shape[0]
    assert _equal(q.codes[0].reshape(rows, -1), QUANT[f"{name}.int8.codes"]) == 1.0
    assert _equal(q.scales[0], QUANT[f"{name}.int8.stats"]) == 1.0
    back = lorajax.dequantize(q, jnp.float32)
    assert _equal(back.reshape(rows, -1), QUANT[f"{name}.int8.dequant"]) == 1.0


def test_fp8_rounds_like_ml_dtypes():
    w = np.asarray(QUANT["linear"])
    q = _quantize(jnp.asarray(w.T), "io", dtype="fp8")
    scale = np.abs(w).max(axis=1) * np.float32(1 / 448)
    expected = (w / scale[:, None]).astype(ml_dtypes.float8_e4m3fn)
    assert np.array_equal(np.asarray(q.codes[0]).view(np.uint8), expected.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(q.scales[0]), scale)
    back = np.asarray(lorajax.dequantize(q)).T
    np.testing.assert_array_equal(back, expected.astype(np.float32) * scale[:, None])
    assert np.abs(back - w).max() <= np.abs(w).max() / 16  # e4m3: 3 mantissa bits


def test_nf4_double_quant_storage_on_a_4096_square_kernel_is_under_4_2_bits():
    abstract = {"mlp": {"kernel": jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)}}
    q = lorajax.quantize(abstract, where=["mlp"])["mlp"]["kernel"]
    assert isinstance(q.codes, jax.ShapeDtypeStruct)
    assert q.codes.shape == (1, 4096 * 4096 // 2) and q.scales.dtype == jnp.uint8
    # 4 bits + 8 bits per 64 weights + 32 bits per 64 * 256 weights + the offset: about 4.127 bits.
    assert 4.12 < q.bits_per_param <= 4.2
    plain = lorajax.quantize(abstract, where=["mlp"], double_quant=False)["mlp"]["kernel"]
    assert plain.bits_per_param == pytest.approx(4.5)
    assert lorajax.dequantize({"k": q})["k"] == jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)


@pytest.mark.parametrize("kind", ["nf4", "int8", "fp8"])
def test_quantize_and_dequantize_under_jit_equal_eager(kind):
    w = jax.random.normal(jax.random.key(1), (3, 96, 40), jnp.bfloat16)
    params = {"layers": {"kernel": w}, "norm": jnp.ones(40)}
    run = lambda p: lorajax.quantize(p, where=["layers"], dtype=kind, layout={".*": "sio"})
    eager, jitted = run(params), jax.jit(run)(params)
    assert jax.tree.structure(eager) == jax.tree.structure(jitted)
    for x, y in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        assert _equal(x, y) == 1.0
    back = lorajax.dequantize(eager)["layers"]["kernel"]
    assert _equal(jax.jit(lorajax.dequantize)(jitted)["layers"]["kernel"], back) == 1.0
    err = jnp.abs(lorajax.dequantize(eager)["layers"]["kernel"].astype(jnp.float32) - w.astype(jnp.float32))
    assert float(err.max()) < 0.25 * float(jnp.abs(w.astype(jnp.float32)).max())


def test_load_bnb_4bit_checkpoint_is_bit_exact_and_its_forward_matches():
    ckpt = lorajax.load_bnb_4bit(CKPT)
    torch_side = lorajax.load_bnb_4bit(CKPT, layout="oi")
    ref = load_file(str(CKPT))
    assert sorted(ckpt) == ["io.fc1.dequant", "io.fc2.dequant", "io.x", "io.y"] + [
        f"model.{m}.{p}" for m in ("fc1", "fc2") for p in ("bias", "kernel")
    ]
    fc1, fc2 = ckpt["model.fc1.kernel"], ckpt["model.fc2.kernel"]
    assert (fc1.block_size, fc1.double_quant, fc2.block_size, fc2.double_quant) == (64, True, 32, False)
    state = json.loads(bytes(np.asarray(ref["model.fc1.weight.quant_state.bitsandbytes__nf4"]).tolist()))
    assert float(fc1.offset[0]) == np.float32(state["nested_offset"])
    dense = lorajax.dequantize(ckpt)
    for m in ("fc1", "fc2"):
        assert _equal(dense[f"model.{m}.kernel"], ref[f"io.{m}.dequant"].T) == 1.0
        assert _equal(lorajax.dequantize(torch_side[f"model.{m}.weight"]), ref[f"io.{m}.dequant"]) == 1.0
    hp = jax.lax.Precision.HIGHEST
    h = jax.nn.relu(jnp.dot(ref["io.x"], dense["model.fc1.kernel"], precision=hp) + dense["model.fc1.bias"])
    y = jnp.dot(h, dense["model.fc2.kernel"], precision=hp) + dense["model.fc2.bias"]
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref["io.y"]), atol=1e-5, rtol=0)


def test_load_bnb_4bit_reports_every_layer_it_cannot_read():
    tensors = dict(load_file(str(CKPT)))
    fp4 = tensors.pop("model.fc2.weight.quant_state.bitsandbytes__nf4")
    tensors["model.fc2.weight.quant_state.bitsandbytes__fp4"] = fp4
    del tensors["model.fc1.weight.absmax"]
    with pytest.raises(ValueError, match=r"(?s)load_bnb_4bit: .*2 problems.*fc1: missing.*fc2: quant type 'fp4'"):
        lorajax.load_bnb_4bit(tensors)


def test_bad_input_names_the_path():
    good = jnp.ones((64, 64))
    with pytest.raises(ValueError, match=r"(?s)quantize: .*ids/kernel with shape \(64, 64\) has dtype int32"):
        lorajax.quantize({"ids": {"kernel": jnp.ones((64, 64), jnp.int32)}, "fc": {"kernel": good}}, where=ALL)
    with pytest.raises(ValueError, match=r"(?s)quantize: .*fc/kernel with shape \(4, 8\) holds 32 weights per matrix"):
        lorajax.quantize({"fc": {"kernel": jnp.ones((4, 8))}}, where=ALL)
    with pytest.raises(ValueError, match=r"(?s)quantize: .*fc/kernel with shape \(64, 64\) holds NaN"):
        lorajax.quantize({"fc": {"kernel": good.at[3, 3].set(jnp.nan)}}, where=ALL)
    with pytest.raises(ValueError, match=r"(?s)quantize: .*bias with shape \(64,\) is not a kernel"):
        lorajax.quantize({"bias": jnp.ones(64)}, where=ALL)
    with pytest.raises(ValueError, match="quantize: block_size must be one of"):
        lorajax.quantize({"fc": {"kernel": good}}, where=ALL, block_size=48)
    with pytest.raises(ValueError, match="quantize: dtype must be one of"):
        lorajax.quantize({"fc": {"kernel": good}}, where=ALL, dtype="nf3")
    with pytest.raises(ValueError, match="quantize: where=.* matched no float kernel"):
        lorajax.quantize({"fc": {"kernel": good}}, where=["nothing"])


def test_a_partial_last_block_is_kept_as_bitsandbytes_keeps_it():
    # ragged: 40 * 50 = 2000 weights = 31 blocks of 64 and one of 16, which gets its own absmax.
    q = _quantize(QUANT["ragged"], "oi", block_size=64, double_quant=False)
    assert q.scales.shape == (1, 32) and q.codes.shape == (1, 1000)
    assert float(q.scales[0, -1]) == float(jnp.abs(QUANT["ragged"].reshape(-1)[-16:]).max())


@pytest.mark.torch
def test_fixtures_are_what_bitsandbytes_writes():
    pytest.importorskip("bitsandbytes")
    import make_bnb_fixtures  # tests/fixtures/bnb/, put on sys.path below

    quant, linear = make_bnb_fixtures.build()
    for fresh, path in ((quant, FIXTURES / "quant.safetensors"), (linear, CKPT)):
        stored = load_file(str(path))
        assert sorted(fresh) == sorted(stored)
        for k, v in fresh.items():
            got = np.asarray(jnp.asarray(stored[k], jnp.float32)) if v.dtype.is_floating_point else stored[k]
            want = v.float().numpy() if v.dtype.is_floating_point else v.numpy()
            if k == "io.y":  # a forward pass: its sums' order is the CPU's (and bitsandbytes' kernel's) own
                ref, bound = _bnb_forward_bound({n: np.float64(t.float().numpy()) for n, t in fresh.items()})
                assert_within(want, ref, bound, "io.y (bitsandbytes now) vs float64")
                assert_within(np.asarray(got).reshape(want.shape), ref, bound, "io.y (fixture) vs float64")
                continue
            np.testing.assert_array_equal(np.asarray(got).reshape(want.shape), want, err_msg=k)


def _bnb_forward_bound(t):
    """``fc2(relu(fc1(x)))`` of the fixture's dequantized weights in float64, and the float32 error bound on it.

    Each layer's sum of ``n + 1`` terms (the bias last) is within ``gamma(n + 1) * sum|terms|`` of the exact one;
    relu is 1-Lipschitz, so the first layer's error reaches the second through ``|W2|``.
    """
    x, w1, w2 = t["io.x"], t["io.fc1.dequant"], t["io.fc2.dequant"]
    b1, b2 = t["model.fc1.bias"], t["model.fc2.bias"]
    h = x @ w1.T + b1
    e1 = sum_bound(abs(x) @ abs(w1).T + abs(b1), w1.shape[1] + 1)
    y = np.maximum(h, 0) @ w2.T + b2
    e2 = e1 @ abs(w2).T + sum_bound((np.maximum(h, 0) + e1) @ abs(w2).T + abs(b2), w2.shape[1] + 1)
    return y, e2


@pytest.fixture(autouse=True, scope="module")
def _generator_on_path():
    import sys

    sys.path.insert(0, str(FIXTURES))
    yield
    sys.path.remove(str(FIXTURES))


# --- QLoRA: LoRA on a quantized base ---------------------------------------------------------------------------


def _mlp(p, x):
    return jnp.tanh(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"]


def _qlora(kind="nf4", base_dtype=jnp.float32):
    k = jax.random.split(jax.random.key(0), 4)
    dense = {
        "l1": {"kernel": (jax.random.normal(k[0], (64, 128)) * 0.1).astype(base_dtype)},
        "l2": {"kernel": (jax.random.normal(k[1], (128, 32)) * 0.1).astype(base_dtype)},
    }
    lora = lorajax.lorafy(lorajax.quantize(dense, where=["l1", "l2"], dtype=kind), rank=4, where=["l1", "l2"])
    # b starts at zero; a random b makes the update visible.
    node = lora["l1"]["kernel"]
    lora["l1"]["kernel"] = dataclasses.replace(node, b=jax.random.normal(k[2], node.b.shape) * 0.1)
    return dense, lora, jax.random.normal(k[3], (8, 64))


@pytest.mark.parametrize("kind", ["nf4", "int8", "fp8"])
def test_lorafy_on_a_quantized_base_merges_to_dequantize_plus_delta(kind):
    _, lora, _ = _qlora(kind, jnp.bfloat16)
    node = lora["l1"]["kernel"]
    assert lorajax.is_quantized(node.base) and node.layout == lorajax.Layout("io")
    assert node.a.shape == (64, 4) and node.b.shape == (4, 128) and node.dtype == jnp.bfloat16
    merged = lorajax.merge(lora)["l1"]["kernel"]
    base = lorajax.dequantize(node.base, jnp.float32)
    assert merged.dtype == jnp.bfloat16
    expected = (base + lorajax.delta(node)).astype(jnp.bfloat16)  # one rounding from float32
    assert _equal(merged, expected) == 1.0
    abstract = lorajax.quantize(jax.eval_shape(lambda: _qlora(kind)[0]), where=["l1"], dtype=kind)
    planned = lorajax.lorafy(abstract, rank=4, where=["l1"])["l1"]["kernel"]
    assert planned.a == jax.ShapeDtypeStruct((64, 4), jnp.float32)


def test_factored_training_on_a_quantized_base():
    _, lora, x = _qlora()
    step_fn = lorajax.factored(_mlp)
    np.testing.assert_allclose(step_fn(lora, x), _mlp(lorajax.merge(lora), x), atol=1e-5, rtol=0)
    loss = lambda p: jnp.mean((step_fn(p, x) - 1.0) ** 2)
    grads = jax.grad(loss, allow_int=True)(lora)
    g = grads["l1"]["kernel"]
    assert float(jnp.abs(g.a).max()) > 0 and float(jnp.abs(g.b).max()) > 0
    assert g.base.codes.dtype == jax.dtypes.float0 and g.base.scales.dtype == jax.dtypes.float0
    assert float(jnp.abs(g.base.nested).max()) == 0 and float(jnp.abs(g.base.offset).max()) == 0
    # Training as with any base: differentiate the trainable part (lorajax.partition), so no integer codes meet
    # the optimizer.
    import optax

    trainable, frozen = lorajax.partition(lora)
    opt = optax.adam(1e-2)
    state = opt.init(trainable)

    @jax.jit
    def train(t, s):
        value, gr = jax.value_and_grad(lambda t: loss(lorajax.combine(t, frozen)))(t)
        updates, s = opt.update(gr, s, t)
        return optax.apply_updates(t, updates), s, value

    losses = []
    for _ in range(3):
        trainable, state, value = train(trainable, state)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    params = lorajax.combine(trainable, frozen)
    before, after = lora["l1"]["kernel"].base, params["l1"]["kernel"].base
    for field in ("codes", "scales", "nested", "offset"):
        assert np.array_equal(np.asarray(getattr(before, field)), np.asarray(getattr(after, field)))
    assert not np.array_equal(np.asarray(lora["l1"]["kernel"].a), np.asarray(params["l1"]["kernel"].a))


def _step_memory(base, names, model, x, dora=False):
    lora = lorajax.lorafy(base, rank=8, where=names, dora=dora)
    trainable, frozen = lorajax.partition(lora)
    loss = lambda t, f: jnp.sum(lorajax.factored(model)(lorajax.combine(t, f), x) ** 2)
    return jax.jit(jax.grad(loss)).lower(trainable, frozen).compile().memory_analysis()


def test_factored_step_holds_the_quantized_model_not_a_dense_copy():
    # 4 layers of 1024x1024: the dense float32 bases are 16 MiB, bf16 8 MiB, NF4 2.3 MiB; one float32 layer 4 MiB.
    n, d = 4, 1024
    keys = jax.random.split(jax.random.key(0), n)
    dense = {f"l{i}": {"kernel": jax.random.normal(keys[i], (d, d)) * 0.02} for i in range(n)}
    bf16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), dense)
    names = list(dense)

    def model(p, x):
        for name in names:
            x = jnp.tanh(x @ p[name]["kernel"])  # a bf16 kernel meets float32 activations: upcast at use
        return x

    x = jnp.ones((8, d))
    plain = _step_memory(dense, names, model, x)
    half = _step_memory(bf16, names, model, x)
    quant = _step_memory(lorajax.quantize(bf16, where=names), names, model, x)
    assert quant.argument_size_in_bytes < plain.argument_size_in_bytes / 6
    assert quant.output_size_in_bytes == plain.output_size_in_bytes  # gradients of a and b only
    # Each kernel is dequantized (or upcast) where it is used, forward and backward, one layer at a time: the
    # temporaries hold about one float32 layer, not the whole dense model (16 MiB, as before base_product).
    layer = d * d * 4
    assert quant.temp_size_in_bytes < 1.5 * layer
    assert half.temp_size_in_bytes < 1.5 * layer
    peak = lambda m: m.argument_size_in_bytes + m.temp_size_in_bytes
    assert peak(quant) < 0.85 * peak(half) < 0.85 * peak(plain)
    # DoRA's norms read each kernel dequantized (or upcast) too, chained one after another: 2 float32 layers of
    # temporaries for bf16 and 3 for NF4 (4 and 6 when XLA was left to build them all at once).
    for base in (bf16, lorajax.quantize(bf16, where=names)):
        assert _step_memory(base, names, model, x, dora=True).temp_size_in_bytes < 3.5 * layer
    # So do select's DoRA gains for a bank served on the NF4 base: 2.4 layers (5.4 when built all at once).
    quantized = lorajax.quantize(bf16, where=names)
    bank = lorajax.stack_adapters(
        [lorajax.lorafy(quantized, rank=8, where=names, dora=True, key=jax.random.key(k)) for k in range(3)]
    )
    serve = jax.jit(lambda bank, ids, x: lorajax.factored(model)(lorajax.select(bank, ids, form="gather"), x))
    served = serve.lower(bank, jnp.array([0, 1, 2, 0]), jnp.ones((4, d))).compile().memory_analysis()
    assert served.temp_size_in_bytes < 3.5 * layer


def test_a_quantized_kernel_without_an_adapter_runs_dequantized_in_merge_and_factored():
    dense, lora, x = _qlora()
    partial = lorajax.lorafy(lorajax.quantize(dense, where=["l1", "l2"]), rank=4, where=["l1"])
    assert lorajax.is_quantized(partial["l2"]["kernel"])  # quantized, and no adapter trains it
    merged = lorajax.merge(partial)
    assert not any(lorajax.is_quantized(v) for v in jax.tree.leaves(merged, is_leaf=lorajax.is_quantized))
    np.testing.assert_array_equal(merged["l2"]["kernel"], lorajax.dequantize(partial["l2"]["kernel"]))
    np.testing.assert_allclose(lorajax.factored(_mlp)(partial, x), _mlp(merged, x), atol=1e-5, rtol=0)
    trainable, frozen = lorajax.partition(partial)
    loss = lambda fn: lambda t: jnp.sum(fn(lorajax.combine(t, frozen)) ** 2)
    g_fact = jax.grad(loss(lambda p: lorajax.factored(_mlp)(p, x)))(trainable)
    g_merge = jax.grad(loss(lambda p: _mlp(lorajax.merge(p), x)))(trainable)
    chex.assert_trees_all_close(g_fact, g_merge, atol=1e-5, rtol=1e-5)


def test_an_adapter_file_loads_onto_a_quantized_base(tmp_path):
    dense, lora, x = _qlora()
    lorajax.save_adapter(tmp_path / "a.safetensors", lora)
    back = lorajax.load_adapter(tmp_path / "a.safetensors", lorajax.quantize(dense, where=["l1", "l2"]))
    assert lorajax.is_quantized(back["l1"]["kernel"].base)
    np.testing.assert_array_equal(_mlp(lorajax.merge(back), x), _mlp(lorajax.merge(lora), x))


def _scanned(p, x):
    def layer(h, w):
        return jnp.tanh(h @ w), None

    return jax.lax.scan(layer, x, p["layers"]["kernel"])[0]


def test_a_scanned_stack_of_quantized_layers_is_dequantized_one_layer_at_a_time():
    n, d = 6, 512
    w = jax.random.normal(jax.random.key(0), (n, d, d)) * 0.05
    q = lorajax.quantize({"layers": {"kernel": w}}, where=["layers"], layout={".*": "sio"})
    lora = lorajax.lorafy(q, rank=4, where=["layers"])
    node = lora["layers"]["kernel"]
    lora["layers"]["kernel"] = dataclasses.replace(node, b=jax.random.normal(jax.random.key(1), node.b.shape) * 0.1)
    x = jax.random.normal(jax.random.key(2), (4, d))
    np.testing.assert_allclose(lorajax.factored(_scanned)(lora, x), _scanned(lorajax.merge(lora), x), atol=1e-5, rtol=0)
    trainable, frozen = lorajax.partition(lora)
    loss = lambda fn: lambda t: jnp.sum(fn(lorajax.combine(t, frozen)) ** 2)
    step = jax.jit(jax.grad(loss(lambda p: lorajax.factored(_scanned)(p, x))))
    chex.assert_trees_all_close(
        step(trainable), jax.grad(loss(lambda p: _scanned(lorajax.merge(p), x)))(trainable), atol=1e-4, rtol=1e-4
    )
    # The scan slices the codes, not a dense stack: temporaries stay near one float32 layer (1 MiB), not 6.
    temp = step.lower(trainable).compile().memory_analysis().temp_size_in_bytes
    assert temp < 2 * d * d * 4


def test_forward_mode_through_a_quantized_base_with_fast_weight_grads_off():
    _, lora, x = _qlora()
    trainable, frozen = lorajax.partition(lora)
    tangent = jax.tree.map(jnp.ones_like, trainable)
    run = lambda fn: lambda t: fn(lorajax.combine(t, frozen))
    fact = lorajax.factored(_mlp, fast_weight_grads=False)
    _, jvp_fact = jax.jvp(run(lambda p: fact(p, x)), (trainable,), (tangent,))
    _, jvp_merge = jax.jvp(run(lambda p: _mlp(lorajax.merge(p), x)), (trainable,), (tangent,))
    np.testing.assert_allclose(jvp_fact, jvp_merge, atol=1e-4, rtol=1e-4)


def test_summary_and_memory_plan_count_quantized_bytes():
    import optax

    abstract = {"q": {"kernel": jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)}}
    lora = lorajax.lorafy(lorajax.quantize(abstract, where=["q"]), rank=8, where=["q"])
    s = lorajax.summary(lora)
    nf4 = lora["q"]["kernel"].base.nbytes
    assert s.total == 4096 * 4096 + 2 * 4096 * 8 and s.trainable == 2 * 4096 * 8
    assert s.total_bytes == nf4 + 2 * 4096 * 8 * 4
    plan = lorajax.memory_plan(lora, optax.adam(1e-4))
    assert plan.lora.frozen == nf4 and nf4 * 8 / (4096 * 4096) <= 4.2
    assert plan.full.trainable == 4096 * 4096 * 2  # full fine-tuning trains the dense bf16 kernel


def test_llama2_7b_qlora_plan_holds_about_3_6_gib_of_frozen_weights():
    import importlib.util

    spec = importlib.util.spec_from_file_location("qlora_example", Path(__file__).parents[1] / "examples" / "qlora.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    bf16, nf4 = example.plans()
    gib = 2**30
    assert round(bf16.lora.frozen / gib, 2) == 12.55
    assert 3.5 * gib <= nf4.lora.frozen <= 3.7 * gib
    assert nf4.lora.trainable == bf16.lora.trainable and nf4.full.total == bf16.full.total


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_requantize_merges_and_quantizes_in_the_base_format(kind):
    _, lora, _ = _qlora(kind)
    served = lorajax.requantize(lora)
    q = served["l1"]["kernel"]
    base = lora["l1"]["kernel"].base
    assert lorajax.is_quantized(q) and (q.kind, q.block_size, q.double_quant) == (
        kind,
        base.block_size,
        base.double_quant,
    )
    # The same as quantizing merge's dense kernel with the base's settings.
    expected = lorajax.quantize(
        {"l1": {"kernel": lorajax.merge(lora)["l1"]["kernel"]}}, where=["l1"], dtype=kind, double_quant=q.double_quant
    )["l1"]["kernel"]
    for field in ("codes", "scales"):
        assert _equal(getattr(q, field), getattr(expected, field)) == 1.0


def test_requantize_refuses_nan_naming_the_path():
    _, lora, _ = _qlora("int8")
    node = lora["l2"]["kernel"]
    lora["l2"]["kernel"] = dataclasses.replace(node, a=node.a.at[0, 0].set(jnp.nan), b=node.b + 1)
    with pytest.raises(ValueError, match=r"(?s)requantize: .*l2/kernel \(int8\): 32 of 4096 merged weights are NaN"):
        lorajax.requantize(lora)
