"""PEFT interop: load_peft / save_peft against Hugging Face PEFT's own files and forward passes.

Two halves:

- Without torch: the committed fixtures in tests/fixtures/peft/<case>/ (written by PEFT through
  tests/fixtures/make_peft_fixtures.py) are loaded into Flax linen twins of the PyTorch models; the
  Flax outputs must equal the outputs PEFT computed (stored in io.safetensors), unmerged and merged.
- With torch + peft (``pytest.importorskip``): the fixtures regenerate bit for bit, lorajax's deltas
  equal PEFT's ``get_delta_weight``, and adapters written by ``save_peft`` load into
  ``PeftModel.from_pretrained`` and give lorajax's outputs.

Tolerances: float32 throughout; outputs within rtol 1e-5, atol 1e-5 (the two frameworks sum in different
orders); factors round-trip bit-exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _peft_twins import MLP, NCHW, NCL, Conv1d, Embedder, run_twin, twin_params
from _tolerances import assert_within, order_bound
from safetensors.numpy import load_file, save_file

import lorajax

FIXTURES = Path(__file__).parent / "fixtures" / "peft"
RTOL = ATOL = 1e-5


def _fixture_script():
    spec = importlib.util.spec_from_file_location(
        "make_peft_fixtures", Path(__file__).parent / "fixtures" / "make_peft_fixtures.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------------------
# Flax linen twins of the PyTorch models in make_peft_fixtures.py.


class GPT2Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(6, name="c_proj")(jnp.tanh(nn.Dense(12, name="c_attn")(x)))


class GPT2(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = GPT2Block(name=f"h_{i}")(x)
        return x


class Conv2d(nn.Module):
    @nn.compact
    def __call__(self, x):  # (N, H, W, C); modules keep linen's automatic names Conv_0..2
        x = jnp.tanh(nn.Conv(4, (3, 3), strides=(2, 2), padding=[(1, 1), (1, 1)])(x))
        x = jnp.tanh(nn.Conv(3, (2, 3), strides=(1, 2), padding=[(0, 0), (1, 1)])(x))
        return nn.Conv(3, (1, 1))(x)


def _gpt2_names(path: str) -> str:
    # A callable name_map: "params/h_0/c_attn/kernel" -> "h.0.c_attn" (linen's "h_0" is PyTorch's ModuleList "h.0").
    module = path.removeprefix("params/").rpartition("/")[0]
    return re.sub(r"^h_(\d+)", r"h.\1", module).replace("/", ".")


def peft_pattern_key(pattern: dict, module: str) -> str | None:
    """PEFT's documented rank_pattern/alpha_pattern rule, written out here as the tests' own oracle.

    The first key whose regex matches the whole dotted module name, or a part of it that follows a '.'
    (``peft.utils.other.get_pattern_key``; PEFT falls back to the defaults where no key matches).
    """
    return next((key for key in pattern if re.match(rf"(.*\.)?({key})$", module)), None)


_CONV2D_NAMES = {"Conv_0": "conv_a", "params/Conv_1": "conv_b", "Conv_2/kernel": "conv_c"}  # a dict name_map

#: case -> (Flax model, name_map, (input permutation to Flax, output permutation back) or None)
SPECS = {
    "linear": (MLP(), None, None),
    "gpt2_conv1d": (GPT2(), _gpt2_names, None),
    "conv1d": (Conv1d(), None, NCL),
    "conv2d": (Conv2d(), _CONV2D_NAMES, NCHW),
    "embedding": (Embedder(), None, None),
    "rslora": (MLP(), None, None),
}
CASES = list(SPECS)


def _flax_path(case: str, module: str) -> tuple[str, ...]:
    """Flax module path of a PyTorch module name (inverse of the case's name_map)."""
    if case == "gpt2_conv1d":
        return tuple(re.sub(r"^h\.(\d+)", r"h_\1", module).split("."))
    if case == "conv2d":
        return ({"conv_a": "Conv_0", "conv_b": "Conv_1", "conv_c": "Conv_2"}[module],)
    return tuple(module.split("."))


def flax_params(case: str, state: dict[str, np.ndarray]) -> dict:
    """Flax params from a PyTorch state dict, converting each layout by hand."""
    return twin_params(state, lambda module: _flax_path(case, module), in_out=case == "gpt2_conv1d")


def run(case: str, params, x: np.ndarray) -> np.ndarray:
    model, _, perm = SPECS[case]
    return np.asarray(run_twin(model.apply, perm, params, x))


def run_lora(case: str, params, x: np.ndarray) -> np.ndarray:
    """The output of lorafied params through the merge path."""
    return run(case, lorajax.merge(params), x)


def run_factored(case: str, params, x: np.ndarray) -> np.ndarray:
    """The output of lorafied params through lorajax.factored (x @ W0 + s * (x @ A) @ B; strict: no merge anywhere)."""
    model, _, perm = SPECS[case]
    return np.asarray(run_twin(lorajax.factored(model.apply, strict=True), perm, params, x))


def load_fixture(case: str, directory: Path | None = None):
    directory = FIXTURES / case if directory is None else directory
    base = flax_params(case, load_file(str(directory / "base.safetensors")))
    io = load_file(str(directory / "io.safetensors"))
    return base, io


def nodes(params) -> dict[str, lorajax.LoRA]:
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=lorajax.is_lora)[0]
    return {lorajax.path_str(p): x for p, x in leaves if lorajax.is_lora(x)}


