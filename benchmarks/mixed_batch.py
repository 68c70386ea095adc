"""Mixed-adapter batch benchmark: 8 adapters in one batch, every bank form against the base and the loops.

Run:  python benchmarks/mixed_batch.py            (batch 8/32/128; several minutes on 2 CPU cores)
      python benchmarks/mixed_batch.py --quick    (tiny smoke run)

Modes, each jitted and timed on the same tokens (batch B = ``per_adapter`` x 8 examples, example n
wants adapter n % 8):

* ``base``: the base model alone on the whole batch (no adapter; the floor).
* ``one adapter``: adapter 0 alone, factored, on the whole batch: what LoRA's own products cost over the base
  (the floor for any bank; not a way to serve the batch).
* ``bank gather`` / ``bank onehot`` / ``bank ragged`` / ``bank auto``: ``lorajax.select(bank, ids, form=...)``
  + ``lorajax.factored(model.apply)``: one call for the batch, one base in memory.
* ``factored x8``: one base in memory, one factored call per adapter's sub-batch (the per-adapter loop).
* ``merge+call x8``: one base in memory; each adapter is merged inside its call.
* ``merged x8``: 8 pre-merged models (8 full weight copies in memory), one call per adapter's sub-batch.

Rounds are interleaved (every mode once per round, in an order shuffled each round: a mode timed right
after a heavy one pays for the evicted caches), so a load spike from other processes hits
every mode alike; the figures that matter are RATIOS within a round (median over rounds), reported with
the machine's load average (os.getloadavg) at the start and end of each batch size. Absolute times on a
shared machine are not final figures. XLA's FLOP count per mode is load-independent.
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
from _gpt import GPT, round_order, tree_bytes

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


FORMS = ("gather", "onehot", "ragged", "auto")
LOOPS = ("factored x8", "merge+call x8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few rounds (smoke test)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--per-adapter", type=int, nargs="*", default=None, help="examples per adapter (batch = 8x)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per example (default 64; 1: a decode step)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "mixed_batch.json"))
    args = ap.parse_args()

    if args.quick:
        cfg = dict(vocab=128, d=64, layers=2, heads=4, seq=16, rank=8)
        per_adapter_list, rounds = [1], args.rounds or 3
    else:
        cfg = dict(vocab=1024, d=256, layers=4, heads=4, seq=64, rank=16)
        per_adapter_list, rounds = [1, 4, 16], args.rounds or 9
    per_adapter_list = args.per_adapter or per_adapter_list
    cfg["seq"] = args.seq or cfg["seq"]

    model = GPT(cfg["vocab"], cfg["d"], cfg["layers"], cfg["heads"])
    tokens0 = jnp.zeros((1, cfg["seq"]), jnp.int32)
    base = model.init(jax.random.key(0), tokens0)["params"]
    adapters = make_adapters(base, cfg["rank"])
    bank = lorajax.stack_adapters(adapters)
    merged = [lorajax.merge(p) for p in adapters]
    run_factored = lorajax.factored(model.apply)

    apply = jax.jit(lambda p, t: model.apply({"params": p}, t))
    serve = {
        f: jax.jit(lambda bank, ids, t, f=f: run_factored({"params": lorajax.select(bank, ids, form=f)}, t))
        for f in FORMS
    }
    one = jax.jit(lambda p, t: run_factored({"params": p}, t))
    merge_call = jax.jit(lambda p, t: model.apply({"params": lorajax.merge(p)}, t))

    rows, blocks = [], []
    for per_adapter in per_adapter_list:
        batch = per_adapter * ADAPTERS
        tokens = jax.random.randint(jax.random.key(1), (batch, cfg["seq"]), 0, cfg["vocab"])
        ids = jnp.arange(batch, dtype=jnp.int32) % ADAPTERS
        groups = [np.flatnonzero(np.asarray(ids) == k) for k in range(ADAPTERS)]
        sub = [tokens[g] for g in groups]

        modes: dict[str, Any] = {
            "base": lambda tokens=tokens: apply(base, tokens),
            "one adapter": lambda tokens=tokens: one(adapters[0], tokens),
        }
        for f in FORMS:
            modes[f"bank {f}"] = lambda tokens=tokens, ids=ids, f=f: serve[f](bank, ids, tokens)
        modes["factored x8"] = lambda sub=sub: [one(adapters[k], sub[k]) for k in range(ADAPTERS)]
        modes["merge+call x8"] = lambda sub=sub: [merge_call(adapters[k], sub[k]) for k in range(ADAPTERS)]
        modes["merged x8"] = lambda sub=sub: [apply(merged[k], sub[k]) for k in range(ADAPTERS)]
        flops = {"base": gflops(apply, base, tokens), "one adapter": gflops(one, adapters[0], tokens)}
        flops.update({f"bank {f}": gflops(serve[f], bank, ids, tokens) for f in FORMS})
        flops["factored x8"] = sum(gflops(one, adapters[k], sub[k]) for k in range(ADAPTERS))
        flops["merge+call x8"] = sum(gflops(merge_call, adapters[k], sub[k]) for k in range(ADAPTERS))
        flops["merged x8"] = sum(gflops(apply, merged[k], sub[k]) for k in range(ADAPTERS))
        # Warm up (compile) and check every bank form against the per-adapter merged models.
        outs = {name: jax.block_until_ready(fn()) for name, fn in modes.items()}
        errs = {
            f: max(float(jnp.abs(outs[f"bank {f}"][groups[k]] - outs["merged x8"][k]).max()) for k in range(ADAPTERS))
            for f in FORMS
        }
        load0 = os.getloadavg()[0]
        times: dict[str, list[float]] = {name: [] for name in modes}
        for k in range(rounds):
            for name in round_order(list(modes), k):
                fn = modes[name]
                t0 = time.perf_counter()
                jax.block_until_ready(fn())
                times[name].append(time.perf_counter() - t0)
        load1 = os.getloadavg()[0]

        def ratio(num: str, den: str) -> float:
            # median over rounds of the within-round ratio: both modes ran back to back under the same load
            return statistics.median(a / b for a, b in zip(times[num], times[den]))

        best_loop = min(LOOPS, key=lambda m: statistics.median(times[m]))
        best_bank = min((f"bank {f}" for f in FORMS), key=lambda m: statistics.median(times[m]))
        block = {
            "batch": batch,
            "load_avg_1min": [load0, load1],
            "best_loop": best_loop,
            "best_bank": best_bank,
            "bank_over_base": {f: ratio(f"bank {f}", "base") for f in FORMS},
            "one_adapter_over_base": ratio("one adapter", "base"),
            "loop_over_bank": {f: ratio(best_loop, f"bank {f}") for f in FORMS},
            "merged_x8_over_bank": {f: ratio("merged x8", f"bank {f}") for f in FORMS},
            "max_abs_diff_vs_merged": errs,
        }
        blocks.append(block)
        for name in modes:
            rows.append(
                {
                    "mode": name,
                    "batch": batch,
                    "calls": ADAPTERS if "x8" in name else 1,
                    "median_ms": 1e3 * statistics.median(times[name]),
                    "min_ms": 1e3 * min(times[name]),
                    "over_base": ratio(name, "base"),
                    "gflops": flops[name],
                }
            )
        print(f"batch {batch}: load average {load0:.1f} -> {load1:.1f}; best loop: {best_loop}", flush=True)

    # The bank holds the base once plus every adapter's factors; serving merged models needs 8 full copies.
    weights = {"base + bank": tree_bytes(bank), "merged x8": sum(tree_bytes(m) for m in merged)}
    print(
        f"mixed-adapter batches: {ADAPTERS} adapters, GPT d={cfg['d']} layers={cfg['layers']} seq={cfg['seq']}, "
        f"rank {cfg['rank']} / {cfg['rank'] // 2}, attention + MLP targets; {jax.devices()[0].platform}"
    )
    print(f"{'mode':<14} {'batch':>5} {'GFLOP':>7} {'median ms':>10} {'time / base (median ratio)':>27}")
    for r in rows:
        print(f"{r['mode']:<14} {r['batch']:>5} {r['gflops']:>7.2f} {r['median_ms']:>10.2f} {r['over_base']:>26.2f}x")
    for b in blocks:
        print(
            f"batch {b['batch']} (load {b['load_avg_1min'][0]:.1f}->{b['load_avg_1min'][1]:.1f}): "
            f"one adapter/base {b['one_adapter_over_base']:.2f}; "
            + "; ".join(
                f"{f}: bank/base {b['bank_over_base'][f]:.2f}, {b['best_loop']}/bank {b['loop_over_bank'][f]:.2f}, "
                f"merged x8/bank {b['merged_x8_over_bank'][f]:.2f}, err {b['max_abs_diff_vs_merged'][f]:.1e}"
                for f in FORMS
            )
        )
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
        "note": "ratios are medians of within-round ratios (interleaved rounds); load_avg_1min is the machine's "
        "1-minute load average before and after the timed rounds",
        "rows": rows,
        "blocks": blocks,
        "weight_bytes": weights,
    }
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
