"""Load test for the lorajax.serve server, through the openai client: bank vs per-adapter loop vs base only.

Run:  python examples/serve_load.py [--max-batch 16 64] [--requests 64] [--max-tokens 16] [--rounds 2] [--out F]

For each max batch, starts two servers in this process on free loopback ports (``--mode bank``: every decode
step mixes all adapters through the slots; ``--mode loop``: each step runs one adapter's requests with its merged
weights), warms them up, then fires ``--requests`` concurrent streamed completions across 8 adapters in
alternating rounds: bank, loop, and the loop server's ``base`` model for every request (the base model alone:
what LoRA costs). Time to first token is the first streamed chunk's arrival; tokens/s counts completion tokens
over each round's wall time. Prints a table with the machine's load average; writes JSON only with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve  # examples/serve.py

from lorajax.serve import Background

PROMPTS = [
    "def read(self",
    "class Reader:",
    "import os\n",
    "return x",
    "for i in range(",
    "if not ",
    "with open(",
    "# ",
]


def fire(client: openai.OpenAI, count: int, models: list[str], max_tokens: int) -> dict:
    """``count`` concurrent streamed completions; wall seconds, latencies, times to first token, tokens."""

    def one(k: int) -> tuple[float, float, int]:
        t0 = time.perf_counter()
        first, tokens = None, 0
        stream = client.completions.create(model=models[k % len(models)], prompt=PROMPTS[k % len(PROMPTS)],
                                           max_tokens=max_tokens, temperature=0, stream=True,
                                           stream_options={"include_usage": True})  # fmt: skip
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - t0
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return time.perf_counter() - t0, first if first is not None else float("nan"), tokens

    t0 = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(one, range(count)))
    return {"wall": time.perf_counter() - t0, "lat": [r[0] for r in results], "ttft": [r[1] for r in results],
            "tokens": sum(r[2] for r in results)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-batch", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the results as JSON here (nothing is written without it)")
    args = ap.parse_args()
    rows = []
    for max_batch in args.max_batch:
        common = ["--demo-adapters", "8", "--slots", "8", "--max-batch", str(max_batch)]
        servers, clients = {}, {}
        for mode in ("bank", "loop"):
            engine, app, _ = serve.build([*common, "--mode", mode])
            engine.warmup()
            servers[mode] = Background(app, max_connections=4 * args.requests + 64)
            port = servers[mode].__enter__()
            clients[mode] = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                          timeout=600)  # fmt: skip
        adapters = [f"demo{k}" for k in range(8)]
        runs = {"bank": ("bank", adapters), "loop": ("loop", adapters), "base": ("loop", ["base"])}
        for server, models in runs.values():  # warm-up: compile the batch shapes the rounds use
            fire(clients[server], args.requests, models, 2)
        stats: dict[str, list[dict]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, (server, models) in runs.items():
                load0 = os.getloadavg()[0]
                stats[name].append({**fire(clients[server], args.requests, models, args.max_tokens),
                                    "load": [load0, os.getloadavg()[0]]})  # fmt: skip
        for name, runs_ in stats.items():
            lat, ttft = np.concatenate([r["lat"] for r in runs_]), np.concatenate([r["ttft"] for r in runs_])
            rows.append({"max_batch": max_batch, "server": name,
                         "tokens_per_s": sum(r["tokens"] for r in runs_) / sum(r["wall"] for r in runs_),
                         "ttft_p50_s": float(np.nanpercentile(ttft, 50)),
                         "ttft_p99_s": float(np.nanpercentile(ttft, 99)),
                         "p50_s": float(np.percentile(lat, 50)), "p99_s": float(np.percentile(lat, 99)),
                         "load_avg_1min": [r["load"] for r in runs_]})  # fmt: skip
        for s in servers.values():
            s.__exit__(None, None, None)
    print(f"{args.requests} concurrent streamed requests x {args.max_tokens} tokens, 8 adapters, {args.rounds} rounds")
    print(f"{'batch':>5} {'server':<6} {'tokens/s':>9} {'ttft p50':>9} {'ttft p99':>9} {'p50 s':>7} {'p99 s':>7}  load")
    for r in rows:
        print(f"{r['max_batch']:>5} {r['server']:<6} {r['tokens_per_s']:>9.1f} {r['ttft_p50_s']:>9.2f} "
              f"{r['ttft_p99_s']:>9.2f} {r['p50_s']:>7.2f} {r['p99_s']:>7.2f}  {r['load_avg_1min']}")  # fmt: skip
    for b in args.max_batch:
        tps = {r["server"]: r["tokens_per_s"] for r in rows if r["max_batch"] == b}
        print(f"max batch {b}: bank/loop {tps['bank'] / tps['loop']:.2f}x, bank/base {tps['bank'] / tps['base']:.2f}x")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"benchmark": "serve_load", "config": vars(args), "cpus": os.cpu_count(), "rows": rows}, fh,
                      indent=2)  # fmt: skip
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