# ---------------------------------------------------------------------------------------------------------------------
# Committed fixtures, no torch needed.


@pytest.mark.parametrize("case", CASES)
def test_load_peft_fixture_matches_peft_outputs(case):
    base, io = load_fixture(case)
    params = lorajax.load_peft(FIXTURES / case, base, name_map=SPECS[case][1])
    y = run_lora(case, params, io["x"])
    np.testing.assert_allclose(y, io["y"], rtol=RTOL, atol=ATOL)  # PEFT unmerged forward
    np.testing.assert_allclose(y, io["y_merged"], rtol=RTOL, atol=ATOL)  # PEFT merge_and_unload
    np.testing.assert_allclose(run_factored(case, params, io["x"]), io["y"], rtol=RTOL, atol=ATOL)
    # The base alone differs clearly, so the adapter is really in use.
    assert np.abs(run(case, base, io["x"]) - io["y"]).max() > 1e-2


@pytest.mark.parametrize("case", CASES)
def test_load_peft_onto_pytorch_layout_params(case):
    """Equinox/PyTorch-style params (``weight`` (out, in, *k)): merged weights equal W + scaling * B @ A by hand."""
    state = load_file(str(FIXTURES / case / "base.safetensors"))
    tensors = load_file(str(FIXTURES / case / "adapter_model.safetensors"))
    config = json.loads((FIXTURES / case / "adapter_config.json").read_text())
    params: dict = {}
    for key, value in state.items():
        *module, leaf = key.split(".")
        node = params
        for part in module:
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(value)
    merged = lorajax.merge(lorajax.load_peft(FIXTURES / case, params))
    for key, w in state.items():
        module, leaf = key.rsplit(".", 1)
        got = np.asarray(functools.reduce(lambda d, k: d[k], key.split("."), merged))
        prefix = f"base_model.model.{module}."
        if leaf != "weight" or not any(k.startswith(prefix) for k in tensors):
            np.testing.assert_array_equal(got, w)  # untouched
            continue
        emb = prefix + "lora_embedding_A" in tensors
        A = tensors[prefix + ("lora_embedding_A" if emb else "lora_A.weight")]
        B = tensors[prefix + ("lora_embedding_B" if emb else "lora_B.weight")]
        r = A.shape[0]
        key_a = peft_pattern_key(config["alpha_pattern"], module)
        alpha = config["alpha_pattern"][key_a] if key_a is not None else config["lora_alpha"]
        scaling = alpha / (np.sqrt(r) if config["use_rslora"] else r)
        d = (B.reshape(B.shape[0], r) @ A.reshape(r, -1)).reshape(B.shape[0], *A.shape[1:])
        if emb or case == "gpt2_conv1d":  # Embedding weight (num, dim); Conv1D weight (in, out)
            d = d.T
        np.testing.assert_allclose(got, w + scaling * d, rtol=RTOL, atol=1e-6)


def test_load_peft_ranks_and_alphas_follow_peft_patterns():
    base, _ = load_fixture("gpt2_conv1d")
    got = {
        k: (n.rank, n.alpha, n.layout.axes)
        for k, n in nodes(lorajax.load_peft(FIXTURES / "gpt2_conv1d", base, name_map=_gpt2_names)).items()
    }
    # config: r=2, lora_alpha=4, rank_pattern {"c_proj": 3, "h\.1\.c_attn": 4},
    # alpha_pattern {"c_attn": 8, "h.0.c_proj": 5}
    assert got == {
        "params/h_0/c_attn/kernel": (2, 8.0, "io"),
        "params/h_0/c_proj/kernel": (3, 5.0, "io"),
        "params/h_1/c_attn/kernel": (4, 8.0, "io"),
        "params/h_1/c_proj/kernel": (3, 4.0, "io"),
    }


def test_load_peft_rslora_scale():
    base, _ = load_fixture("rslora")
    for node in nodes(lorajax.load_peft(FIXTURES / "rslora", base)).values():
        assert node.rslora and node.rank == 4 and node.scale == pytest.approx(2 / 2.0)  # alpha / sqrt(r)


def test_load_peft_conv_and_embedding_layouts():
    base, _ = load_fixture("conv2d")
    got = {
        k: (n.layout.axes, n.a.shape, n.b.shape)
        for k, n in nodes(lorajax.load_peft(FIXTURES / "conv2d", base, name_map=_CONV2D_NAMES)).items()
    }
    assert got["params/Conv_0/kernel"] == ("wwio", (3, 3, 2, 2), (2, 4))
    assert got["params/Conv_1/kernel"] == ("wwio", (2, 3, 4, 3), (3, 3))
    base, _ = load_fixture("embedding")
    emb = nodes(lorajax.load_peft(FIXTURES / "embedding", base))["params/emb/embedding"]
    assert (emb.layout.axes, emb.a.shape, emb.b.shape) == ("eo", (10, 3), (3, 6))


