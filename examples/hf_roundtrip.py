"""From Hugging Face and back: a local HF checkpoint -> tunix -> lorafy -> train -> save_peft -> PEFT.

    pip install -e ".[libraries,torch]" && pip install --no-deps google-tunix==0.1.7
    python examples/hf_roundtrip.py                       # makes a tiny random Qwen3 folder first (transformers)
    python examples/hf_roundtrip.py --family gemma3       # ... or a tiny Gemma 3 (d_model != heads * head_dim)
    python examples/hf_roundtrip.py --hf /path/to/Qwen3-0.6B --steps 20   # a real local folder (no downloads)

Loads the folder with tunix's own safetensors loader, puts LoRA on every linear kernel (Gemma's fused ``kv_einsum``
too), trains a few steps on a fixed token sequence, writes the adapter with ``save_peft(..., name_map="tunix")``
(the folder vLLM, SGLang and ``PeftModel.from_pretrained`` load) and, where PyTorch and PEFT are installed, loads it
back in PEFT and compares the logits.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorajax


def tunix_module(name: str):
    """A tunix module; without tunix's trainer dependencies (grain, metrax...) its models import on their own."""
    try:
        return importlib.import_module(name)
    except ImportError:
        sys.modules.pop("tunix", None)
        stub = types.ModuleType("tunix")
        stub.__path__ = list(importlib.util.find_spec("tunix").submodule_search_locations)
        sys.modules["tunix"] = stub
        return importlib.import_module(name)


def make_tiny(family: str, path: Path) -> None:
    """A tiny random checkpoint, saved by transformers."""
    import torch
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, head_dim=8)
    if family == "qwen3":
        cfg = transformers.Qwen3Config(
            **common, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1e6
        )
        transformers.Qwen3ForCausalLM(cfg).save_pretrained(path)
    else:
        cfg = transformers.Gemma3TextConfig(
            **common,
            num_attention_heads=2,
            num_key_value_heads=1,
            query_pre_attn_scalar=8,
            sliding_window=64,
            layer_types=["sliding_attention"] * 2,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            },
        )
        transformers.Gemma3ForCausalLM(cfg).save_pretrained(path)


def load_tunix(path: Path):
    """``(family, tunix model)`` from an HF folder's config.json, through tunix's own loader."""
    cfg = json.loads((path / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    if cfg["model_type"].startswith("qwen3"):
        model_lib, params = tunix_module("tunix.models.qwen3.model"), tunix_module("tunix.models.qwen3.params")
        config = model_lib.ModelConfig(
            num_layers=cfg["num_hidden_layers"],
            vocab_size=cfg["vocab_size"],
            embed_dim=cfg["hidden_size"],
            hidden_dim=cfg["intermediate_size"],
            num_heads=cfg["num_attention_heads"],
            head_dim=cfg["head_dim"],
            num_kv_heads=cfg["num_key_value_heads"],
            rope_theta=1_000_000,
            norm_eps=cfg["rms_norm_eps"],
            use_tied_embedding=cfg.get("tie_word_embeddings", False),
        )
        return "qwen3", params.create_model_from_safe_tensors(str(path), config)
    model_lib = tunix_module("tunix.models.gemma3.model")
    params = tunix_module("tunix.models.gemma3.params_safetensors")
    config = model_lib.ModelConfig(
        num_layers=cfg["num_hidden_layers"],
        num_embed=cfg["vocab_size"],
        embed_dim=cfg["hidden_size"],
        hidden_dim=cfg["intermediate_size"],
        num_heads=cfg["num_attention_heads"],
        head_dim=cfg["head_dim"],
        num_kv_heads=cfg["num_key_value_heads"],
        sliding_window_size=cfg.get("sliding_window"),
        local_base_frequency=10_000,
        global_base_frequency=1_000_000,
        param_dtype=jnp.float32,
    )
    return "gemma3", params.create_model_from_safe_tensors(str(path), config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", type=Path, help="a local HF folder (Qwen3 or Gemma 3); default: make a tiny one")
    parser.add_argument("--family", choices=["qwen3", "gemma3"], default="qwen3", help="the tiny model to make")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, help="where the adapter goes (default: a temporary folder)")
    args = parser.parse_args()
    from flax import nnx

    work = Path(tempfile.mkdtemp())
    hf_dir = args.hf
    if hf_dir is None:
        hf_dir = work / f"tiny-{args.family}"
        make_tiny(args.family, hf_dir)
    family, model = load_tunix(hf_dir)
    graphdef, state = nnx.split(model)
    vocab = state["embedder"]["input_embedding"].shape[0]
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, vocab, (2, 16)))

    def apply(st, toks):
        b, n = toks.shape
        positions, mask = jnp.broadcast_to(jnp.arange(n), (b, n)), jnp.tril(jnp.ones((b, n, n), bool))
        return nnx.merge(graphdef, st)(toks, positions, None, mask)[0]

    # Every linear kernel, fused ones included; the model's own computation says which axes each contracts.
    layouts = lorajax.infer_layouts(apply, state, tokens)
    params = lorajax.lorafy(state, rank=4, where=lorajax.all_linear, layout=layouts)
    print(str(lorajax.summary(params)).splitlines()[-1])

    def loss_fn(p):
        logits = lorajax.factored(apply)(p, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    tx = lorajax.masked(optax.adam(1e-2))
    opt_state = tx.init(params)

    @jax.jit
    def step(p, o):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    first = None
    for _ in range(args.steps):
        params, opt_state, loss = step(params, opt_state)
        first = float(loss) if first is None else first
    print(f"{family}: loss {first:.3f} -> {float(loss):.3f} in {args.steps} steps")

    out = args.out or work / "adapter"
    config = lorajax.save_peft(out, params, name_map="tunix", base_model_name_or_path=str(hf_dir))
    print(f"wrote {out}: {len(config['target_modules'])} PEFT modules, r={config['r']}")

    if importlib.util.find_spec("peft") is None or importlib.util.find_spec("torch") is None:
        print("PyTorch/PEFT not installed: skipped loading the adapter in PEFT")
        return
    import peft
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(hf, out).eval()(torch.tensor(np.asarray(tokens))).logits.numpy()
    want = np.asarray(apply(lorajax.merge(params), tokens))
    print(f"PEFT logits vs lorajax: max |diff| {np.abs(got - want).max():.2e} (largest logit {np.abs(want).max():.2f})")


if __name__ == "__main__":
    main()
