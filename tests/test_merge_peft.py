"""lorajax.peft.merge_peft: a merged Hugging Face folder from a base folder and a PEFT adapter, without PyTorch.

The torch-marked tests write a tiny random Qwen3 checkpoint with transformers (2 shards, float32 and bfloat16) and
LoRA/DoRA adapters with PEFT (random B, random DoRA magnitudes, rank/alpha patterns, rsLoRA, an embedding), and
check the output against PEFT's own ``merge_and_unload()``. The error cases need no torch: their folders are
written with safetensors' NumPy API and :func:`lorajax.save_peft`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lorajax
from lorajax.peft import merge_peft

EXTRA_FILES = {"tokenizer.json": '{"model": {}}', "tokenizer_config.json": "{}", "README.md": "# tiny"}
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def shard_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors"))


def leftovers(parent: Path) -> list[str]:
    """Temp folders a failed merge_peft left beside its out_dir."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------------------------------------------------
# Against transformers + PEFT.


def write_base(folder: Path, dtype):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=False,
        max_position_embeddings=64,
    )
    model = Qwen3ForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # weights of std 0.02 give near-uniform logits; these give a real spread
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size=int(total * 0.6))
    for name, text in EXTRA_FILES.items():
        (folder / name).write_text(text)


def write_adapter(base: Path, folder: Path, dora: bool):
    """A PEFT adapter on a float32 copy of the base, with every factor and magnitude random; the PEFT model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=[*LINEAR, "embed_tokens"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"o_proj": 3.0},
        use_rslora=not dora,
        use_dora=dora,
        init_lora_weights=False,  # random B: a non-zero update
    )
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3 if "magnitude" not in name else p * (1 + 0.3 * torch.rand_like(p)))
    pm.save_pretrained(folder, save_embedding_layers=False)
    return pm


def torch_weights(folder: Path):
    from safetensors.torch import load_file as load_torch

    out = {}
    for f in shard_files(folder):
        out.update(load_torch(str(folder / f)))
    return out


@pytest.mark.torch
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_merged_folder_gives_peft_merge_and_unload(tmp_path, dtype_name, dora):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype_name)
    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out" / "merged"
    write_base(base, dtype)
    pm = write_adapter(base, adapter, dora)
    assert merge_peft(adapter, base, out) == out

    # PEFT's merge in float32, rounded once to the base dtype: what merge_peft promises, weight for weight.
    reference = {k: v.to(dtype) for k, v in pm.merge_and_unload().state_dict().items()}
    ours, base_weights = torch_weights(out), torch_weights(base)
    assert ours.keys() == base_weights.keys() == reference.keys()
    adapted = {k for k in ours if any(f".{m}." in k for m in [*LINEAR, "embed_tokens"])}
    assert len(adapted) == 2 * len(LINEAR) + 1
    ulps = {}
    for k, w in ours.items():
        assert w.dtype == dtype and w.shape == base_weights[k].shape, k
        if k not in adapted:
            assert torch.equal(w, base_weights[k]), k
            continue
        assert not torch.equal(w, base_weights[k]), f"{k} did not change"
        if dtype == torch.float32:
            torch.testing.assert_close(w, reference[k], rtol=1e-6, atol=1e-6)
        else:  # the float32 sums may differ in their last bit, which can flip a bf16 rounding: count those
            ulps[k] = bf16_ulps(w, reference[k])
    if ulps:
        flipped = sum(int((u > 0).sum()) for u in ulps.values())
        total = sum(u.size for u in ulps.values())
        print(
            f"\nbf16 {'DoRA' if dora else 'LoRA'}: merge_peft vs PEFT's float32 merge rounded once: "
            f"{flipped} of {total} weights differ"
        )
        assert max(int(u.max()) for u in ulps.values()) <= 1 and flipped <= total // 1000, (flipped, total)

    # The folder: the base's shard layout, index and files, byte for byte where nothing merged.
    assert shard_files(out) == shard_files(base) and len(shard_files(base)) == 2
    for f in ["model.safetensors.index.json", "config.json", "generation_config.json", *EXTRA_FILES]:
        assert (out / f).read_bytes() == (base / f).read_bytes(), f
    for f in shard_files(base):
        assert (out / f).stat().st_size == (base / f).stat().st_size

    # transformers loads it, in the base's dtype, with PEFT's merged logits.
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert next(merged.parameters()).dtype == dtype
    want_model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    want_model.load_state_dict(reference)
    with torch.no_grad():
        got, want = merged(tokens).logits.float(), want_model(tokens).logits.float()
    scale = float(want.abs().max())
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: a flipped last bit in a weight moves a logit
    off = float((got - want).abs().max()) / scale
    print(f"\n{dtype_name} {'DoRA' if dora else 'LoRA'}: logits differ by {off:.2e} of the largest")
    assert float((got - want).abs().max()) <= tol * scale

    if dtype == torch.bfloat16:  # PEFT's own bf16 merge rounds twice (the delta, then the sum): how far it is
        peft_bf16 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), adapter)
        theirs = peft_bf16.merge_and_unload().state_dict()
        diff = {k: (ours[k].float() - theirs[k].float()).abs() for k in adapted}
        n = sum(int((d > 0).sum()) for d in diff.values())
        worst = max(float((d / ours[k].float().abs().clamp_min(1e-30)).max()) for k, d in diff.items())
        print(
            f"\nbf16 {'DoRA' if dora else 'LoRA'}: merge_peft vs PEFT's bf16 merge_and_unload: {n} of "
            f"{sum(d.numel() for d in diff.values())} adapted weights differ, by at most "
            f"{max(float(d.max()) for d in diff.values()):.3g} absolute ({worst:.3g} relative)"
        )


@pytest.mark.torch
def test_gpt2_conv1d_fan_in_fan_out_single_file(tmp_path):
    """GPT-2 stores its Conv1D weights (in, out); PEFT's fan_in_fan_out adapters merge into them as they are."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=32, n_inner=64)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    pm.save_pretrained(tmp_path / "adapter")
    merge_peft(tmp_path / "adapter", tmp_path / "base", tmp_path / "out")
    assert shard_files(tmp_path / "out") == ["model.safetensors"]
    tokens = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = pm.merge_and_unload()(tokens).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "out")(tokens).logits
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def bf16_ulps(x, y) -> np.ndarray:
    """How many bfloat16 steps apart two bf16 tensors are, elementwise (same-sign values)."""
    import torch

    bits = (t.view(torch.int16).numpy().astype(np.int32) for t in (x, y))
    a, b = (np.where(v < 0, -(v & 0x7FFF), v) for v in bits)  # sign-magnitude bits -> ordered integers
    return np.abs(a - b)