@pytest.mark.parametrize("case", CASES)
def test_save_peft_round_trip_is_bit_exact(case, tmp_path):
    base, io = load_fixture(case)
    params = lorajax.load_peft(FIXTURES / case, base, name_map=SPECS[case][1])
    config = lorajax.save_peft(tmp_path / "out", params, name_map=SPECS[case][1])
    ours, theirs = (
        load_file(str(tmp_path / "out" / "adapter_model.safetensors")),
        load_file(str(FIXTURES / case / "adapter_model.safetensors")),
    )
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape
        np.testing.assert_array_equal(ours[k], theirs[k])
    # Every module resolves to the same rank and alpha under PEFT's rule, whatever keys were chosen.
    original = json.loads((FIXTURES / case / "adapter_config.json").read_text())
    for module in config["target_modules"]:
        for pattern, default in (("rank_pattern", "r"), ("alpha_pattern", "lora_alpha")):

            def resolve(cfg):
                key = peft_pattern_key(cfg[pattern], module)
                return cfg[pattern][key] if key is not None else cfg[default]

            assert resolve(config) == resolve(original), (module, pattern)
    assert config["use_rslora"] == original["use_rslora"]
    again = lorajax.load_peft(tmp_path / "out", base, name_map=SPECS[case][1])
    chex.assert_trees_all_equal(again, params)
    np.testing.assert_allclose(run_lora(case, again, io["x"]), io["y"], rtol=RTOL, atol=ATOL)


def test_save_peft_anchors_pattern_keys_that_would_match_other_modules(tmp_path):
    # "fc" would match "block.fc" too under PEFT's suffix rule, so its key must be anchored.
    p = {
        "params": {
            "fc": {"kernel": jnp.ones((6, 5))},
            "block": {"fc": {"kernel": jnp.ones((6, 5))}},
            "out": {"kernel": jnp.ones((5, 4))},
        }
    }
    p = lorajax.lorafy(
        p,
        rank=2,
        where=["fc", "out"],
        key=jax.random.key(0),
        rank_pattern={"params/fc/kernel": 3},
        alpha_pattern={"block/fc": 7.0},
        alpha=2.0,
    )
    config = lorajax.save_peft(tmp_path / "a", p)
    assert config["r"] == 2 and config["lora_alpha"] == 2
    (rkey,) = config["rank_pattern"]
    assert rkey != "fc" and config["alpha_pattern"] == {"block.fc": 7}
    assert peft_pattern_key(config["rank_pattern"], "fc") == rkey
    assert peft_pattern_key(config["rank_pattern"], "block.fc") is None
    back = nodes(lorajax.load_peft(tmp_path / "a", lorajax.unlorafy(p)))
    assert {k: (n.rank, n.alpha) for k, n in back.items()} == {k: (n.rank, n.alpha) for k, n in nodes(p).items()}


def test_save_peft_mixed_rslora_keeps_every_scale(tmp_path):
    p = {"params": {n: {"kernel": jnp.ones((8, 8))} for n in ("q", "k", "v")}}
    a = lorajax.lorafy(p, rank=4, where=["q", "k"], key=jax.random.key(0), alpha=3.0, rslora=True)
    b = lorajax.lorafy(lorajax.unlorafy(a), rank=4, where=["v"], key=jax.random.key(1), alpha=3.0)
    mixed = {"params": {"q": a["params"]["q"], "k": a["params"]["k"], "v": b["params"]["v"]}}
    config = lorajax.save_peft(tmp_path / "m", mixed)
    assert config["use_rslora"] is True and config["alpha_pattern"] == {"v": 1.5}  # 3/4 == 1.5/sqrt(4)
    back = nodes(lorajax.load_peft(tmp_path / "m", p))
    for k, n in nodes(mixed).items():
        assert back[k].scale == pytest.approx(n.scale, rel=1e-12)


