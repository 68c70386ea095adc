"""Mixed-adapter batch benchmark: 8 adapters served in one factored call vs 8 separate merged-model calls.

Run:  python benchmarks/mixed_batch.py            (full run, a few minutes on 2 CPU cores)
      python benchmarks/mixed_batch.py --quick    (tiny smoke run)

Modes, each jitted and timed on the same tokens (batch B = ``per_adapter`` x 8 examples, example n
wants adapter n % 8):

* ``base``: the base model alone on the whole batch (no adapter; the floor).
* ``bank``: ``lorajax.select(bank, ids)`` + ``lorajax.factored(model.apply)``: one call for the batch.
* ``merged x8``: 8 pre-merged models (8 full weight copies in memory), one call per adapter's sub-batch.
* ``merge+call x8``: one base in memory; each adapter is merged inside its call (the memory-frugal way).

Rounds are timed round-robin across the modes (a load spike from other processes hits every mode
alike); tokens/s and the speed-up use the fastest round (least disturbed by other processes), the
median is shown beside it. XLA's FLOP count per mode is load-independent.
Prints a table and writes JSON (default benchmarks/mixed_batch.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _gpt import GPT, tree_bytes

import lorajax

ADAPTERS = 8


def gflops(jitted: Any, *args: Any) -> float:
    """XLA's FLOP count for one compiled call (load-independent, unlike wall time)."""
    cost = jitted.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan"))) / 1e9


