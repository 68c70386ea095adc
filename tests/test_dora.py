"""DoRA (lorafy(dora=True), PEFT's use_dora): the weight-decomposed LoRA variant.

Checked against an independent dense formula written out here (float64 NumPy), and against
files PEFT wrote (tests/fixtures/peft/dora_*, from tests/fixtures/make_dora_fixtures.py):
forward, merged kernels and the gradients of A, B and the magnitude.
"""

from __future__ import annotations

import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _jaxprs import computed_shapes
from _peft_twins import MLP, NCHW, NCL, Conv1d, Embedder, run_twin, twin_params
from _tolerances import assert_within, sum_bound
from safetensors.numpy import load_file

import lorajax

FIXTURES = Path(__file__).parent / "fixtures" / "peft"
RTOL = ATOL = 1e-5


def dense_dora(w, a, b, m, scale, fan_in):
    """The DoRA kernel ``(m / ‖W + s·a@b‖) ⊙ (W + s·a@b)`` in float64, for a kernel laid out (*fan_in, *fan_out)."""
    w, a, b, m = (np.asarray(v, np.float64) for v in (w, a, b, m))
    k = len(fan_in)
    d = scale * (a.reshape(-1, a.shape[-1]) @ b.reshape(b.shape[0], -1)).reshape(w.shape)
    v = w + d
    n = np.sqrt((v**2).sum(axis=tuple(range(k))))
    return (m / n) * v


# ---------------------------------------------------------------------------------------------------------------------
# lorafy(dora=True) and merge, against the dense formula.


@pytest.mark.parametrize(
    ("shape", "layout"),
    [((6, 5), "io"), ((3, 3, 4, 5), "wwio"), ((10, 6), "eo"), ((6, 2, 3), "ioo")],
)
def test_lorafy_dora_starts_at_the_base_and_merges_like_the_dense_formula(shape, layout):
    w = jax.random.normal(jax.random.key(0), shape)
    params = {"m": {"kernel": w}}
    p = lorajax.lorafy(params, rank=2, alpha=3.0, where=["m"], dora=True, layout={"m": layout})
    node = p["m"]["kernel"]
    assert node.spec.variant == "dora"
    fan_in = tuple(k for k, c in enumerate(layout) if c in "iwe")
    assert node.magnitude.shape == tuple(s for k, s in enumerate(shape) if k not in fan_in)
    np.testing.assert_allclose(lorajax.merge(p)["m"]["kernel"], w, rtol=0, atol=1e-6)  # starts at the base
    # Move every trainable leaf, then compare with the dense float64 formula.
    keys = jax.random.split(jax.random.key(1), 3)
    node = node.__class__(
        node.base,
        jax.random.normal(keys[0], node.a.shape),
        jax.random.normal(keys[1], node.b.shape),
        node.spec,
        magnitude=node.magnitude * (1 + 0.3 * jax.random.normal(keys[2], node.magnitude.shape)),
    )
    perm = [k for k in range(len(shape)) if k in fan_in] + [k for k in range(len(shape)) if k not in fan_in]
    wt = np.transpose(np.asarray(w), perm)  # (*fan_in, *fan_out) for the oracle
    want = dense_dora(wt, node.a, node.b, node.magnitude, node.scale, fan_in)
    got = np.transpose(np.asarray(lorajax.merge({"k": node})["k"]), perm)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_dora_magnitude_trains_and_the_norm_is_detached():
    w = jax.random.normal(jax.random.key(0), (5, 4))
    p = lorajax.lorafy({"m": {"kernel": w}}, rank=2, where=["m"], dora=True, init="gaussian")
    mask = lorajax.mask(p)["m"]["kernel"]
    assert mask.magnitude is True and mask.a is True and mask.base is False
    assert lorajax.summary(p).trainable == 5 * 2 + 2 * 4 + 4
    x = jax.random.normal(jax.random.key(2), (3, 5))
    cot = jax.random.normal(jax.random.key(3), (3, 4))
    grads = jax.grad(lambda p: ((x @ lorajax.merge(p)["m"]["kernel"]) * cot).sum())(p)["m"]["kernel"]
    # With n detached, y = (m/n) ⊙ (x (W + ΔW)) is linear in m: dL/dm_j = sum_i cot_ij (x V)_ij / n_j.
    node = p["m"]["kernel"]
    v = np.asarray(w, np.float64) + node.scale * np.asarray(node.a, np.float64) @ np.asarray(node.b, np.float64)
    n = np.sqrt((v**2).sum(0))
    np.testing.assert_allclose(grads.magnitude, ((np.asarray(x) @ v) * np.asarray(cot)).sum(0) / n, rtol=1e-5)
    assert float(jnp.abs(grads.base).max()) == 0.0
    # One optimizer step moves the magnitude and never the base.
    tx = lorajax.masked(optax.sgd(0.1))
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, p), tx.init(p), p)
    assert float(jnp.abs(updates["m"]["kernel"].magnitude).min()) > 0
    assert float(jnp.abs(updates["m"]["kernel"].base).max()) == 0.0