def test_load_peft_keeps_boxes_and_existing_nodes():
    _, io = load_fixture("linear")
    model = MLP()

    class Boxed(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = lambda n, f: nn.Dense(
                f, name=n, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
            )
            return dense("fc2", 4)(jnp.tanh(dense("fc1", 8)(x)))

    base = flax_params("linear", load_file(str(FIXTURES / "linear" / "base.safetensors")))
    boxed = Boxed().init(jax.random.key(0), io["x"])
    boxed = jax.tree.map(
        lambda box, v: box.replace_boxed(v) if isinstance(box, nn.Partitioned) else v,
        boxed,
        base,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )
    loaded = lorajax.load_peft(FIXTURES / "linear", boxed)
    node = loaded["params"]["fc1"]["kernel"]
    assert isinstance(node.a, nn.Partitioned) and node.a.names == ("embed", None) and node.b.names == (None, "mlp")
    y = Boxed().apply(lorajax.merge(loaded), io["x"])
    np.testing.assert_allclose(y, io["y"], rtol=RTOL, atol=ATOL)
    # Onto already-lorafied params: the base and layout stay, the factors are replaced.
    lorafied = lorajax.lorafy(base, rank=3, where=["fc1", "fc2"], key=jax.random.key(3))
    again = lorajax.load_peft(FIXTURES / "linear", lorafied)
    assert again["params"]["fc1"]["kernel"].base is lorafied["params"]["fc1"]["kernel"].base
    np.testing.assert_allclose(model.apply(lorajax.merge(again), io["x"]), io["y"], rtol=RTOL, atol=ATOL)


def test_load_peft_into_nnx_state(tmp_path):
    from flax import nnx

    class NNXMLP(nnx.Module):
        def __init__(self, rngs):
            self.fc1, self.fc2 = nnx.Linear(6, 8, rngs=rngs), nnx.Linear(8, 4, rngs=rngs)

        def __call__(self, x):
            return self.fc2(jnp.tanh(self.fc1(x)))

    _, io = load_fixture("linear")
    graphdef, state = nnx.split(NNXMLP(nnx.Rngs(0)))
    linen = flax_params("linear", load_file(str(FIXTURES / "linear" / "base.safetensors")))["params"]
    for module in ("fc1", "fc2"):
        for leaf in ("kernel", "bias"):
            state[module][leaf].set_value(linen[module][leaf])
    lora = lorajax.load_peft(FIXTURES / "linear", state)  # NNX paths have no "params": fc1/kernel -> fc1
    assert isinstance(lora["fc1"]["kernel"].a, nnx.Param)
    np.testing.assert_allclose(nnx.merge(graphdef, lorajax.merge(lora))(io["x"]), io["y"], rtol=RTOL, atol=ATOL)
    out = lorajax.save_peft(tmp_path / "nnx", lora)
    assert out["target_modules"] == ["fc1", "fc2"]


def test_load_peft_never_mutates_inputs():
    base, _ = load_fixture("linear")
    before = jax.tree.map(np.array, base)
    lorajax.load_peft(FIXTURES / "linear", base)
    chex.assert_trees_all_equal(base, before)


# ---------------------------------------------------------------------------------------------------------------------
# Errors.


def _copy_fixture(tmp_path: Path, case: str = "linear") -> Path:
    out = tmp_path / case
    shutil.copytree(FIXTURES / case, out)
    return out


@pytest.mark.parametrize(
    ("change", "feature"),
    [
        ({"use_dora": True}, "use_dora"),
        ({"layer_replication": [[0, 1]]}, "layer_replication"),  # target_parameters loads: test_peft_experts.py
        ({"bias": "all"}, "bias='all'"),
        ({"peft_type": "IA3"}, "IA3 adapter"),
    ],
)
def test_load_peft_unsupported_config_features(tmp_path, change, feature):
    d = _copy_fixture(tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    base, _ = load_fixture("linear")
    with pytest.raises(ValueError, match=re.escape(feature)):
        lorajax.load_peft(d, base)


def test_load_peft_unsupported_tensors(tmp_path):
    d = _copy_fixture(tmp_path)
    tensors = load_file(str(d / "adapter_model.safetensors"))
    tensors["base_model.model.fc1.lora_magnitude_vector"] = np.ones(8, np.float32)
    tensors["base_model.model.fc2.lora_B.bias"] = np.ones(4, np.float32)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    base, _ = load_fixture("linear")
    with pytest.raises(ValueError, match=r"(?s)DoRA.*lora_bias"):
        lorajax.load_peft(d, base)


def test_load_peft_lists_every_mismatch():
    base, _ = load_fixture("linear")
    del base["params"]["fc1"]
    base["params"]["fc2"]["kernel"] = jnp.ones((7, 4))
    with pytest.raises(
        ValueError, match=r"(?s)2 problem.*module 'fc1': no parameter maps to it.*params/fc2/kernel: kernel \(7, 4\)"
    ):
        lorajax.load_peft(FIXTURES / "linear", base)


def test_load_peft_rank_pattern_disagreeing_with_factors(tmp_path):
    d = _copy_fixture(tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {"fc2": 5}}))
    base, _ = load_fixture("linear")
    with pytest.raises(ValueError, match="module 'fc2': config gives rank 5 but its factors have rank 2"):
        lorajax.load_peft(d, base)


def test_load_peft_bad_files(tmp_path):
    base, _ = load_fixture("linear")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        lorajax.load_peft(tmp_path / "nope", base)
    d = _copy_fixture(tmp_path)
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle"):
        lorajax.load_peft(d, base)
    (d / "adapter_model.bin").rename(d / "adapter_model.safetensors")
    data = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or not a safetensors file"):
        lorajax.load_peft(d, base)
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        lorajax.load_peft(d, base)


def test_name_map_errors(tmp_path):
    base, _ = load_fixture("linear")
    with pytest.raises(TypeError, match="name_map must be None, a dict"):
        lorajax.load_peft(FIXTURES / "linear", base, name_map=3)
    with pytest.raises(TypeError, match=r"name_map\('params/fc1/kernel'\) returned 7"):
        lorajax.load_peft(FIXTURES / "linear", base, name_map=lambda path: 7)
    with pytest.raises(ValueError, match="several parameters map to it"):
        lorajax.load_peft(FIXTURES / "linear", base, name_map=lambda path: "fc1" if path.endswith("kernel") else None)
    p = lorajax.lorafy(base, rank=2, where=["fc1", "fc2"], key=jax.random.key(0))
    with pytest.raises(ValueError, match="is also used by params/fc1/kernel"):
        lorajax.save_peft(tmp_path / "x", p, name_map=lambda path: "same")
    with pytest.raises(ValueError, match="no LoRA nodes"):
        lorajax.save_peft(tmp_path / "x", base)
    stacked = {"params": {"layers": {"kernel": jnp.ones((2, 4, 4))}}}
    stacked = lorajax.lorafy(stacked, rank=2, where=["layers"], key=jax.random.key(0), layout={"layers": "sio"})
    with pytest.raises(ValueError, match="stacked layout 'sio'"):
        lorajax.save_peft(tmp_path / "x", stacked)
    assert not (tmp_path / "x").exists()


