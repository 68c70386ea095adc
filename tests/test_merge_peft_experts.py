"""merge_peft on PEFT ``target_parameters`` adapters: LoRA on transformers 5's fused expert banks.

transformers 5 keeps a Qwen3-MoE block's experts as ``mlp.experts.gate_up_proj`` ``(E, 2f, d)`` and ``down_proj``
``(E, d, f)`` in memory but saves them per expert (``mlp.experts.<e>.gate_proj.weight``...); merge_peft merges the
adapter onto those per-expert weights (or onto a fused ``experts.gate_up_proj`` where the file keeps one).

- With torch: the committed adapters of tests/fixtures/peft/moe_* (PEFT 0.21.2 and 0.18 files) merged into
  tests/fixtures/peft/moe_base give PEFT's ``merge_and_unload`` weights (1e-6) and its logits (1e-5 of the largest)
  once transformers loads the merged folder, and the logits PEFT recorded in the fixture's io.safetensors.
- Without torch: a fused-key base against NumPy's ``W[e] + scale * (B A)[e]``, and the errors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lorajax.peft import merge_peft

FIXTURES = Path(__file__).parent / "fixtures" / "peft"
BASE = FIXTURES / "moe_base"


@pytest.mark.torch
@pytest.mark.parametrize("case", ["moe_experts", "moe_experts_peft018", "moe_all_linear"])
def test_merged_expert_folder_gives_peft_merge_and_unload(tmp_path, case):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = merge_peft(FIXTURES / case, BASE, tmp_path / "merged")
    ours, base = load_file(str(out / "model.safetensors")), load_file(str(BASE / "model.safetensors"))
    assert ours.keys() == base.keys()
    changed = {k for k in ours if not np.array_equal(ours[k], base[k])}
    per_expert = {k for k in base if ".mlp.experts." in k}
    assert per_expert <= changed  # every expert's gate, up and down moved
    others = {k for k in base if k.endswith(("_proj.weight", "mlp.gate.weight")) and ".experts." not in k}
    assert changed - per_expert == (others if case == "moe_all_linear" else set())  # q, k, v, o and the router
    io = load_file(str(FIXTURES / case / "io.safetensors"))  # the tokens and PEFT's logits when it wrote the case
    tokens = torch.tensor(io["tokens"])
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # transformers fuses the per-expert weights again
    with torch.no_grad():
        ours_logits = merged(tokens).logits.numpy()
    np.testing.assert_allclose(ours_logits, io["logits"], rtol=0, atol=1e-5 * np.abs(io["logits"]).max())
    if case == "moe_experts_peft018":
        return  # PEFT 0.21 reads only its own layout of target_parameters: the recorded logits are the reference

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), FIXTURES / case).eval()
    reference = peft_model.merge_and_unload().eval()
    want, got = dict(reference.named_parameters()), dict(merged.named_parameters())
    assert got.keys() == want.keys()
    for k, w in got.items():
        torch.testing.assert_close(w, want[k], rtol=1e-6, atol=1e-6, msg=k)
    with torch.no_grad():
        peft_logits = reference(tokens).logits.numpy()
    off = np.abs(ours_logits - peft_logits).max() / np.abs(peft_logits).max()
    print(f"\n{case}: logits differ from merge_and_unload's by {off:.2e} of the largest")
    assert off <= 1e-5


def _fused_base(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """moe_base with layer 0's per-expert weights stored as fused (E, out, in) parameters (as other models do)."""
    base = load_file(str(BASE / "model.safetensors"))
    pre = "model.layers.0.mlp.experts"
    E = 1 + max(int(k.split(".")[5]) for k in base if k.startswith(pre + "."))
    gate = [base.pop(f"{pre}.{e}.gate_proj.weight") for e in range(E)]
    up = [base.pop(f"{pre}.{e}.up_proj.weight") for e in range(E)]
    base[f"{pre}.gate_up_proj"] = np.stack([np.concatenate([g, u]) for g, u in zip(gate, up, strict=True)])
    base[f"{pre}.down_proj"] = np.stack([base.pop(f"{pre}.{e}.down_proj.weight") for e in range(E)])
    (tmp_path / "fused").mkdir()
    save_file(base, str(tmp_path / "fused" / "model.safetensors"))
    shutil.copyfile(BASE / "config.json", tmp_path / "fused" / "config.json")
    return tmp_path / "fused", base


@pytest.mark.parametrize("transposed", [False, True], ids=["out_in", "gpt_oss_in_out"])
def test_fused_bank_in_the_file_merges_as_peft_param_wrapper_does(tmp_path, transposed):
    folder, base = _fused_base(tmp_path)
    if transposed:  # gpt-oss keeps (E, in, out) banks (is_transposed), on disk as in memory; gate_up is square here
        base = {k: np.ascontiguousarray(v.transpose(0, 2, 1)) if ".experts." in k else v for k, v in base.items()}
        save_file(base, str(folder / "model.safetensors"))
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt_oss"}))
    adapter = load_file(str(FIXTURES / "moe_experts" / "adapter_model.safetensors"))
    config = json.loads((FIXTURES / "moe_experts" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    out = load_file(str(merge_peft(FIXTURES / "moe_experts", folder, tmp_path / "m") / "model.safetensors"))
    pre = "base_model.model.model.layers.0.mlp.experts"
    for param, stem in (("gate_up_proj", f"{pre}.base_layer"), ("down_proj", pre)):
        W = base[f"model.layers.0.mlp.experts.{param}"].astype(np.float64)  # (E, out, in)
        A, B = adapter[f"{stem}.lora_A.weight"], adapter[f"{stem}.lora_B.weight"]  # (E*r, in), (out, E*r)
        E, r = W.shape[0], config["r"]
        # PEFT >= 0.19.1's ParamWrapper.get_delta_weight: einsum("o r e, e r i -> e o i")
        delta = np.einsum("ore,eri->eoi", B.reshape(B.shape[0], r, E), A.reshape(E, r, A.shape[1]))
        got = out[f"model.layers.0.mlp.experts.{param}"]
        if transposed:
            W, got = W.transpose(0, 2, 1), got.transpose(0, 2, 1)
        np.testing.assert_allclose(got, W + scale * delta, rtol=1e-6, atol=1e-6)
        assert np.abs(delta).max() > 1e-3


def test_base_without_the_bank_lists_the_problem(tmp_path):
    base = load_file(str(BASE / "model.safetensors"))
    for k in [k for k in base if k.endswith(".up_proj.weight")]:
        base.pop(k)
    (tmp_path / "b").mkdir()
    save_file(base, str(tmp_path / "b" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"gate_up_proj'.*only gate_proj of its per-expert parts"):
        merge_peft(FIXTURES / "moe_experts", tmp_path / "b", tmp_path / "m")
    for k in [k for k in base if ".experts." in k]:
        base.pop(k)
    save_file(base, str(tmp_path / "b" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"down_proj'.*neither .*experts.down_proj nor per-expert weights"):
        merge_peft(FIXTURES / "moe_experts", tmp_path / "b", tmp_path / "m")
    assert not (tmp_path / "m").exists()