def test_dora_stacked_layers_get_one_magnitude_each_and_shard_like_fan_out():
    from jax.sharding import PartitionSpec as P

    w = jax.random.normal(jax.random.key(0), (3, 6, 4))
    p = lorajax.lorafy({"h": {"kernel": w}}, rank=2, where=["h"], dora=True, layout={"h": "sio"})
    node = p["h"]["kernel"]
    assert node.magnitude.shape == (3, 4)
    np.testing.assert_allclose(node.magnitude, np.sqrt((np.asarray(w) ** 2).sum(1)), rtol=1e-6)
    specs = lorajax.partition_specs(p, {"h": {"kernel": P("layers", "fsdp", "tp")}})
    assert specs["h"]["kernel"].magnitude == P("layers", "tp")
    trainable, frozen = lorajax.partition(p)
    assert frozen["h"]["kernel"].magnitude is None
    np.testing.assert_allclose(lorajax.merge(lorajax.combine(trainable, frozen))["h"]["kernel"], w, atol=1e-6)
    with pytest.raises(ValueError, match="no magnitude"):
        lorajax.merge(frozen)


def test_dora_merge_donated_equals_merge():
    w = jax.random.normal(jax.random.key(0), (6, 4))
    p = lorajax.lorafy({"m": {"kernel": w}}, rank=2, where=["m"], dora=True, init="gaussian")
    node = p["m"]["kernel"]
    moved = node.__class__(node.base, node.a, node.b + 0.3, node.spec, magnitude=node.magnitude * 1.5)
    p = {"m": {"kernel": moved}}
    got = np.asarray(lorajax.merge(p)["m"]["kernel"])
    copy = jax.tree.map(jnp.copy, p)
    donated = np.asarray(lorajax.merge(copy, donate=True)["m"]["kernel"])  # a jitted program: its own sum orders
    # Both against float64: v = W + s a b rounds a rank-2 sum and an add (gamma(4) of |W| + s|a||b|), then
    # g = m / ||v|| (a sum of 6 squares, a sqrt, a divide) and g * v: gamma(6 + 4) relative.
    w64, a64, b64, m64 = (np.asarray(x, np.float64) for x in (w, moved.a, moved.b, moved.magnitude))
    s = float(moved.scale)
    v = w64 + s * a64 @ b64
    g = m64 / np.sqrt((v**2).sum(0))
    bound = abs(g) * sum_bound(abs(w64) + s * abs(a64) @ abs(b64), 4) + sum_bound(abs(g * v), 6 + 4)
    assert_within(got, g * v, bound, "merge")
    assert_within(donated, g * v, bound, "merge(donate=True)")


# ---------------------------------------------------------------------------------------------------------------------
# Parity with files PEFT wrote (no torch needed). Flax linen twins of make_peft_fixtures.py's PyTorch models.