def test_errors_name_the_function_called(tmp_path):
    base, _ = load_fixture("linear")
    with pytest.raises(FileNotFoundError, match="^read_peft: .* is not a directory"):
        lorajax.read_peft(tmp_path / "nope")
    d = _copy_fixture(tmp_path)
    tensors = load_file(str(d / "adapter_model.safetensors"))
    save_file({**tensors, "base_model.model.fc1.lora_magnitude_vector": np.ones(8, np.float32)}, str(d / "x"))
    (d / "x").replace(d / "adapter_model.safetensors")
    for call, name in ((lambda: lorajax.read_peft(d), "read_peft"), (lambda: lorajax.load_peft(d, base), "load_peft")):
        with pytest.raises(ValueError, match=rf"^{name}: .*adapter_model.safetensors has entries .*(?s:.*)DoRA"):
            call()
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="^read_peft: .*not valid JSON"):
        lorajax.read_peft(d)
    with pytest.raises(ValueError, match="^load_peft: .*not valid JSON"):
        lorajax.load_peft(d, base)
    with pytest.raises(ValueError, match=r"^load_peft: cannot load (?s:.*)module 'fc1': no parameter maps to it"):
        lorajax.load_peft(FIXTURES / "linear", {"params": {"fc2": base["params"]["fc2"]}})
    with pytest.raises(ValueError, match="^save_peft: params hold no LoRA nodes"):
        lorajax.save_peft(tmp_path / "out", base)
    with pytest.raises(TypeError, match="^save_peft: name_map must be None"):
        lorajax.save_peft(tmp_path / "out", lorajax.load_peft(FIXTURES / "linear", base), name_map=3)


def test_save_peft_refuses_nonfinite_factors(tmp_path):
    base, _ = load_fixture("linear")
    good = lorajax.load_peft(FIXTURES / "linear", base)
    out = tmp_path / "out"
    lorajax.save_peft(out, good)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    bad = jax.tree.map(lambda x: x, good, is_leaf=lorajax.is_lora)
    fc1, fc2 = good["params"]["fc1"]["kernel"], good["params"]["fc2"]["kernel"]
    bad["params"]["fc1"]["kernel"] = dataclasses.replace(fc1, a=fc1.a.at[0, 0].set(jnp.nan).at[1, 1].set(jnp.nan))
    bad["params"]["fc2"]["kernel"] = dataclasses.replace(
        fc2, a=fc2.a.at[0, 0].set(jnp.inf), b=fc2.b.at[1, 2].set(-jnp.inf)
    )
    pattern = (
        r"^save_peft: factors hold NaN/Inf \(2 problems\):\n"
        r"  - params/fc1/kernel: a has 2 NaN\n"
        r"  - params/fc2/kernel: a has 1 Inf, b has 1 Inf\n"
        r".*allow_nonfinite=True"
    )
    for folder in (tmp_path / "new", out):  # nothing is written, and an existing adapter stays as it was
        with pytest.raises(ValueError, match=pattern):
            lorajax.save_peft(folder, bad)
    assert not (tmp_path / "new").exists()
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    # The flag writes them as they are: PEFT's A is our a transposed, so a[1, 1] is A[1, 1] and a[0, 0] is A[0, 0].
    lorajax.save_peft(tmp_path / "forced", bad, allow_nonfinite=True)
    written = load_file(str(tmp_path / "forced" / "adapter_model.safetensors"))
    A1, A2 = written["base_model.model.fc1.lora_A.weight"], written["base_model.model.fc2.lora_A.weight"]
    assert np.isnan(A1).sum() == 2 and np.isnan(A1[0, 0]) and np.isnan(A1[1, 1])
    assert np.isposinf(A2[0, 0]) and np.isneginf(written["base_model.model.fc2.lora_B.weight"][2, 1])