# --------------------------------------------------------------------------------------------------------------------
# Bad inputs: a clear error and no out_dir. No torch needed.


def numpy_base(folder: Path, weights: dict[str, np.ndarray], shards: int = 1) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    names = sorted(weights)
    if shards == 1:
        save_file(weights, str(folder / "model.safetensors"))
        return
    weight_map = {}
    for s in range(shards):
        f = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: weights[k] for k in names[s::shards]}
        save_file(part, str(folder / f))
        weight_map.update(dict.fromkeys(part, f))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def numpy_adapter(folder: Path, shapes: dict[str, tuple[int, int]], dora: bool = False) -> dict:
    """An adapter on ``{module: torch weight shape (out, in)}``, written by lorajax.save_peft; its lorafied params."""
    params = {m: {"weight": jnp.ones(s, jnp.float32)} for m, s in shapes.items()}
    lora = lorajax.lorafy(params, rank=2, where=list(shapes), key=jax.random.key(0), init="gaussian", dora=dora)
    lorajax.save_peft(folder, lora)
    return lora


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merge_equals_lorajax_merge_in_bf16_single_file(tmp_path, dora):
    w = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16)
    numpy_base(tmp_path / "base", {"fc.weight": w, "fc.bias": np.zeros(3, ml_dtypes.bfloat16)})
    lora = numpy_adapter(tmp_path / "adapter", {"fc": (3, 4)}, dora=dora)
    merge_peft(tmp_path / "adapter", tmp_path / "base", tmp_path / "out")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    node = lorajax.load_peft(tmp_path / "adapter", {"fc": {"weight": jnp.asarray(w)}})
    np.testing.assert_array_equal(got["fc.weight"], np.asarray(lorajax.merge(node)["fc"]["weight"]))
    assert got["fc.weight"].dtype == ml_dtypes.bfloat16 and lora  # the adapter file was written


