"""QLoRA (NF4 + double quantization) against LoRA on a bf16 and an fp32 base, and QDoRA (DoRA on the NF4 base):
one factored training step each.

    python benchmarks/qlora_step.py [--steps 7] [--warmup 2] [--d 256] [--layers 4]

The benchmark GPT (benchmarks/_gpt.py), all_linear targets, rank 8, adam. The bases differ only in how the frozen
linear kernels are stored: fp32, bf16, or NF4 + double quantization (quantized from the bf16 kernels, so it
dequantizes to bf16). The frozen tree is an argument of the step. FLOPs and peak memory are XLA's
(``cost_analysis`` / ``memory_analysis``), frozen-weight bytes are the bytes of the frozen tree, and wall time is
measured round-robin (each round runs every mode once), the median per mode reported with the load average,
since only ratios within one run are meaningful on a shared machine. NF4 dequantizations are counted in the step's
jaxpr (lookups in the NF4 codebook): QDoRA's equal QLoRA's, its norms reading the kernel the forward dequantizes.

Writes ``benchmarks/qlora_step.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).parent))
from _gpt import add_step_args, compiled_step, equations, interleaved_rounds, lm_loss, step_setup

import lorajax

RANK = 8


def base_params(params, kind: str):
    """The benchmark params with the all_linear kernels stored as ``kind``: fp32, bf16 or nf4."""
    if kind == "fp32":
        return params
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim >= 2 else x, params)
    if kind == "bf16":
        return bf16
    return lorajax.quantize(bf16, where=lorajax.all_linear, dtype="nf4", block_size=64, double_quant=True)


def make_mode(model, params, tokens, dora: bool = False):
    lp = lorajax.lorafy(params, rank=RANK, alpha=2.0 * RANK, where=lorajax.all_linear, dora=dora)
    trainable, frozen = lorajax.partition(lp)
    tx = optax.adam(1e-4)
    apply = lorajax.factored(model.apply)

    @jax.jit
    def step(t, opt, frozen, tokens):
        loss, g = jax.value_and_grad(lambda t: lm_loss(apply({"params": lorajax.combine(t, frozen)}, tokens), tokens))(
            t
        )
        upd, opt = tx.update(g, opt, t)
        return optax.apply_updates(t, upd), opt, loss

    # The frozen tree is an argument, not a closed-over constant, so XLA's peak counts its bytes.
    state = (trainable, tx.init(trainable))
    once, figures = compiled_step(step, state, frozen, tokens)
    lookups = nf4_lookups(jax.make_jaxpr(step)(*state, frozen, tokens).jaxpr)
    return once, {**figures, "frozen_bytes": int(lorajax.summary(frozen).total_bytes), "nf4_dequantizations": lookups}


def nf4_lookups(jaxpr) -> int:
    """NF4 kernels dequantized by ``jaxpr`` (sub-jaxprs included): its gathers from the 16-entry NF4 codebook."""
    return sum(e.primitive.name == "gather" and tuple(e.invars[0].aval.shape) == (16,) for e in equations(jaxpr))


def main() -> None:
    ap = argparse.ArgumentParser()
    add_step_args(ap, steps=7, out=str(Path(__file__).parent / "qlora_step.json"))
    args = ap.parse_args()
    cfg, model, tokens, params = step_setup(args)
    modes = {f"LoRA, {k} base" if k != "nf4" else "QLoRA, nf4+DQ base": base_params(params, k) for k in KINDS}
    modes = {name: make_mode(model, p, tokens) for name, p in modes.items()}
    modes["QDoRA, nf4+DQ base"] = make_mode(model, base_params(params, "nf4"), tokens, dora=True)
    rows, machine = interleaved_rounds(modes, args.warmup, args.steps)
    q, b = rows["QLoRA, nf4+DQ base"], rows["LoRA, bf16 base"]
    ratios = {f"QLoRA/bf16 LoRA, {k}": q[k] / b[k] for k in ("median_s", "flops", "peak_bytes", "frozen_bytes")}
    qd = rows["QDoRA, nf4+DQ base"]
    ratios.update(
        {f"QDoRA/QLoRA, {k}": qd[k] / q[k] for k in ("median_s", "flops", "peak_bytes", "nf4_dequantizations")}
    )
    result = {"config": cfg, "rank": RANK, "rounds": args.steps, "machine": machine, "modes": rows, "ratios": ratios}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    load = f"{machine['loadavg_start']} -> {machine['loadavg_end']}"
    print(f"config {cfg}, rank {RANK}, {args.steps} timed rounds; load average {load}")
    print("| mode | median step (ms) | GFLOP | peak (MiB) | frozen weights (MiB) | NF4 dequantizations |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['median_s'] * 1e3:.1f} | {r['flops'] / 1e9:.2f} | {r['peak_bytes'] / 2**20:.1f} "
            f"| {r['frozen_bytes'] / 2**20:.2f} | {r['nf4_dequantizations']} |"
        )
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")


KINDS = ("fp32", "bf16", "nf4")

if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing anything
    main()
