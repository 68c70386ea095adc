"""PEFT's ``target_parameters`` (LoRA on transformers 5's fused expert banks) in load_peft and save_peft.

Three parts:

- The format, without torch: hand-made files against PEFT's own arithmetic, written here in NumPy after
  ``lora.ParamWrapper.get_delta_weight`` (PEFT >= 0.19.1: ``einsum("o r e, e r i -> e o i")`` on ``B`` read as
  ``(out, r, E)`` and ``A`` as ``(E, r, in)`` of an ``(E, out, in)`` parameter; PEFT 0.18: ``"o r e, e r i -> e i o"``
  with the parameter's axes read as ``(E, in, out)``), exact to float32 rounding (1e-6 relative).
- A real model, without torch: the committed adapters of tests/fixtures/peft/moe_* (written by PEFT 0.21.2 and 0.18
  through tests/fixtures/make_peft_expert_fixtures.py, on a tiny Qwen3-MoE that transformers saved into moe_base/)
  load onto tunix's Qwen3-MoE, read by tunix's own loader from that checkpoint, and give PEFT's logits through
  ``merge`` and ``factored`` to 1e-5 of the largest logit (``libraries`` marker: needs google-tunix).
- With torch: what save_peft writes for that model loads in ``PeftModel.from_pretrained`` with lorajax's logits.
"""

from __future__ import annotations

import importlib.util
import json
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tunix import flax_shard_flag_kept, needs_tunix, tunix_module
from safetensors.numpy import load_file, save_file

import lorajax

FIXTURES = Path(__file__).parent / "fixtures" / "peft"
PREFIX = "base_model.model."
E, D, F, R = 3, 6, 4, 2


