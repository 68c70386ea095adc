"""Load test for serve.py: 64 concurrent requests across 8 adapters, bank vs one adapter at a time.

Run:  python examples/serve_load.py [--requests 64] [--max-tokens 16] [--rounds 2]

Starts two servers in this process on free loopback ports (``--mode bank``: every decode step mixes
all adapters; ``--mode loop``: each step runs one adapter's requests with its merged weights; both
prefill each prompt once and decode one token per step from serve.py's KV cache), warms
both up, then fires the requests at them in alternating rounds (bank, loop, bank, loop, ...) so load
from other processes hits both alike. Prints tokens/s and latency percentiles per mode with the
machine's 1-minute load average, and writes JSON (default: benchmarks/serve_load.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve  # examples/serve.py

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


def fire(port: int, count: int, adapters: list[str], max_tokens: int) -> tuple[float, list[float], int]:
    """``count`` concurrent /generate requests; returns wall seconds, per-request latencies, tokens made."""

    def one(k: int) -> tuple[float, int]:
        body = {"adapter": adapters[k % len(adapters)], "prompt": PROMPTS[k % len(PROMPTS)], "max_tokens": max_tokens}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", json.dumps(body).encode(), method="POST")
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as resp:
            reply = json.loads(resp.read())
        return time.perf_counter() - t0, len(reply["tokens"])

    t0 = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(one, range(count)))
    return time.perf_counter() - t0, [r[0] for r in results], sum(r[1] for r in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "benchmarks" / "serve_load.json"))
    args = ap.parse_args()
    common = ["--demo-adapters", "8", "--slots", "8", "--max-batch", str(args.max_batch)]
    common += ["--max-tokens", str(args.max_tokens)]
    servers = {}
    for mode in ("bank", "loop"):
        server, _ = serve.build([*common, "--mode", mode])
        servers[mode] = (server, server.serve(0))
    names = [n for n in servers["bank"][0].slots.names if n]
    for _, httpd in servers.values():  # warm-up: compile the batch shapes the rounds use
        fire(httpd.server_address[1], args.requests, names, 2)
    stats: dict[str, dict[str, list]] = {
        m: {"wall": [], "lat": [], "tokens": [], "steps": [], "load": []} for m in servers
    }
    for _ in range(args.rounds):
        for mode, (server, httpd) in servers.items():
            steps0, load0 = server.steps, os.getloadavg()[0]
            wall, lat, tokens = fire(httpd.server_address[1], args.requests, names, args.max_tokens)
            s = stats[mode]
            s["wall"].append(wall)
            s["lat"] += lat
            s["tokens"].append(tokens)
            s["steps"].append(server.steps - steps0)
            s["load"].append([load0, os.getloadavg()[0]])
    rows = []
    for mode, s in stats.items():
        lat = np.asarray(s["lat"])
        rows.append(
            {
                "mode": mode,
                "tokens_per_s": sum(s["tokens"]) / sum(s["wall"]),
                "p50_s": float(np.percentile(lat, 50)),
                "p90_s": float(np.percentile(lat, 90)),
                "p99_s": float(np.percentile(lat, 99)),
                "decode_steps_per_round": statistics.median(s["steps"]),
                "load_avg_1min": s["load"],
            }
        )
    print(f"{args.requests} concurrent requests x {args.max_tokens} tokens across 8 adapters, {args.rounds} rounds")
    print(f"{'mode':<6} {'tokens/s':>9} {'p50 s':>7} {'p90 s':>7} {'p99 s':>7} {'steps':>6}  load average")
    for r in rows:
        print(
            f"{r['mode']:<6} {r['tokens_per_s']:>9.1f} {r['p50_s']:>7.2f} {r['p90_s']:>7.2f} {r['p99_s']:>7.2f} "
            f"{r['decode_steps_per_round']:>6.0f}  {r['load_avg_1min']}"
        )
    with open(args.out, "w") as fh:
        json.dump({"benchmark": "serve_load", "config": vars(args), "cpus": os.cpu_count(), "rows": rows}, fh, indent=2)
    print(f"wrote {args.out}")
    for server, httpd in servers.values():
        server.close(httpd)


if __name__ == "__main__":
    main()