def test_errors_list_every_module_that_does_not_fit(tmp_path):
    numpy_base(tmp_path / "base", {"fc.weight": np.ones((5, 4), np.float32), "out.weight": np.ones((4, 4), np.int8)})
    numpy_adapter(tmp_path / "adapter", {"fc": (3, 4), "out": (4, 4), "missing": (4, 4)})
    out = tmp_path / "out" / "merged"
    with pytest.raises(ValueError) as e:
        merge_peft(tmp_path / "adapter", tmp_path / "base", out)
    message = str(e.value)
    assert "module 'missing': the base has no weight missing.weight" in message
    assert "fc: the base weight fc.weight has shape (5, 4)" in message and "another model" in message
    assert "out.weight: dtype I8" in message
    assert not out.exists() and not out.parent.exists()


def test_a_failure_while_writing_leaves_no_out_dir(tmp_path, monkeypatch):
    import lorajax.peft._merge_folder as merge_folder

    numpy_base(tmp_path / "base", {f"l{k}.weight": np.ones((3, 4), np.float32) for k in range(2)}, shards=2)
    numpy_adapter(tmp_path / "adapter", {"l0": (3, 4), "l1": (3, 4)})
    shard = tmp_path / "base" / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-4])
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors is truncated"):
        merge_peft(tmp_path / "adapter", tmp_path / "base", tmp_path / "merged")
    shard.write_bytes(data)

    def disk_full(*args):
        raise OSError("No space left on device")

    monkeypatch.setattr(merge_folder, "_copy_other_files", disk_full)  # after the shards are written
    with pytest.raises(OSError, match="No space left"):
        merge_peft(tmp_path / "adapter", tmp_path / "base", tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and leftovers(tmp_path) == []


def test_missing_shard_and_bad_folders(tmp_path):
    weights = {f"l{k}.weight": np.ones((3, 4), np.float32) for k in range(4)}
    numpy_base(tmp_path / "base", weights, shards=2)
    numpy_adapter(tmp_path / "adapter", {"l0": (3, 4)})
    out = tmp_path / "merged"
    os.remove(tmp_path / "base" / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="names shard.*missing.*model-00002-of-00002.safetensors"):
        merge_peft(tmp_path / "adapter", tmp_path / "base", out)
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        merge_peft(tmp_path / "adapter", tmp_path / "adapter", out)
    with pytest.raises(ValueError, match="overlaps an input folder"):
        merge_peft(tmp_path / "adapter", tmp_path / "base", tmp_path / "base" / "merged")
    assert not out.exists() and leftovers(tmp_path) == []


def test_out_dir_is_replaced_only_with_overwrite(tmp_path):
    numpy_base(tmp_path / "base", {"fc.weight": np.ones((3, 4), np.float32)}, shards=1)
    numpy_adapter(tmp_path / "adapter", {"fc": (3, 4)})
    out = tmp_path / "merged"
    out.mkdir()
    merge_peft(tmp_path / "adapter", tmp_path / "base", out)  # an empty folder is fine
    (out / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        merge_peft(tmp_path / "adapter", tmp_path / "base", out)
    assert (out / "stale.txt").exists()
    merge_peft(tmp_path / "adapter", tmp_path / "base", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert leftovers(tmp_path) == []