def _folder(path: Path, config: dict, tensors: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    full = {"peft_type": "LORA", "r": R, "lora_alpha": 4, "target_modules": [], **config}
    (path / "adapter_config.json").write_text(json.dumps(full))
    save_file(
        {PREFIX + k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
        str(path / "adapter_model.safetensors"),
    )
    return path


def _peft_delta(A, B, experts, new):
    """PEFT's ``ParamWrapper.get_delta_weight`` (scale 1) in the parameter's own axis order ``(E, d1, d2)``."""
    A3 = A.reshape(experts, -1, A.shape[-1])  # experts x rank x in_features
    B3 = B.reshape(B.shape[0], -1, experts)  # out_features x rank x experts
    return np.einsum("ore,eri->eoi" if new else "ore,eri->eio", B3, A3)


def _bank(key=0):
    """A JAX expert bank ``(E, D, F)`` ("sio", as tunix's ``down_proj`` transposed: d_in = D) and its HF name."""
    return {"mlp": {"down_proj": jax.random.normal(jax.random.key(key), (E, D, F))}}


NAME = {"mlp/down_proj": "model.mlp.experts.down_proj"}


@pytest.mark.parametrize("version", ["0.21.2", "0.18.0"])
def test_load_follows_peft_arithmetic_of_either_version(tmp_path, version):
    rng = np.random.default_rng(0)
    new = version != "0.18.0"
    # The HF parameter is (E, out, in) = (E, F, D); PEFT >= 0.19.1 stores A (E*r, in), B (out, E*r), 0.18 A (E*r, F).
    A = rng.normal(size=(E * R, D if new else F))
    B = rng.normal(size=(F if new else D, E * R))
    d = _folder(tmp_path / version, {"target_parameters": ["mlp.experts.down_proj"], "peft_version": version},
                {"model.mlp.experts.lora_A.weight": A, "model.mlp.experts.lora_B.weight": B})  # fmt: skip
    base = _bank()
    node = lorajax.load_peft(d, base, name_map=NAME)["mlp"]["down_proj"]
    assert node.layout == lorajax.Layout("sio") and node.a.shape == (E, D, R) and node.b.shape == (E, R, F)
    delta = _peft_delta(A.astype(np.float32), B.astype(np.float32), E, new) * 2.0  # lora_alpha / r
    want = np.asarray(base["mlp"]["down_proj"]) + np.swapaxes(delta, 1, 2)  # delta: the parameter's (E, F, D)
    np.testing.assert_allclose(np.asarray(lorajax.merge({"k": node})["k"]), want, rtol=1e-6, atol=1e-6)


def test_versions_differ_only_by_peft_version(tmp_path):
    """The same tensors read as 0.18 and as 0.21.2 give different updates where the shapes fit both (square)."""
    rng = np.random.default_rng(1)
    A, B = rng.normal(size=(E * R, D)), rng.normal(size=(D, E * R))
    base = {"mlp": {"down_proj": jnp.zeros((E, D, D))}}
    merged = {}
    for version in ("0.21.2", "0.18.0"):
        d = _folder(tmp_path / version, {"target_parameters": ["down_proj"], "peft_version": version},
                    {"model.mlp.experts.lora_A.weight": A, "model.mlp.experts.lora_B.weight": B})  # fmt: skip
        merged[version] = np.asarray(lorajax.merge(lorajax.load_peft(d, base, name_map=NAME))["mlp"]["down_proj"])
    new, old = _peft_delta(A, B, E, True), _peft_delta(A, B, E, False)
    np.testing.assert_allclose(merged["0.21.2"], 2 * np.swapaxes(new, 1, 2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(merged["0.18.0"], 2 * np.swapaxes(old, 1, 2), rtol=1e-5, atol=1e-5)
    assert np.abs(merged["0.21.2"] - merged["0.18.0"]).max() > 0.1


def _gate_up(key=0):
    k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
    return {
        "layers": {
            "0": {
                "mlp": {
                    "gate_proj": jax.random.normal(k1, (E, D, F)),
                    "up_proj": jax.random.normal(k2, (E, D, F)),
                    "down_proj": jax.random.normal(k3, (E, F, D)),
                }
            }
        }
    }


def _trained(params, key=5):
    return jax.tree.map(
        lambda x: (
            lorajax.LoRA(x.base, x.a, x.b + 0.1 * jax.random.normal(jax.random.key(key), x.b.shape), x.spec)
            if lorajax.is_lora(x)
            else x
        ),
        params,
        is_leaf=lorajax.is_lora,
    )


def test_save_fuses_gate_and_up_into_gate_up_proj_exactly(tmp_path):
    base = _gate_up()
    where = ["gate_proj", "up_proj", "down_proj"]
    lora = _trained(lorajax.lorafy(base, rank=R, alpha=3.0, where=where, layout=lambda p, x: "sio"))
    config = lorajax.save_peft(tmp_path / "a", lora, name_map="tunix")
    mlp = "model.layers.0.mlp.experts"
    assert config["target_parameters"] == [f"{mlp}.down_proj", f"{mlp}.gate_up_proj"]
    assert config["target_modules"] == [] and config["r"] == R and config["lora_alpha"] == 3
    assert config["rank_pattern"] == {f"^{re.escape(mlp)}\\.gate_up_proj": 2 * R}  # rank 2r, alpha 2a: same scale
    assert config["alpha_pattern"] == {f"^{re.escape(mlp)}\\.gate_up_proj": 6}
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in tensors.items()} == {
        f"{PREFIX}{mlp}.base_layer.lora_A.weight": (E * 2 * R, D),  # gate_up_proj: the inner wrapper
        f"{PREFIX}{mlp}.base_layer.lora_B.weight": (2 * F, E * 2 * R),
        f"{PREFIX}{mlp}.lora_A.weight": (E * R, F),  # down_proj (E, D, F) in HF: in = F
        f"{PREFIX}{mlp}.lora_B.weight": (D, E * R),
    }
    # PEFT's own arithmetic on the fused file gives both halves of every expert's update.
    fused = _peft_delta(tensors[f"{PREFIX}{mlp}.base_layer.lora_A.weight"],
                        tensors[f"{PREFIX}{mlp}.base_layer.lora_B.weight"], E, True) * (6 / (2 * R))  # fmt: skip
    delta = lambda n: np.asarray(lorajax.delta(n))
    mlp_nodes = lora["layers"]["0"]["mlp"]
    np.testing.assert_allclose(fused[:, :F], np.swapaxes(delta(mlp_nodes["gate_proj"]), 1, 2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused[:, F:], np.swapaxes(delta(mlp_nodes["up_proj"]), 1, 2), rtol=1e-5, atol=1e-6)
    # And back: per-expert nodes whose merged kernels are ours.
    loaded = lorajax.load_peft(tmp_path / "a", base, name_map="tunix")
    assert [loaded["layers"]["0"]["mlp"][k].rank for k in ("gate_proj", "up_proj")] == [R, R]  # the blocks' own rank
    got, want = lorajax.merge(loaded)["layers"]["0"]["mlp"], lorajax.merge(lora)["layers"]["0"]["mlp"]
    for name in ("gate_proj", "up_proj", "down_proj"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_save_folds_different_scales_into_the_block(tmp_path):
    base = _gate_up()
    lora = lorajax.lorafy(base, rank=1, alpha=2.0, where=["gate_proj"], layout=lambda p, x: "sio")
    lora = _trained(lorajax.lorafy(lora, rank=3, alpha=2.0, where=["up_proj"], layout=lambda p, x: "sio"))
    assert [lora["layers"]["0"]["mlp"][k].rank for k in ("gate_proj", "up_proj")] == [1, 3]
    config = lorajax.save_peft(tmp_path / "a", lora, name_map="tunix")
    assert config["r"] == 4 and config["target_parameters"] == ["model.layers.0.mlp.experts.gate_up_proj"]
    nodes = lorajax.load_peft(tmp_path / "a", base, name_map="tunix")
    assert [nodes["layers"]["0"]["mlp"][k].rank for k in ("gate_proj", "up_proj")] == [1, 3]
    loaded, want = lorajax.merge(nodes)["layers"]["0"]["mlp"], lorajax.merge(lora)["layers"]["0"]["mlp"]
    for name in ("gate_proj", "up_proj"):
        np.testing.assert_allclose(loaded[name], want[name], rtol=1e-5, atol=1e-6)


def test_save_writes_a_bank_with_one_shared_a_per_expert(tmp_path):
    """A bank whose expert axis is fan-out (layout "oio": one a for all experts, b per expert) is written per expert."""
    base = _gate_up()
    lora = _trained(lorajax.lorafy(base, rank=R, where=["gate_proj", "up_proj"], layout=lambda p, x: "oio"))
    config = lorajax.save_peft(tmp_path / "a", lora, name_map="tunix")
    assert config["target_parameters"] == ["model.layers.0.mlp.experts.gate_up_proj"]
    loaded = lorajax.load_peft(tmp_path / "a", base, name_map="tunix")["layers"]["0"]["mlp"]
    assert loaded["gate_proj"].layout == lorajax.Layout("sio")
    want = lorajax.merge(lora)["layers"]["0"]["mlp"]
    for name in ("gate_proj", "up_proj"):
        np.testing.assert_allclose(lorajax.merge({"k": loaded[name]})["k"], want[name], rtol=1e-5, atol=1e-6)


def test_save_refuses_a_dora_bank_and_a_bank_with_its_expert_axis_inside(tmp_path):
    base = _bank()
    dora = lorajax.lorafy(base, rank=R, where=["down_proj"], layout=lambda p, x: "sio", dora=True)
    with pytest.raises(ValueError, match=r"mlp/down_proj: a dora node; PEFT's target_parameters holds plain LoRA"):
        lorajax.save_peft(tmp_path / "a", dora, name_map=NAME)
    inside = lorajax.lorafy(base, rank=R, where=["down_proj"], layout=lambda p, x: "iso")
    with pytest.raises(ValueError, match=r"layout 'iso' with the one module name .*name with '\{\}' for the layer"):
        lorajax.save_peft(tmp_path / "b", inside, name_map=NAME)
    plain = lorajax.lorafy(base, rank=R, where=["down_proj"], layout=lambda p, x: "sio")  # not named as a parameter
    with pytest.raises(ValueError, match=r"target_parameters when named after its transformers 5 parameter, e\.g\. "):
        lorajax.save_peft(tmp_path / "c", plain, name_map={"mlp/down_proj": "model.mlp.down_proj"})


def _nested(path: Path, targets=("experts.down_proj", "experts.gate_up_proj"), seed=3) -> Path:
    """A PEFT >= 0.19.1 file on both banks of ``model.mlp.experts``: gate_up_proj (E, 2F, D), down_proj (E, D, F)."""
    rng = np.random.default_rng(seed)
    m = "model.mlp.experts"
    return _folder(path, {"target_parameters": list(targets), "peft_version": "0.21.2"}, {
        f"{m}.base_layer.lora_A.weight": rng.normal(size=(E * R, D)), f"{m}.base_layer.lora_B.weight":
        rng.normal(size=(2 * F, E * R)), f"{m}.lora_A.weight": rng.normal(size=(E * R, F)), f"{m}.lora_B.weight":
        rng.normal(size=(D, E * R))})  # fmt: skip


def test_load_names_a_parameter_no_kernel_takes_and_shapes_that_do_not_fit(tmp_path):
    d = _nested(tmp_path / "a")
    down = {"mlp": {"down_proj": jnp.zeros((E, F, D))}}  # lorajax's (E, d_in, d_out) of HF's (E, D, F)
    with pytest.raises(ValueError, match=r"parameter 'model\.mlp\.experts\.gate_up_proj': no kernel maps to it"):
        lorajax.load_peft(d, down, name_map=NAME)
    node = lorajax.load_peft(d, down, name_map=NAME, partial=True)["mlp"]["down_proj"]
    assert node.a.shape == (E, F, R) and node.b.shape == (E, R, D)
    with pytest.raises(ValueError, match=r"The adapter's modules \(2\): model\.mlp\.experts\.down_proj"):
        lorajax.load_peft(d, down, name_map={"mlp/down_proj": "model.mlp.experts.other"})
    wrong = {"mlp": {"down_proj": jnp.zeros((E, F + 1, D))}}
    with pytest.raises(ValueError, match=r"mlp/down_proj: kernel \(3, 5, 6\) .* does not fit PEFT parameter"):
        lorajax.load_peft(d, wrong, name_map=NAME, partial=True)


def test_read_peft_unnests_wrappers_by_the_modules_parameter_order(tmp_path):
    d = _nested(tmp_path / "a")
    config, modules = lorajax.read_peft(d)
    m = "model.mlp.experts"
    assert {k: (v["kind"], v["B"].shape) for k, v in modules.items()} == {
        f"{m}.gate_up_proj": ("param", (2 * F, E * R)),
        f"{m}.down_proj": ("param", (D, E * R)),
    }
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "target_parameters": ["experts.w_in", "experts.w_out"]}))
    with pytest.raises(ValueError, match=r"model\.mlp\.experts: 2 nested target_parameters wrappers"):
        lorajax.read_peft(d)


# ---------------------------------------------------------------------------------------------------------------------
# A real model: tiny Qwen3-MoE, tunix's loader, PEFT's files.


@pytest.fixture(scope="module")
def qwen3_moe():
    """``(state, apply)``: tunix's Qwen3-MoE read by tunix's loader from the checkpoint transformers wrote."""
    from flax import nnx

    with flax_shard_flag_kept():
        yield _qwen3_moe(nnx)


def _qwen3_moe(nnx):
    model_lib, params = tunix_module("tunix.models.qwen3.model"), tunix_module("tunix.models.qwen3.params")
    config = model_lib.ModelConfig(
        num_layers=1, vocab_size=32, embed_dim=16, hidden_dim=8, num_heads=2, head_dim=8, num_kv_heads=1,
        rope_theta=1_000_000, norm_eps=1e-6, use_tied_embedding=False, num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    graphdef, state = nnx.split(params.create_model_from_safe_tensors(str(FIXTURES / "moe_base"), config))

    def apply(st, tokens):
        n = tokens.shape[1]
        return nnx.merge(graphdef, st)(tokens, jnp.arange(n)[None], None, jnp.tril(jnp.ones((1, n, n), bool)))[0]

    return state, apply


def _close(got, want):
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())


@needs_tunix
@pytest.mark.parametrize("case", ["moe_experts", "moe_experts_peft018", "moe_all_linear"])
def test_peft_moe_adapter_gives_peft_logits_on_tunix(qwen3_moe, case):
    state, apply = qwen3_moe
    io = load_file(str(FIXTURES / case / "io.safetensors"))
    loaded = lorajax.load_peft(FIXTURES / case, state, name_map="tunix")
    nodes = {lorajax.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(loaded, is_leaf=lorajax.is_lora)[0]
             if lorajax.is_lora(x)}  # fmt: skip
    banks = {p: x for p, x in nodes.items() if x.layout == lorajax.Layout("sio")}
    assert len(banks) == 3 and all(x.a.shape[0] == 4 for x in banks.values())  # per-expert factors, E first
    assert len(nodes) == (8 if case == "moe_all_linear" else 3)  # q, k, v, o and the router besides
    assert np.abs(np.asarray(apply(state, io["tokens"])) - io["logits"]).max() > 0.1  # the adapter does something
    _close(apply(lorajax.merge(loaded), io["tokens"]), io["logits"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", lorajax.FallbackWarning)  # tunix's CPU form: W[i] per expert, no merged kernel
        _close(lorajax.factored(apply)(loaded, io["tokens"]), io["logits"])
    if case == "moe_experts":  # without a name map, the error names the convention that fits
        with pytest.raises(ValueError, match=r"name_map='tunix' matches 2 of the 2 modules"):
            lorajax.load_peft(FIXTURES / case, state)


@needs_tunix
@pytest.mark.torch
def test_save_peft_on_tunix_moe_loads_in_peft_with_our_logits(qwen3_moe, tmp_path):
    import peft
    import torch
    import transformers

    state, apply = qwen3_moe
    layouts = lorajax.infer_layouts(apply, state, np.zeros((1, 8), np.int32))
    lora = _trained(lorajax.lorafy(state, rank=2, where=lorajax.all_linear, layout=layouts, key=jax.random.key(2)))
    tokens = np.array([[1, 5, 9, 3, 7, 2, 11, 4]])
    want = np.asarray(apply(lorajax.merge(lora), tokens))
    config = lorajax.save_peft(tmp_path / "a", lora, name_map="tunix")
    assert "model.layers.0.mlp.gate.weight" in config["target_parameters"]  # the router: a bare parameter in HF 5
    hf = transformers.Qwen3MoeForCausalLM.from_pretrained(FIXTURES / "moe_base")
    model = peft.PeftModel.from_pretrained(hf, tmp_path / "a").eval()
    with torch.no_grad():
        got = model(torch.tensor(tokens)).logits.numpy()
    assert np.abs(want - np.asarray(apply(state, tokens))).max() > 0.1
    _close(got, want)


@pytest.mark.torch
def test_fixtures_are_what_the_script_writes(tmp_path):
    """The committed moe_* files (PEFT >= 0.19.1 cases) regenerate from tests/fixtures/make_peft_expert_fixtures.py."""
    import peft
    from packaging.version import Version

    if Version(peft.__version__) < Version("0.19.1"):
        pytest.skip(f"peft {peft.__version__} writes the older layout")
    spec = importlib.util.spec_from_file_location("make_moe", FIXTURES.parent / "make_peft_expert_fixtures.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.make_base(tmp_path)
    script.make_case("moe_experts", 1, tmp_path, r=2, target_modules=[], target_parameters=script.EXPERTS)
    for folder, file in (("moe_base", "model.safetensors"), ("moe_experts", "adapter_model.safetensors")):
        got, want = load_file(str(tmp_path / folder / file)), load_file(str(FIXTURES / folder / file))
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    got, want = (
        load_file(str(tmp_path / "moe_experts" / "io.safetensors")),
        load_file(str(FIXTURES / "moe_experts" / "io.safetensors")),
    )
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=0, atol=1e-6)