class GPT2(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            h = jnp.tanh(nn.Dense(12, name=f"c_attn_{i}")(x))
            x = x + nn.Dense(6, name=f"c_proj_{i}")(h)
        return x


class Conv2d(nn.Module):
    @nn.compact
    def __call__(self, x):  # (N, H, W, C): strided, asymmetric and 1x1 kernels
        x = jnp.tanh(nn.Conv(4, (3, 3), strides=(2, 2), padding=[(1, 1), (1, 1)], name="conv_a")(x))
        x = jnp.tanh(nn.Conv(3, (2, 3), strides=(1, 2), padding=[(0, 0), (1, 1)], name="conv_b")(x))
        return nn.Conv(3, (1, 1), name="conv_c")(x)


def _gpt2_name(path: str) -> str:  # "params/c_attn_1/kernel" -> "h.1.c_attn"
    module = path.removeprefix("params/").rpartition("/")[0]
    return re.sub(r"^(c_\w+)_(\d)$", r"h.\2.\1", module)


#: case -> (Flax model, name_map, (input permutation to Flax, output permutation back) or None)
SPECS = {
    "dora_linear": (MLP(), None, None),
    "dora_gpt2_conv1d": (GPT2(), _gpt2_name, None),
    "dora_conv1d": (Conv1d(), None, NCL),
    "dora_conv2d": (Conv2d(), None, NCHW),
    "dora_embedding": (Embedder(), None, None),
}
CASES = list(SPECS)


def flax_params(case: str, state: dict) -> dict:
    """Flax params from a PyTorch state dict, each layout converted by hand."""
    name = lambda module: (re.sub(r"^h\.(\d)\.(\w+)$", r"\2_\1", module),)  # "h.1.c_attn" -> "c_attn_1"
    return twin_params(state, name, in_out=case == "dora_gpt2_conv1d")


def torch_kernel(case: str, module: str, kernel: np.ndarray) -> np.ndarray:
    """A Flax kernel in PyTorch's layout (the inverse of flax_params)."""
    if module == "emb" or case == "dora_gpt2_conv1d":
        return kernel
    return np.transpose(kernel, (kernel.ndim - 1, kernel.ndim - 2, *range(kernel.ndim - 2)))


def apply(case: str, fn, params, x):
    model, _, perm = SPECS[case]
    return run_twin(fn(model.apply), perm, params, x)


def load_case(case: str, directory: Path | None = None):
    directory = FIXTURES / case if directory is None else directory
    base = flax_params(case, load_file(str(directory / "base.safetensors")))
    params = lorajax.load_peft(directory, base, name_map=SPECS[case][1])
    return base, params, load_file(str(FIXTURES / case / "io.safetensors"))


def merged_path(f):
    return lambda p, x: f(lorajax.merge(p), x)


@pytest.mark.parametrize("case", CASES)
def test_load_peft_dora_forward_and_merged_kernels_match_peft(case):
    base, params, io = load_case(case)
    nodes = [x for x in jax.tree.leaves(params, is_leaf=lorajax.is_lora) if lorajax.is_lora(x)]
    assert nodes and all(n.spec.variant == "dora" and n.magnitude is not None for n in nodes)
    y = apply(case, merged_path, params, io["x"])
    np.testing.assert_allclose(y, io["y"], rtol=RTOL, atol=ATOL)  # PEFT's unmerged forward
    np.testing.assert_allclose(y, io["y_merged"], rtol=RTOL, atol=ATOL)  # PEFT's merge_and_unload
    assert not np.allclose(apply(case, lambda f: f, base, io["x"]), io["y"], atol=1e-3)  # the adapter matters
    merged = lorajax.merge(params)["params"]
    namer = SPECS[case][1] or (lambda path: path.removeprefix("params/").rpartition("/")[0])
    for module, leaves in merged.items():
        leaf = "embedding" if "embedding" in leaves else "kernel"
        name = namer(f"params/{module}/{leaf}")
        got = torch_kernel(case, name, np.asarray(leaves[leaf]))
        np.testing.assert_allclose(got, io[f"merged.{name}"], rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("case", CASES)
def test_dora_gradients_of_a_b_and_magnitude_match_peft(case, tmp_path):
    _, params, io = load_case(case)
    cot = jnp.asarray(io["cotangent"])
    grads = jax.grad(lambda p: (apply(case, merged_path, p, io["x"]) * cot).sum())(params)
    # save_peft writes the gradient tree under PEFT's names and layouts (the conversion the forward test pins).
    lorajax.save_peft(tmp_path / "g", grads, name_map=SPECS[case][1], fan_in_fan_out=case == "dora_gpt2_conv1d")
    ours = load_file(str(tmp_path / "g" / "adapter_model.safetensors"))
    want = load_file(str(FIXTURES / case / "grads.safetensors"))
    assert sorted(ours) == sorted(want)
    assert any(k.endswith("lora_magnitude_vector") for k in want)
    for key in want:
        np.testing.assert_allclose(ours[key], want[key], rtol=RTOL, atol=ATOL, err_msg=key)


def factored_path(f):
    return lorajax.factored(f, strict=True)  # strict: W is formed nowhere


@pytest.mark.parametrize("case", CASES)
def test_factored_dora_forward_and_gradients_match_peft(case, tmp_path):
    _, params, io = load_case(case)
    np.testing.assert_allclose(apply(case, factored_path, params, io["x"]), io["y"], rtol=RTOL, atol=ATOL)
    cot = jnp.asarray(io["cotangent"])
    grads = jax.grad(lambda p: (apply(case, factored_path, p, io["x"]) * cot).sum())(params)
    lorajax.save_peft(tmp_path / "g", grads, name_map=SPECS[case][1], fan_in_fan_out=case == "dora_gpt2_conv1d")
    ours = load_file(str(tmp_path / "g" / "adapter_model.safetensors"))
    want = load_file(str(FIXTURES / case / "grads.safetensors"))
    for key in want:
        np.testing.assert_allclose(ours[key], want[key], rtol=RTOL, atol=ATOL, err_msg=key)


# ---------------------------------------------------------------------------------------------------------------------
# The factored path: equal to the merge path, no fan-in x fan-out temporary, sound numerics.


def test_factored_dora_training_step_forms_no_fan_in_by_fan_out_value():
    from _models import tiny_gpt

    model, params, tokens = tiny_gpt(d_model=24, batch=2, seq=5, vocab=40)
    lp = {"params": lorajax.lorafy(params, rank=2, where=lorajax.all_linear, dora=True, init="gaussian")}
    t, f = lorajax.partition(lp)
    kernels = [n.shape for n in jax.tree.leaves(lp, is_leaf=lorajax.is_lora) if lorajax.is_lora(n)]
    sizes = set()
    for s in kernels:  # fan-in x fan-out in any orientation or grouping: compare element counts and shapes
        sizes.add(int(np.prod(s)))
    activations = {tokens.size * k for k in (24, 40, 96, 1, 3)}  # (batch, seq, features) may share a size
    forbidden = sizes - activations

    def step(apply):
        return jax.make_jaxpr(jax.grad(lambda t: apply(lorajax.combine(t, f), tokens).mean()))(t)

    def big(jaxpr, consts):
        return sorted({s for s in computed_shapes(jaxpr) if int(np.prod(s)) in forbidden})

    mer = step(lambda p, x: model.apply(lorajax.merge(p), x))
    assert big(mer.jaxpr, mer.consts), "the check must be able to see W + ΔW in the merge path"
    fac = step(lorajax.factored(model.apply, strict=True))
    assert big(fac.jaxpr, fac.consts) == []
    grads = jax.grad(lambda t: lorajax.factored(model.apply)(lorajax.combine(t, f), tokens).mean())(t)
    want = jax.grad(lambda t: model.apply(lorajax.merge(lorajax.combine(t, f)), tokens).mean())(t)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_factored_norm_keeps_its_accuracy_when_the_update_is_tiny(dtype):
    # n² = ‖W‖² + 2s(Wᵀa)·b + s²·bᵀ(aᵀa)b adds two tiny terms to a large one: the cross term must still count.
    w = jax.random.normal(jax.random.key(0), (64, 16)).astype(dtype)
    p = lorajax.lorafy({"m": {"kernel": w}}, rank=4, where=["m"], dora=True)
    node = p["m"]["kernel"]
    b = 1e-4 * jax.random.normal(jax.random.key(1), node.b.shape)
    m = node.magnitude * (1 + 0.1 * jax.random.normal(jax.random.key(2), node.magnitude.shape))
    node = node.__class__(node.base, node.a, b, node.spec, magnitude=m)
    x = jax.random.normal(jax.random.key(3), (8, 64)).astype(dtype)
    # float64 oracle on the very same (rounded) inputs: y = x (m/n)(W + s a b).
    k = dense_dora(np.asarray(w, np.float64), node.a, b, m, node.scale, (0,))
    want = np.asarray(x, np.float64) @ k
    fac = np.asarray(lorajax.factored(lambda p, x: x @ p["m"]["kernel"])({"m": {"kernel": node}}, x), np.float64)
    mer = np.asarray(x @ lorajax.merge({"m": {"kernel": node}})["m"]["kernel"], np.float64)
    # The factored gain g = m/n must be as accurate as the dense norm: compare g through the output of the
    # LoRA-free part (x W is computed in the input dtype by both paths).
    tol = 2e-6 if dtype == jnp.float32 else 2e-2  # bf16 activations and products: ~3 significant digits
    scale = np.abs(want).max()
    assert np.abs(fac - want).max() / scale < tol
    assert np.abs(mer - want).max() / scale < tol
    # The gains themselves, through the public factored path on an identity input (float32 x, no rounding of g).
    eye = jnp.eye(64, dtype=jnp.float32)
    wf = np.asarray(w, np.float64)
    if dtype == jnp.float32:
        kf = np.asarray(lorajax.factored(lambda p, x: x @ p["m"]["kernel"])({"m": {"kernel": node}}, eye))
        np.testing.assert_allclose(kf, k, rtol=1e-6, atol=1e-7 * np.abs(wf).max())


# ---------------------------------------------------------------------------------------------------------------------
# Files: save_peft, native adapter files; errors.


@pytest.mark.parametrize("case", CASES)
def test_save_peft_dora_round_trip_is_bit_exact(case, tmp_path):
    _, params, _ = load_case(case)
    config = lorajax.save_peft(
        tmp_path / "a", params, name_map=SPECS[case][1], fan_in_fan_out=case == "dora_gpt2_conv1d"
    )
    assert config["use_dora"] is True
    ours = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    want = load_file(str(FIXTURES / case / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(want)
    for key in want:
        assert ours[key].shape == want[key].shape, key
        np.testing.assert_array_equal(ours[key], want[key], err_msg=key)


def test_native_adapter_file_keeps_the_magnitude(tmp_path):
    base, params, io = load_case("dora_linear")
    lorajax.save_adapter(tmp_path / "a.safetensors", params)
    back = lorajax.load_adapter(tmp_path / "a.safetensors", base)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(apply("dora_linear", merged_path, back, io["x"]), io["y"], rtol=RTOL, atol=ATOL)
    ad = lorajax.adapter(params)
    assert ad["params/fc1/kernel"].magnitude.shape == (8,)
    np.testing.assert_array_equal(
        lorajax.merge(lorajax.attach(base, ad))["params"]["fc1"]["kernel"],
        lorajax.merge(params)["params"]["fc1"]["kernel"],
    )


def test_dora_adapters_refuse_linear_operations():
    # Banks hold DoRA adapters (tests/test_bank.py); what adds or subtracts updates linearly refuses them.
    base, params, _ = load_case("dora_linear")
    with pytest.raises(ValueError, match=r"combine_adapters: .*fc1/kernel.*DoRA.*not linear"):
        lorajax.combine_adapters([params, params], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"combine_adapters: .*fc1/kernel.*DoRA.*not linear"):
        lorajax.combine_adapters([params, params], [0.5, 0.5], method="svd", rank=1)
    with pytest.raises(ValueError, match=r"swap: .*DoRA.*cannot be subtracted"):
        lorajax.swap(lorajax.merge(params), params, None)
    with pytest.raises(ValueError, match=r"swap: .*DoRA.*cannot be subtracted"):
        lorajax.swap(lorajax.merge(params), None, params)
    lorajax.stack_adapters([params], base=base)


@pytest.mark.parametrize(("shape", "layout"), [((6, 5), "io"), ((3, 3, 4, 5), "wwio"), ((6, 2, 3), "ioo")])
def test_delta_of_a_dora_node_is_its_effective_update(shape, layout):
    w = jax.random.normal(jax.random.key(0), shape)
    p = lorajax.lorafy({"m": {"kernel": w}}, rank=2, alpha=3.0, where=["m"], dora=True, layout={"m": layout})
    keys = jax.random.split(jax.random.key(1), 3)
    node = p["m"]["kernel"]
    node = node.__class__(
        node.base,
        jax.random.normal(keys[0], node.a.shape),
        0.3 * jax.random.normal(keys[1], node.b.shape),
        node.spec,
        magnitude=node.magnitude * (1 + 0.3 * jax.random.normal(keys[2], node.magnitude.shape)),
    )
    fan_in = tuple(k for k, c in enumerate(layout) if c in "iw")
    perm = [k for k in range(len(shape)) if k in fan_in] + [k for k in range(len(shape)) if k not in fan_in]
    wt = np.transpose(np.asarray(w, np.float64), perm)  # (*fan_in, *fan_out) for the oracle
    want = dense_dora(wt, node.a, node.b, node.magnitude, node.scale, fan_in) - wt
    got = np.transpose(np.asarray(lorajax.delta(node)), perm)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w + lorajax.delta(node), lorajax.merge({"k": node})["k"], rtol=0, atol=1e-6)
    plain = np.transpose(
        np.asarray(lorajax.delta(node.__class__(node.base, node.a, node.b, node.spec.replace(variant="lora")))), perm
    )
    assert np.max(np.abs(got - plain)) > 1e-2  # not the plain scale * a @ b: the check can fail
    g = jax.grad(lambda n: lorajax.delta(n).sum(), allow_int=True)(node)
    assert float(jnp.abs(g.base).max()) == 0.0 and float(jnp.abs(g.magnitude).max()) > 0.0
    with pytest.raises(ValueError, match=re.escape(f"of shape {shape} has no magnitude, so it has no update")):
        lorajax.delta(node.__class__(node.base, node.a, node.b, node.spec))


def _copy(tmp_path: Path, case: str = "dora_linear") -> Path:
    import shutil

    out = tmp_path / case
    shutil.copytree(FIXTURES / case, out)
    return out


def test_load_peft_dora_errors_name_the_module(tmp_path):
    d = _copy(tmp_path)
    tensors = load_file(str(d / "adapter_model.safetensors"))
    from safetensors.numpy import save_file

    tensors["base_model.model.fc1.lora_magnitude_vector"] = np.ones((1, 8), np.float32)  # wrong shape
    del tensors["base_model.model.fc2.lora_magnitude_vector"]  # missing
    save_file(tensors, str(d / "adapter_model.safetensors"))
    base = flax_params("dora_linear", load_file(str(d / "base.safetensors")))
    with pytest.raises(ValueError, match=r"(?s)fc1: DoRA magnitude .* shape \(1, 8\).*\(8,\).*fc2: .*use_dora"):
        lorajax.load_peft(d, base)
    # A DoRA adapter onto a base it was not made for: the shapes say so, per module.
    wrong = jax.tree.map(lambda x: x, base)
    wrong["params"]["fc1"]["kernel"] = jnp.zeros((6, 9))
    with pytest.raises(ValueError, match=r"params/fc1/kernel.*\(6, 9\)"):
        lorajax.load_peft(FIXTURES / "dora_linear", wrong)


def test_native_adapter_file_with_a_wrong_magnitude_is_refused(tmp_path):
    base, params, _ = load_case("dora_linear")
    node = params["params"]["fc1"]["kernel"]
    bad = jax.tree.map(lambda x: x, params)
    bad["params"]["fc1"]["kernel"] = node.__class__(node.base, node.a, node.b, node.spec, magnitude=node.magnitude[:5])
    with pytest.raises(ValueError, match=r"params/fc1/kernel.*magnitude of shape \(8,\).*\(5,\)"):
        lorajax.attach(base, lorajax.adapter(bad))


@pytest.mark.torch
def test_peft_loads_our_dora_save_and_reproduces_its_forward(tmp_path):
    import torch
    from peft import PeftModel

    script = _fixture_script()
    targets = {"dora_linear": ["fc1", "fc2"], "dora_conv2d": ["conv_a", "conv_b", "conv_c"], "dora_embedding": ["emb"]}
    for case, where in targets.items():
        base, _, io = load_case(case)
        p = lorajax.lorafy(base, rank=2, where=where, dora=True, init="gaussian")
        moved = jax.tree.map(  # fresh nodes, moved away from their init
            lambda n: (
                n.__class__(n.base, n.a, n.b + 0.3, n.spec, magnitude=n.magnitude * 1.2) if lorajax.is_lora(n) else n
            ),
            p,
            is_leaf=lorajax.is_lora,
        )
        out = tmp_path / case
        lorajax.save_peft(out, moved, name_map=SPECS[case][1])
        torch_base = script.plain_fixtures().base_model(script.CASES[case][0])
        pm = PeftModel.from_pretrained(torch_base, str(out)).eval()
        with torch.no_grad():
            y = pm(torch.from_numpy(np.asarray(io["x"]))).numpy()
        np.testing.assert_allclose(apply(case, merged_path, moved, io["x"]), y, rtol=RTOL, atol=ATOL, err_msg=case)


def _fixture_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_dora_fixtures", FIXTURES.parent / "make_dora_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_factored_dora_dropout_follows_peft_formula():
    # PEFT: y = x W + (g - 1) ⊙ (drop(x) W) + g ⊙ s (drop(x) A) B.
    d, rate = 6, 0.5
    x = jax.random.normal(jax.random.key(0), (4, d)) + 3.0  # no zeros in x: dropped entries are exactly zero
    key = jax.random.key(7)
    fn = lorajax.factored(lambda p, x: x @ p["m"]["kernel"], dropout=rate)
    # With W = I, b = 0 and m = c * ‖W‖ (so g = c): y = x + (c - 1) drop(x), and drop(x) must be x masked / keep.
    p = lorajax.lorafy({"m": {"kernel": jnp.eye(d)}}, rank=2, where=["m"], dora=True)
    node = p["m"]["kernel"]
    c = 3.0
    p = {"m": {"kernel": node.__class__(node.base, node.a, node.b, node.spec, magnitude=c * node.magnitude)}}
    dropped = (np.asarray(fn(p, x, lora_rng=key)) - np.asarray(x)) / (c - 1)
    kept = np.isclose(dropped, np.asarray(x) / (1 - rate), rtol=1e-5)
    assert (kept | np.isclose(dropped, 0.0, atol=1e-5)).all() and 0 < kept.sum() < kept.size
    np.testing.assert_allclose(fn(p, x, lora_deterministic=True), c * np.asarray(x), rtol=1e-6)
    # With g = 1 (m = n) DoRA is plain LoRA, dropout mask included (same key, same draw).
    w = jax.random.normal(jax.random.key(1), (d, 5))
    plain = lorajax.lorafy({"m": {"kernel": w}}, rank=2, where=["m"], init="gaussian")
    n0 = plain["m"]["kernel"]
    plain = {"m": {"kernel": n0.__class__(n0.base, n0.a, n0.b + 0.5, n0.spec)}}
    v = np.asarray(w, np.float64) + n0.scale * np.asarray(n0.a, np.float64) @ (np.asarray(n0.b, np.float64) + 0.5)
    spec = n0.spec.replace(variant="dora")
    m = jnp.asarray(np.sqrt((v**2).sum(0)), jnp.float32)
    dora = {"m": {"kernel": n0.__class__(n0.base, n0.a, n0.b + 0.5, spec, magnitude=m)}}
    np.testing.assert_allclose(fn(dora, x, lora_rng=key), fn(plain, x, lora_rng=key), rtol=1e-5, atol=1e-5)


def _our_scaled_mask(shape, rate, key, conv):
    """The dropout ``factored(dropout=rate)`` applies, as ``drop(x) / x``, read through the public API.

    The mask depends on the key, the node and the input's shape only, so a probe model with the same input shape and
    one DoRA node whose kernel is the identity (b = 0, m = c·‖W‖, so g = c) shows it: ``y = x + (c - 1)·drop(x)``.
    """
    c, ch = 3.0, shape[-1]
    if conv:  # an identity convolution of window 1 (NWC or NHWC)
        nd = len(shape) - 2
        kernel, layout = jnp.eye(ch).reshape((1,) * nd + (ch, ch)), {".*": "w" * nd + "io"}
        dn = ("NHWC", "HWIO", "NHWC") if nd == 2 else ("NWC", "WIO", "NWC")
        call = lambda p, x: jax.lax.conv_general_dilated(x, p["m"]["kernel"], (1,) * nd, "VALID", dimension_numbers=dn)
    else:
        kernel, layout = jnp.eye(ch), None
        call = lambda p, x: x @ p["m"]["kernel"]
    node = lorajax.lorafy({"m": {"kernel": kernel}}, rank=2, where=["m"], dora=True, layout=layout)["m"]["kernel"]
    probe = {"m": {"kernel": node.__class__(node.base, node.a, node.b, node.spec, magnitude=c * node.magnitude)}}
    y = lorajax.factored(call, dropout=rate)(probe, jnp.ones(shape), lora_rng=key)
    return (np.asarray(y) - 1.0) / (c - 1)


class _Conv(nn.Module):
    nd: int = 2

    @nn.compact
    def __call__(self, x):  # NWC or NHWC, strided
        return nn.Conv(4, (3,) * self.nd, strides=(2,) * self.nd, padding=[(1, 1)] * self.nd, name="conv")(x)


class _Dense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="fc")(x)


def _dora_abs_terms(pm, module, nd, x, mask, cot):
    """PEFT's DoRA forward with dropout (norm detached) and its gradients, run on absolute values in float64.

    ``y = base(x) + (g - 1) * conv(x * mask, W) + g * s * B(A(x * mask))``, ``g = m / ||W + s B A||``: the terms of
    every sum of ``y`` and of the gradients of A, B and m, as |values|; the gradients through autograd of the
    same expression with |A|, |B| as leaves (for a bilinear form of nonnegative values, each gradient entry is the
    sum of its terms' absolute values).
    """
    import torch.nn.functional as F

    prm = {k.rsplit(f"{module}.", 1)[-1]: v.detach() for k, v in pm.named_parameters()}
    w, bias = prm["base_layer.weight"], prm["base_layer.bias"]
    a, b, m = prm["lora_A.default.weight"], prm["lora_B.default.weight"], prm["lora_magnitude_vector.default.weight"]
    s = getattr(pm.base_model.model, module).scaling["default"]
    layer = getattr(pm.base_model.model, module).base_layer
    if nd:
        conv = getattr(F, f"conv{nd}d")
        op = lambda h, k: conv(h, k, stride=layer.stride, padding=layer.padding)
        op_b = lambda h, k: conv(h, k)
    else:
        op = op_b = F.linear
    v = w + s * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(w.shape)
    norm = v.reshape(v.shape[0], -1).norm(dim=1)
    shape = (-1,) + (1,) * nd  # per output channel
    g = (m.reshape(-1) / norm).reshape(shape)
    xa, xd, ca = x.double().abs(), (x.double() * mask.double()).abs(), cot.double().abs()
    a_l, b_l = a.abs().clone().requires_grad_(True), b.abs().clone().requires_grad_(True)
    lora = op_b(op(xd, a_l), b_l)
    base = op(xd, w.abs())
    y = op(xa, w.abs()) + bias.abs().reshape(shape) + (g - 1).abs() * base + g.abs() * s * lora
    (ca * g.abs() * s * lora).sum().backward()
    grad_m = (ca * (base + s * lora.detach()) / norm.reshape(shape)).transpose(0, 1).reshape(w.shape[0], -1).sum(1)
    grads = {"lora_A": a_l.grad.numpy(), "lora_B": b_l.grad.numpy(), "magnitude": grad_m.reshape(m.shape).numpy()}
    return y.detach().numpy(), grads, w[0].numel(), y[:, 0].numel()


@pytest.mark.torch
@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_factored_dora_with_a_fixed_dropout_mask_matches_peft(kind, tmp_path):
    """PEFT's DoRA in training mode with its dropout replaced by our mask: forward and grads of A, B, m."""
    import copy

    import torch
    from peft import PeftModel

    rate, key = 0.4, jax.random.key(3)
    nd = {"linear": 0, "conv1d": 1, "conv2d": 2}[kind]
    conv = nd > 0
    model, module = (_Conv(nd), "conv") if conv else (_Dense(), "fc")
    x = jax.random.normal(jax.random.key(0), (2,) + (6,) * nd + (3,) if conv else (4, 6))
    base = model.init(jax.random.key(1), x)
    p = lorajax.lorafy(base, rank=2, alpha=3.0, where=[module], dora=True, init="gaussian")
    p = jax.tree.map(  # moved away from the init: b nonzero, m not the norm
        lambda n: n.__class__(n.base, n.a, n.b + 0.3, n.spec, magnitude=n.magnitude * 1.2) if lorajax.is_lora(n) else n,
        p,
        is_leaf=lorajax.is_lora,
    )
    scaled = _our_scaled_mask(x.shape, rate, key, conv)
    kept = np.isclose(scaled, 1 / (1 - rate), rtol=1e-5)
    assert (kept | np.isclose(scaled, 0.0, atol=1e-5)).all() and 0 < kept.sum() < kept.size  # a real mask
    fn = lorajax.factored(model.apply, dropout=rate)
    cot = jax.random.normal(jax.random.key(2), model.apply(base, x).shape)
    y = fn(p, x, lora_rng=key)
    grads = jax.grad(lambda q: (fn(q, x, lora_rng=key) * cot).sum())(p)
    # Without the mask (dropout off) the output differs: the comparison below sees the mask.
    assert not np.allclose(fn(p, x, lora_deterministic=True), y, atol=1e-3)

    # PyTorch: the same base, our adapter loaded by PEFT, its dropout replaced by our mask (NCHW for the conv).
    to_nc = (0, nd + 1) + tuple(range(1, nd + 1))  # channels-last -> channels-first
    t = lambda a: torch.from_numpy(np.ascontiguousarray(np.transpose(a, to_nc) if conv else a, np.float32))
    w = np.asarray(base["params"][module]["kernel"])
    layer = {0: torch.nn.Linear(6, 5), 1: torch.nn.Conv1d(3, 4, 3, 2, 1), 2: torch.nn.Conv2d(3, 4, 3, 2, 1)}[nd]
    with torch.no_grad():  # (*window, in, out) -> (out, in, *window)
        layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(np.transpose(w, (nd + 1, nd) + tuple(range(nd))))))
        layer.bias.copy_(torch.from_numpy(np.asarray(base["params"][module]["bias"])))
    torch_base = torch.nn.Sequential()
    torch_base.add_module(module, layer)
    lorajax.save_peft(tmp_path / "adapter", p)
    pm = PeftModel.from_pretrained(torch_base, str(tmp_path / "adapter"), is_trainable=True)
    mask = t(scaled)

    class FixedDropout(torch.nn.Module):
        def forward(self, h):
            return h * mask

    getattr(pm.base_model.model, module).lora_dropout["default"] = FixedDropout()
    pm.train()
    pm64 = copy.deepcopy(pm).double()  # the reference: PEFT's same computation in float64
    yt = pm(t(np.asarray(x)))
    (yt * t(np.asarray(cot))).sum().backward()
    y64 = pm64(t(np.asarray(x)).double())
    (y64 * t(np.asarray(cot)).double()).sum().backward()
    # Both float32 results against float64: sum_bound of the same computation on absolute values (_dora_abs_terms),
    # over the longest chain of roundings: the kernel's norm (fan-in, sqrt, divide), the forward (fan-in + rank),
    # the backward's sums over the output positions and channels, the probe mask's few roundings.
    abs_y, abs_grads, fan, positions = _dora_abs_terms(pm64, module, nd, t(np.asarray(x)), mask, t(np.asarray(cot)))
    n = 2 * fan + 2 + positions + yt.shape[1 if conv else -1] + 2 * p["params"][module]["kernel"].a.shape[-1] + 8 + 8
    bound = sum_bound(abs_y, n)
    assert_within(t(np.asarray(y)).numpy(), y64.detach().numpy(), bound, f"{kind}: lorajax y")
    assert_within(yt.detach().numpy(), y64.detach().numpy(), bound, f"{kind}: PEFT y")
    lorajax.save_peft(tmp_path / "g", grads)  # the gradient tree under PEFT's names and layouts
    ours = load_file(str(tmp_path / "g" / "adapter_model.safetensors"))
    peft_name = lambda name: name.replace(".default", "").replace("magnitude_vector.weight", "magnitude_vector")
    theirs = {peft_name(name): v.grad.numpy() for name, v in pm.named_parameters() if v.grad is not None}
    ref = {peft_name(name): v.grad.numpy() for name, v in pm64.named_parameters() if v.grad is not None}
    assert sorted(theirs) == sorted(ours) == sorted(ref) and any("magnitude" in k for k in ours)
    for name, g in theirs.items():
        part = next(k for k in abs_grads if k in name)
        bound, want = sum_bound(abs_grads[part], n).reshape(ours[name].shape), ref[name].reshape(ours[name].shape)
        assert_within(ours[name], want, bound, f"{kind}: lorajax {name}")
        assert_within(g.reshape(ours[name].shape), want, bound, f"{kind}: PEFT {name}")


