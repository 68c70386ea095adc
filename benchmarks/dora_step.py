"""DoRA against LoRA, one training step each, all_linear on the benchmark GPT, in JAX and in PEFT.

    python benchmarks/dora_step.py [--steps 9] [--warmup 2] [--d 256] [--layers 4] [--no-torch]

JAX modes (adam, rank 8, alpha 16): LoRA factored, DoRA factored, and DoRA through ``merge`` (which
forms ``W + ΔW`` per target, as PEFT does). FLOPs and peak memory are XLA's own
(``compiled.cost_analysis()`` / ``memory_analysis()``): exact and free of timing noise. Wall time is
measured round-robin (every round runs each mode once, in turn), so machine load hits every mode
alike; each mode reports its median, and only the ratio DoRA / LoRA within one framework is read.
The load average at start and end is recorded with the results. PEFT's LoRA and DoRA on torch CPU
join the same rounds where torch and peft are installed.

Writes ``benchmarks/dora_step.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).parent))
from _gpt import add_step_args, compiled_step, interleaved_rounds, lm_loss, step_setup

import lorajax

RANK = 8


def make_jax(model, params, tokens, dora: bool, path: str):
    lp = lorajax.lorafy(params, rank=RANK, alpha=2.0 * RANK, where=lorajax.all_linear, dora=dora)
    trainable, frozen = lorajax.partition(lp)
    tx = optax.adam(1e-4)
    apply = lorajax.factored(model.apply, strict=True)

    def forward(t, frozen, tokens):
        p = lorajax.combine(t, frozen)
        if path == "factored":
            return apply({"params": p}, tokens)
        return model.apply({"params": lorajax.merge(p)}, tokens)

    # The frozen tree is an argument, as in a real training step: closed over, it would be a compile-time
    # constant that XLA folds into (e.g. DoRA's ||W||^2) and that the peak memory never counts.
    @jax.jit
    def step(t, opt, frozen, tokens):
        loss, g = jax.value_and_grad(lambda t: lm_loss(forward(t, frozen, tokens), tokens))(t)
        upd, opt = tx.update(g, opt, t)
        return optax.apply_updates(t, upd), opt, loss

    return compiled_step(step, (trainable, tx.init(trainable)), frozen, tokens)


def make_torch(cfg, dora: bool):
    import torch
    from _torch_peer import build_gpt
    from peft import LoraConfig, get_peft_model

    targets = ["query", "key", "value", "out", "fc1", "fc2"]
    model = get_peft_model(
        build_gpt(cfg), LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets, use_dora=dora)
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)
    tokens = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]))

    def once():
        t0 = time.perf_counter()
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, cfg["vocab"]), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    return once, {"flops": None, "peak_bytes": None}


def main() -> None:
    ap = argparse.ArgumentParser()
    add_step_args(ap, steps=9, out=str(Path(__file__).parent / "dora_step.json"))
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    cfg, model, tokens, params = step_setup(args)
    modes = {
        "jax LoRA factored": make_jax(model, params, tokens, False, "factored"),
        "jax DoRA factored": make_jax(model, params, tokens, True, "factored"),
        "jax DoRA merge (forms W+dW)": make_jax(model, params, tokens, True, "merge"),
    }
    if not args.no_torch:
        try:
            modes["torch PEFT LoRA"] = make_torch(cfg, False)
            modes["torch PEFT DoRA"] = make_torch(cfg, True)
        except ImportError as e:
            print(f"torch peer skipped: {e}")
    rows, machine = interleaved_rounds(modes, args.warmup, args.steps)

    def ratio(num, den, key):
        a, b = rows.get(num, {}).get(key), rows.get(den, {}).get(key)
        return None if a is None or b is None else a / b

    ratios = {
        "jax DoRA/LoRA factored, wall": ratio("jax DoRA factored", "jax LoRA factored", "median_s"),
        "jax DoRA/LoRA factored, flops": ratio("jax DoRA factored", "jax LoRA factored", "flops"),
        "jax DoRA/LoRA factored, peak": ratio("jax DoRA factored", "jax LoRA factored", "peak_bytes"),
        "jax DoRA merge/LoRA factored, wall": ratio("jax DoRA merge (forms W+dW)", "jax LoRA factored", "median_s"),
        "jax DoRA merge/LoRA factored, peak": ratio("jax DoRA merge (forms W+dW)", "jax LoRA factored", "peak_bytes"),
        "torch PEFT DoRA/LoRA, wall": ratio("torch PEFT DoRA", "torch PEFT LoRA", "median_s"),
    }
    result = {"config": cfg, "rank": RANK, "rounds": args.steps, "machine": machine, "modes": rows, "ratios": ratios}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    load = f"{machine['loadavg_start']} -> {machine['loadavg_end']}"
    print(f"config {cfg}, rank {RANK}, {args.steps} timed rounds; load average {load}")
    print("| mode | median step (ms) | GFLOP | peak (MiB) |")
    print("|---|---:|---:|---:|")
    for name, r in rows.items():
        gf = "" if r["flops"] is None else f"{r['flops'] / 1e9:.2f}"
        pk = "" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
        print(f"| {name} | {r['median_s'] * 1e3:.1f} | {gf} | {pk} |")
    for k, v in ratios.items():
        print(f"{k}: {'n/a' if v is None else f'{v:.3f}'}")


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing anything
    main()