def make_adapters(params: Any, rank: int) -> list[Any]:
    """8 'trained' adapters: attention + MLP targets, random factors, varied ranks and alphas."""
    out = []
    for k in range(ADAPTERS):
        r = rank if k % 2 == 0 else rank // 2  # mixed ranks exercise the bank's zero padding
        lp = lorajax.lorafy(params, rank=r, where=lorajax.attn_all | lorajax.mlp, key=jax.random.key(k), alpha=2.0 * r)
        rng = np.random.default_rng(k)
        out.append(
            jax.tree.map(
                lambda x: (
                    dataclasses.replace(x, b=jnp.asarray(0.02 * rng.normal(size=x.b.shape), x.b.dtype))
                    if lorajax.is_lora(x)
                    else x
                ),
                lp,
                is_leaf=lorajax.is_lora,
            )
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few rounds (smoke test)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "mixed_batch.json"))
    args = ap.parse_args()

    if args.quick:
        cfg = dict(vocab=128, d=64, layers=2, heads=4, seq=16, rank=8)
        per_adapter_list, rounds = [1], args.rounds or 3
    else:
        cfg = dict(vocab=1024, d=256, layers=4, heads=4, seq=64, rank=16)
        per_adapter_list, rounds = [1, 4], args.rounds or 21

    model = GPT(cfg["vocab"], cfg["d"], cfg["layers"], cfg["heads"])
    tokens0 = jnp.zeros((1, cfg["seq"]), jnp.int32)
    base = model.init(jax.random.key(0), tokens0)["params"]
    adapters = make_adapters(base, cfg["rank"])
    bank = lorajax.stack_adapters(adapters)
    merged = [lorajax.merge(p) for p in adapters]
    run_factored = lorajax.factored(model.apply)

    apply = jax.jit(lambda p, t: model.apply({"params": p}, t))
    serve_bank = jax.jit(lambda bank, ids, t: run_factored({"params": lorajax.select(bank, ids)}, t))
    merge_call = jax.jit(lambda p, t: model.apply({"params": lorajax.merge(p)}, t))

    rows = []
    for per_adapter in per_adapter_list:
        batch = per_adapter * ADAPTERS
        tokens = jax.random.randint(jax.random.key(1), (batch, cfg["seq"]), 0, cfg["vocab"])
        ids = jnp.arange(batch, dtype=jnp.int32) % ADAPTERS
        groups = [np.flatnonzero(np.asarray(ids) == k) for k in range(ADAPTERS)]
        sub = [tokens[g] for g in groups]

        modes = {
            "base": lambda tokens=tokens: apply(base, tokens),
            "bank": lambda tokens=tokens, ids=ids: serve_bank(bank, ids, tokens),
            "merged x8": lambda sub=sub: [apply(merged[k], sub[k]) for k in range(ADAPTERS)],
            "merge+call x8": lambda sub=sub: [merge_call(adapters[k], sub[k]) for k in range(ADAPTERS)],
        }
        flops = {
            "base": gflops(apply, base, tokens),
            "bank": gflops(serve_bank, bank, ids, tokens),
            "merged x8": sum(gflops(apply, merged[k], sub[k]) for k in range(ADAPTERS)),
            "merge+call x8": sum(gflops(merge_call, adapters[k], sub[k]) for k in range(ADAPTERS)),
        }
        # Warm up (compile) and check the bank against the per-adapter merged models.
        outs = {name: jax.block_until_ready(fn()) for name, fn in modes.items()}
        err = max(float(jnp.abs(outs["bank"][groups[k]] - outs["merged x8"][k]).max()) for k in range(ADAPTERS))
        times: dict[str, list[float]] = {name: [] for name in modes}
        for _ in range(rounds):
            for name, fn in modes.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn())
                times[name].append(time.perf_counter() - t0)
        for name in modes:
            best = min(times[name])
            rows.append(
                {
                    "mode": name,
                    "batch": batch,
                    "calls": ADAPTERS if "x8" in name else 1,
                    "min_ms": 1e3 * best,
                    "median_ms": 1e3 * statistics.median(times[name]),
                    "tokens_per_s": batch * cfg["seq"] / best,
                    "gflops": flops[name],
                }
            )
        block = rows[-len(modes) :]
        ref_ms = next(r["min_ms"] for r in block if r["mode"] == "merged x8")
        for r in block:
            r["vs_merged_x8"] = ref_ms / r["min_ms"]
            r["max_abs_diff_vs_merged"] = err if r["mode"] == "bank" else None

    # The bank holds the base once plus every adapter's factors; serving merged models needs 8 full copies.
    weights = {"base + bank": tree_bytes(bank), "merged x8": sum(tree_bytes(m) for m in merged)}
    print(
        f"mixed-adapter batches: {ADAPTERS} adapters, GPT d={cfg['d']} layers={cfg['layers']} seq={cfg['seq']}, "
        f"rank {cfg['rank']} / {cfg['rank'] // 2}, attention + MLP targets; {jax.devices()[0].platform}"
    )
    head = f"{'mode':<14} {'batch':>5} {'calls':>5} {'GFLOP':>7} {'min ms':>8} {'median ms':>10} {'tokens/s':>10}"
    print(head + f" {'vs merged x8':>12}")
    for r in rows:
        print(
            f"{r['mode']:<14} {r['batch']:>5} {r['calls']:>5} {r['gflops']:>7.2f} {r['min_ms']:>8.2f} "
            f"{r['median_ms']:>10.2f} {r['tokens_per_s']:>10.0f} {r['vs_merged_x8']:>11.2f}x"
        )
    err_all = max(r["max_abs_diff_vs_merged"] for r in rows if r["mode"] == "bank")
    print(f"bank vs merged models: max |logit difference| {err_all:.2e}")
    print(
        f"weights in memory: base + bank {weights['base + bank'] / 2**20:.1f} MiB, "
        f"8 merged copies {weights['merged x8'] / 2**20:.1f} MiB"
    )
    result = {
        "benchmark": "mixed_batch",
        "config": {**cfg, "adapters": ADAPTERS, "rounds": rounds, "quick": args.quick},
        "platform": {
            "device": jax.devices()[0].platform,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
        },
        "rows": rows,
        "weight_bytes": weights,
        "max_abs_diff_bank_vs_merged": err_all,
    }
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