def test_factored_dora_through_scan_equals_merge():
    w = jax.random.normal(jax.random.key(0), (3, 8, 8)) * 0.3
    p = lorajax.lorafy({"h": {"kernel": w}}, rank=2, where=["h"], dora=True, layout={"h": "sio"}, init="gaussian")
    n = p["h"]["kernel"]
    p = {"h": {"kernel": n.__class__(n.base, n.a, n.b + 0.2, n.spec, magnitude=n.magnitude * 1.3)}}

    def f(p, x):  # the stacked layers run by lax.scan, as nn.scan does: g rides through the per-layer slices
        return jax.lax.scan(lambda x, k: (jnp.tanh(x @ k), None), x, p["h"]["kernel"])[0]

    x = jax.random.normal(jax.random.key(1), (4, 8))
    fac = lorajax.factored(f, strict=True)
    np.testing.assert_allclose(fac(p, x), f(lorajax.merge(p), x), rtol=1e-5, atol=1e-6)
    g1 = jax.grad(lambda p: fac(p, x).sum())(p)
    g2 = jax.grad(lambda p: f(lorajax.merge(p), x).sum())(p)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_dora_on_a_quantized_base_uses_the_dequantized_kernel():
    w = jax.random.normal(jax.random.key(0), (64, 32))
    q = lorajax.quantize({"fc": {"kernel": w}}, where=["fc"], dtype="nf4")
    wd = np.asarray(lorajax.dequantize(q)["fc"]["kernel"])
    p = lorajax.lorafy(q, rank=2, where=["fc"], dora=True, init="gaussian")
    np.testing.assert_allclose(lorajax.merge(p)["fc"]["kernel"], wd, atol=1e-6)  # starts at the dequantized base
    n = p["fc"]["kernel"]
    p = {"fc": {"kernel": n.__class__(n.base, n.a, n.b + 0.3, n.spec, magnitude=n.magnitude * 1.2)}}
    n = p["fc"]["kernel"]
    want = dense_dora(wd, n.a, n.b, n.magnitude, n.scale, (0,))
    np.testing.assert_allclose(lorajax.merge(p)["fc"]["kernel"], want, rtol=1e-5, atol=1e-6)
    x = jax.random.normal(jax.random.key(1), (4, 64))
    y = lorajax.factored(lambda p, x: x @ p["fc"]["kernel"], strict=True)(p, x)
    np.testing.assert_allclose(y, np.asarray(x, np.float64) @ want, rtol=1e-4, atol=1e-4)