def test_save_peft_is_atomic(tmp_path, monkeypatch):
    base, _ = load_fixture("linear")
    p = lorajax.load_peft(FIXTURES / "linear", base)
    out = tmp_path / "adapter"
    real_fsync, calls = os.fsync, []

    def disk_full_at(n):
        def fsync(fd):  # the n-th file written fails at its flush to disk
            calls.append(fd)
            if len(calls) == n:
                raise OSError("disk full")
            real_fsync(fd)

        return fsync

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", disk_full_at(2))  # one file complete, the second fails
        with pytest.raises(OSError, match="disk full"):
            lorajax.save_peft(out, p)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # no half-written folder, no temp folder
    lorajax.save_peft(out, p)
    (out / "README.md").write_text("mine")
    lorajax.save_peft(out, p, base_model_name_or_path="org/model")
    assert sorted(f.name for f in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/model"
    # In an existing folder a failed write leaves the old file whole and no temp file behind.
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    calls.clear()
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", disk_full_at(1))
        with pytest.raises(OSError, match="disk full"):
            lorajax.save_peft(out, p, base_model_name_or_path="other/model")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_save_peft_follows_the_umask(tmp_path):
    base, _ = load_fixture("linear")
    p = lorajax.load_peft(FIXTURES / "linear", base)
    old = os.umask(0o022)
    try:
        lorajax.save_peft(tmp_path / "new", p)  # a new folder (built as a temp folder, then renamed)
        lorajax.save_peft(tmp_path / "new", p)  # an existing folder (each file replaced through a temp file)
    finally:
        os.umask(old)
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o755  # mkdtemp alone would leave 0o700
    for f in (tmp_path / "new").iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f


# ---------------------------------------------------------------------------------------------------------------------
# Against PyTorch + PEFT (skipped without them).


@pytest.fixture(scope="module")
def torch_side():
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    return _fixture_script()


def _abs_forward(torch_side, case, x):
    """``order_bound`` for a case's output: its PEFT model run in float64 on absolute values (see the caller)."""
    import torch

    pm = torch_side.peft_model(case).double()
    with torch.no_grad():
        for v in pm.parameters():
            v.abs_()
    n = 0
    for name, v in pm.named_parameters():
        if "lora_A" in name or "lora_embedding_A" in name:  # one per LoRA layer, shape (r, fan-in...)
            r = v.shape[0]
            n += v.numel() // r + r + 4 + 4
    xt = torch.from_numpy(np.asarray(x))
    tanh = torch.tanh
    torch.tanh = lambda z: z
    try:
        with torch.no_grad():
            y = pm(xt if not xt.is_floating_point() else xt.double().abs())
    finally:
        torch.tanh = tanh
    return order_bound(y.numpy(), n)


@pytest.mark.torch
@pytest.mark.parametrize("case", CASES)
def test_fixtures_regenerate_identically(torch_side, case, tmp_path):
    torch_side.write_case(case, tmp_path)
    for name in ("adapter_model.safetensors", "base.safetensors"):
        chex.assert_trees_all_equal(load_file(str(tmp_path / name)), load_file(str(FIXTURES / case / name)))
    # Inputs are seeded, so bit-equal; outputs come from torch's CPU kernels, which pick different instruction
    # sets (and summation orders) on different CPUs: equal to float32 rounding, not always bit for bit.
    io_got, io_want = load_file(str(tmp_path / "io.safetensors")), load_file(str(FIXTURES / case / "io.safetensors"))
    outputs = [k for k in io_want if k.startswith("y")]
    chex.assert_trees_all_equal(
        {k: v for k, v in io_got.items() if k not in outputs}, {k: v for k, v in io_want.items() if k not in outputs}
    )
    # Two float32 runs of the same layers in possibly different orders: order_bound of the same forward pass on
    # absolute values (float64, |weights|, |x|, tanh -> identity: tanh is a contraction with |tanh z| <= |z|), its
    # length the chain's: each layer's fan-in + rank + 4 (bias, LoRA add, scale, merge's W + s B A) + 4 (tanh).
    bound = _abs_forward(torch_side, case, io_want["x"])
    for k in outputs:
        assert_within(io_got[k], io_want[k], bound, f"{case}: {k}")
    got = json.loads((tmp_path / "adapter_config.json").read_text())
    want = json.loads((FIXTURES / case / "adapter_config.json").read_text())
    # The LoRA fields only: other PEFT versions add or drop unrelated config keys.
    keys = ("peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out", "bias")
    assert {k: got[k] for k in keys} == {k: want[k] for k in keys}
    assert sorted(got["target_modules"]) == sorted(want["target_modules"])


@pytest.mark.torch
@pytest.mark.parametrize("case", CASES)
def test_delta_equals_peft_get_delta_weight(torch_side, case, tmp_path):
    import torch

    pm = torch_side.peft_model(case)
    base = flax_params(case, {k: v.detach().numpy() for k, v in torch_side.base_model(case).state_dict().items()})
    pm.save_pretrained(str(tmp_path))
    ours = nodes(lorajax.load_peft(tmp_path, base, name_map=SPECS[case][1]))
    checked = 0
    for name, module in pm.base_model.model.named_modules():
        if not hasattr(module, "get_delta_weight"):
            continue
        with torch.no_grad():
            theirs = module.get_delta_weight("default").numpy()
        leaf = "embedding" if case == "embedding" and name == "emb" else "kernel"
        node = ours["params/" + "/".join(_flax_path(case, name)) + "/" + leaf]
        if node.layout.kind == "conv":
            theirs = np.transpose(theirs, (*range(2, theirs.ndim), 1, 0))  # (out, in, *k) -> (*k, in, out)
        elif not (case == "gpt2_conv1d" or node.layout.kind == "embed"):
            theirs = theirs.T  # Linear delta is (out, in); Conv1D's and Embedding's already match Flax
        np.testing.assert_allclose(np.asarray(lorajax.delta(node)), theirs, rtol=RTOL, atol=1e-6)
        checked += 1
    assert checked == len(ours)


def _random_init(key, base, layout, rank, dtype):
    """A lorafy init with random A *and* B, drawn by NumPy (no per-shape XLA compile: the suite stays fast)."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())
    a_shape, b_shape = layout.a_shape(base.shape, rank), layout.b_shape(base.shape, rank)
    return jnp.asarray(0.5 * rng.standard_normal(a_shape), dtype), jnp.asarray(
        0.5 * rng.standard_normal(b_shape), dtype
    )


#: case -> lorafy arguments for the reverse direction (Flax paths), chosen to exercise patterns and rslora.
REVERSE = {
    "linear": dict(where=["fc1", "fc2"], rank=3, alpha=5.0, rank_pattern={"fc2": 2}),
    "gpt2_conv1d": dict(
        where=["c_attn", "c_proj"], rank=2, alpha=4.0, rank_pattern={"h_1/c_attn": 4}, alpha_pattern={"c_proj": 6.0}
    ),
    "conv1d": dict(where=["conv", "conv_out"], rank=2, alpha=3.0),
    "conv2d": dict(where=["Conv_0", "Conv_1", "Conv_2"], rank=2, alpha=2.0, rank_pattern={"Conv_1": 3}),
    "embedding": dict(where=["emb", "proj"], rank=3, alpha=6.0),
    "rslora": dict(where=["fc1", "fc2"], rank=4, alpha=2.0, rslora=True),
}


@pytest.mark.torch
@pytest.mark.parametrize("case", CASES)
def test_save_peft_loads_into_peft(torch_side, case, tmp_path):
    import torch
    from peft import PeftModel

    torch_model = torch_side.base_model(case)
    base = flax_params(case, {k: v.detach().numpy() for k, v in torch_model.state_dict().items()})
    params = lorajax.lorafy(base, key=jax.random.key(0), init=_random_init, **REVERSE[case])
    lorajax.save_peft(tmp_path, params, name_map=SPECS[case][1], fan_in_fan_out=case == "gpt2_conv1d")
    pm = PeftModel.from_pretrained(torch_model, str(tmp_path)).eval()
    x = torch_side.example_input(case)
    with torch.no_grad():
        y_peft = pm(x).numpy()
        y_peft_merged = pm.merge_and_unload()(x).numpy()
    y = run_lora(case, params, x.numpy())
    np.testing.assert_allclose(y_peft, y, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(y_peft_merged, y, rtol=RTOL, atol=ATOL)
    assert np.abs(run(case, base, x.numpy()) - y).max() > 1e-2


@pytest.mark.torch
def test_save_peft_pattern_keys_resolve_in_peft(torch_side, tmp_path):
    # Modules "fc" and "block.fc" with different ranks and alphas: PEFT must give each its own.
    import torch
    from peft import PeftModel

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(5, 5)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.block = torch.nn.Linear(5, 5), Block()

        def forward(self, x):
            return self.block.fc(self.fc(x))

    torch.manual_seed(0)
    net = Net().eval()
    state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    base = {"params": {"fc": {"kernel": state["fc.weight"].T, "bias": state["fc.bias"]}}}
    base["params"]["block"] = {"fc": {"kernel": state["block.fc.weight"].T, "bias": state["block.fc.bias"]}}
    params = lorajax.lorafy(
        base,
        rank=2,
        alpha=4.0,
        where=["fc"],
        key=jax.random.key(0),
        init=_random_init,
        rank_pattern={"params/fc/kernel": 3},
    )
    lorajax.save_peft(tmp_path, params)
    pm = PeftModel.from_pretrained(net, str(tmp_path)).eval()
    assert (pm.base_model.model.fc.r["default"], pm.base_model.model.block.fc.r["default"]) == (3, 2)
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    with torch.no_grad():
        y_peft = pm(torch.from_numpy(x)).numpy()
    m = lorajax.merge(params)["params"]
    y = (x @ m["fc"]["kernel"] + m["fc"]["bias"]) @ m["block"]["fc"]["kernel"] + m["block"]["fc"]["bias"]
    np.testing.assert_allclose(y_peft, y, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------------------------------
# Stacked (nn.scan-style) kernels: one PEFT module per layer index, named by a '{}' template.

_STACKED_NAMES = {"h/c_attn": "h.{}.c_attn", "h/c_proj": "h.{}.c_proj"}


def _stacked_gpt2(state):
    per_layer = flax_params("gpt2_conv1d", state)["params"]
    return {"params": {"h": jax.tree.map(lambda *xs: jnp.stack(xs), per_layer["h_0"], per_layer["h_1"])}}


def _run_stacked(params, x):
    h = params["params"]["h"]
    for i in range(2):
        att, proj = h["c_attn"], h["c_proj"]
        x = x + jnp.tanh(x @ att["kernel"][i] + att["bias"][i]) @ proj["kernel"][i] + proj["bias"][i]
    return np.asarray(x)


def test_load_peft_stacked_layers_with_different_ranks(tmp_path):
    # h.0/h.1 differ in rank and alpha: each layer's scale is folded into b, ranks zero-padded (exact).
    state = load_file(str(FIXTURES / "gpt2_conv1d" / "base.safetensors"))
    io = load_file(str(FIXTURES / "gpt2_conv1d" / "io.safetensors"))
    stacked = _stacked_gpt2(state)
    params = lorajax.load_peft(FIXTURES / "gpt2_conv1d", stacked, name_map=_STACKED_NAMES)
    node = params["params"]["h"]["c_attn"]["kernel"]
    assert (node.layout.axes, node.rank, node.scale, node.a.shape) == ("sio", 4, 1.0, (2, 6, 4))
    np.testing.assert_allclose(_run_stacked(lorajax.merge(params), io["x"]), io["y"], rtol=RTOL, atol=ATOL)
    # An adapter that skips a layer (PEFT's layers_to_transform): that layer keeps its base kernel exactly.
    d = _copy_fixture(tmp_path, "gpt2_conv1d")
    tensors = {k: v for k, v in load_file(str(d / "adapter_model.safetensors")).items() if ".h.1." not in k}
    save_file(tensors, str(d / "adapter_model.safetensors"))
    merged = lorajax.merge(lorajax.load_peft(d, stacked, name_map=_STACKED_NAMES))["params"]["h"]
    np.testing.assert_array_equal(merged["c_proj"]["kernel"][1], stacked["params"]["h"]["c_proj"]["kernel"][1])
    assert np.abs(merged["c_proj"]["kernel"][0] - stacked["params"]["h"]["c_proj"]["kernel"][0]).max() > 1e-2


def test_save_peft_stacked_round_trip(tmp_path):
    state = load_file(str(FIXTURES / "gpt2_conv1d" / "base.safetensors"))
    stacked = _stacked_gpt2(state)
    params = lorajax.lorafy(
        stacked,
        rank=2,
        alpha=3.0,
        where=["c_attn", "c_proj"],
        key=jax.random.key(0),
        init=_random_init,
        layout={"c_attn": "sio", "c_proj": "sio"},
    )
    config = lorajax.save_peft(tmp_path, params, name_map=_STACKED_NAMES, fan_in_fan_out=True)
    assert config["target_modules"] == ["h.0.c_attn", "h.0.c_proj", "h.1.c_attn", "h.1.c_proj"]
    chex.assert_trees_all_equal(lorajax.load_peft(tmp_path, stacked, name_map=_STACKED_NAMES), params)
    # The same adapter on the unstacked twin: layer i's merged kernels are the stacked ones' slice i.
    flat = lorajax.merge(lorajax.load_peft(tmp_path, flax_params("gpt2_conv1d", state), name_map=_gpt2_names))
    merged = lorajax.merge(params)["params"]["h"]
    for i in range(2):
        for m in ("c_attn", "c_proj"):
            np.testing.assert_array_equal(flat["params"][f"h_{i}"][m]["kernel"], merged[m]["kernel"][i])


def test_load_peft_multi_axis_kernels():
    # DenseGeneral-style kernels: fc1 (6, 8) as (6, 2, 4) "ioo" and fc2 (8, 4) as (2, 4, 4) "iio"; PEFT's
    # Linear factors (r, 6)/(8, r) and (r, 8)/(4, r) only fit one split of the axes.
    base, _ = load_fixture("linear")
    flat = lorajax.merge(lorajax.load_peft(FIXTURES / "linear", base))["params"]
    shaped = jax.tree.map(lambda x: x, base)
    shaped["params"]["fc1"]["kernel"] = base["params"]["fc1"]["kernel"].reshape(6, 2, 4)
    shaped["params"]["fc2"]["kernel"] = base["params"]["fc2"]["kernel"].reshape(2, 4, 4)
    loaded = lorajax.load_peft(FIXTURES / "linear", shaped)
    assert [loaded["params"][m]["kernel"].layout.axes for m in ("fc1", "fc2")] == ["ioo", "iio"]
    merged = lorajax.merge(loaded)["params"]
    # The same factors contracted in another layout: the same rank-r sums, maybe in another order.
    nodes = lorajax.load_peft(FIXTURES / "linear", base)["params"]
    for m, shape in (("fc1", (6, 8)), ("fc2", (8, 4))):
        n = nodes[m]["kernel"]
        size = abs(np.float64(n.base)) + float(n.scale) * abs(np.float64(n.a)) @ abs(np.float64(n.b))
        assert_within(merged[m]["kernel"].reshape(shape), flat[m]["kernel"], order_bound(size, n.rank + 2), m)
    # An explicit layout= wins over the guess, and a wrong one is reported with the shapes it would need.
    with pytest.raises(
        ValueError, match=r"params/fc1/kernel: kernel \(6, 2, 4\) \(layout 'iio'\) needs PEFT factors A \(2, 12\)"
    ):
        lorajax.load_peft(FIXTURES / "linear", shaped, layout={"fc1": "iio"})


def test_load_peft_bfloat16_adapter_round_trip(tmp_path):
    d = _copy_fixture(tmp_path)
    tensors = {k: v.astype(jnp.bfloat16) for k, v in load_file(str(d / "adapter_model.safetensors")).items()}
    save_file(tensors, str(d / "adapter_model.safetensors"))
    base, io = load_fixture("linear")
    params = lorajax.load_peft(d, base)
    assert params["params"]["fc1"]["kernel"].a.dtype == jnp.bfloat16  # factors keep the file's dtype
    lorajax.save_peft(tmp_path / "again", params)
    chex.assert_trees_all_equal(load_file(str(tmp_path / "again" / "adapter_model.safetensors")), tensors)
    # bf16 factors, f32 base: the output moves by bf16 rounding of the factors only.
    np.testing.assert_allclose(run_lora("linear", params, io["x"]), io["y"], rtol=0.05, atol=0.05)


def test_load_peft_into_equinox_module(tmp_path):
    import equinox as eqx

    class EqxMLP(eqx.Module):
        fc1: eqx.nn.Linear
        fc2: eqx.nn.Linear

        def __call__(self, x):
            return self.fc2(jnp.tanh(self.fc1(x)))

    state = load_file(str(FIXTURES / "linear" / "base.safetensors"))
    io = load_file(str(FIXTURES / "linear" / "io.safetensors"))
    k1, k2 = jax.random.split(jax.random.key(0))
    model = EqxMLP(eqx.nn.Linear(6, 8, key=k1), eqx.nn.Linear(8, 4, key=k2))
    for key, value in state.items():  # PyTorch and Equinox share the (out, in) weight layout
        module, leaf = key.split(".")
        model = eqx.tree_at(
            lambda m, module=module, leaf=leaf: getattr(getattr(m, module), leaf), model, jnp.asarray(value)
        )
    lora = lorajax.load_peft(FIXTURES / "linear", model)  # paths fc1/weight -> module "fc1"
    assert lora.fc1.weight.layout.axes == "oi"
    np.testing.assert_allclose(jax.vmap(lorajax.merge(lora))(io["x"]), io["y"], rtol=RTOL, atol=ATOL)
    assert lorajax.save_peft(tmp_path / "eqx", lora)["target_modules"] == ["fc1", "fc2"]
    chex.assert_trees_all_equal(
        load_file(str(tmp_path / "eqx" / "adapter_model.safetensors")),
        load_file(str(FIXTURES / "linear" / "adapter_model.safetensors")),
    )
