"""Load test for the lorajax.serve server through the openai client: bank vs per-adapter loop vs base alone.

Run (needs ``pip install -e ".[serve,demo,test]"``: the server, the demo model, the ``openai`` client)::

    python benchmarks/serve_load.py --max-batch 16 64 --rounds 7 --out /tmp/serve_load.json

For each max batch, starts three servers, each its own process (``examples/serve.py`` on a free loopback port,
warmed up before it prints ``ready``), all over the demo base with the same settings:

- ``bank``: 8 stand-in adapters (ranks ``--rank`` and half that, every linear layer) in 8 slots; every decode
  step mixes all adapters' rows (``--mode bank``);
- ``loop``: the same 8 adapters; each step runs only one adapter's rows, with its merged weights (``--mode loop``);
- ``base``: no adapters; every request names ``base`` (the base model alone: what LoRA costs).

This process is the only client (``openai.AsyncOpenAI``, one event loop): each run fires ``--requests`` concurrent
streamed completions, request ``k`` with prompt ``PROMPTS[k % 8]`` and ``max_tokens`` (greedy) on adapter
``demo{k % 8}`` (``base`` on the base server), the same prompts for every server. Rounds run the three servers in
a freshly shuffled order each (``--seed``), so a slow spell of a shared machine hits them alike. Time to first
token is the first streamed text's arrival; tokens/s counts the completion tokens of a run over its wall time.
Prints, per max batch and server, the median tokens/s over rounds, latency and time-to-first-token percentiles
over every request, the engine's steps per run, its busy share of the run's wall time and the share of that in
device calls (the rest: host work per step; from ``GET /health``), and the bank's ratios to the loop and to the
base per round (median, min-max). Writes JSON only where ``--out`` says (nothing without it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import openai

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["def read(self", "class Reader:", "import os\n", "return x", "for i in range(", "if not ", "with open(",
           "# "]  # fmt: skip
SERVERS = {"bank": ["--mode", "bank"], "loop": ["--mode", "loop"], "base": ["--demo-adapters", "0"]}


class Server:
    """``examples/serve.py`` in a subprocess on a free port; :meth:`ready` waits for it to print ``ready``."""

    def __init__(self, args: list[str]):
        self.cmd = [sys.executable, str(ROOT / "examples" / "serve.py"), "--port", "0", *args]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.url = ""

    def ready(self, timeout: float = 900.0) -> None:
        assert self.proc.stdout is not None
        cmd, deadline, log = self.cmd, time.time() + timeout, []
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{' '.join(cmd)} ended before it was ready:\n{''.join(log)}")
            log.append(line)
            if m := re.search(r"on (http://\S+/v1)", line):
                self.url = m.group(1)
            if "ready" in line:
                return
        raise RuntimeError(f"{' '.join(cmd)} was not ready within {timeout:g} s:\n{''.join(log)}")

    def health(self) -> dict:
        """The engine's counters (``GET /health``)."""
        with urllib.request.urlopen(self.url.removesuffix("/v1") + "/health", timeout=60) as reply:
            return json.loads(reply.read())["engine"]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def fire(client: openai.AsyncOpenAI, count: int, models: list[str], max_tokens: int) -> dict:
    """``count`` concurrent streamed completions: wall seconds, per-request latency and time to first token."""

    async def one(k: int) -> tuple[float, float, int]:
        t0 = time.perf_counter()
        first, tokens = None, 0
        stream = await client.completions.create(model=models[k % len(models)], prompt=PROMPTS[k % len(PROMPTS)],
                                                 max_tokens=max_tokens, temperature=0, stream=True,
                                                 stream_options={"include_usage": True})  # fmt: skip
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - t0
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return time.perf_counter() - t0, first if first is not None else float("nan"), tokens

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(k) for k in range(count)))
    wall = time.perf_counter() - t0
    tokens = sum(r[2] for r in results)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "latency_s": [r[0] for r in results], "ttft_s": [r[1] for r in results]}  # fmt: skip


def spread(values: list[float]) -> dict:
    return {"median": float(np.median(values)), "min": float(np.min(values)), "max": float(np.max(values))}


async def bench(args: argparse.Namespace, max_batch: int, rng: random.Random) -> dict:
    clients: dict[str, openai.AsyncOpenAI] = {}
    common = ["--slots", "8", "--rank", str(args.rank), "--max-batch", str(max_batch),
              "--max-connections", str(4 * args.requests + 64)]  # fmt: skip
    servers = {}
    try:
        for name, extra in SERVERS.items():  # they compile at once; the runs start when all are ready
            servers[name] = Server([*common, *extra, *(["--form", args.form] if name == "bank" else [])])
        for s in servers.values():
            s.ready()
        clients = {n: openai.AsyncOpenAI(base_url=s.url, api_key="none", max_retries=0, timeout=600)
                   for n, s in servers.items()}  # fmt: skip
        models = {n: ["base"] if n == "base" else [f"demo{k}" for k in range(8)] for n in servers}
        for n in servers:  # the HTTP path and every batch shape the runs reach, once
            await fire(clients[n], args.requests, models[n], 2)
        runs: dict[str, list[dict]] = {n: [] for n in servers}
        for _ in range(args.rounds):
            order = list(servers)
            rng.shuffle(order)
            for n in order:
                load, before = os.getloadavg()[0], servers[n].health()
                run = await fire(clients[n], args.requests, models[n], args.max_tokens)
                after = servers[n].health()
                engine = {k: round(v - before[k], 6) for k, v in after.items() if isinstance(v, (int, float))}
                runs[n].append({**run, "load_avg_1min": load, "engine": engine})
    finally:
        for c in clients.values():
            await c.close()
        for s in servers.values():
            s.close()
    out = {"max_batch": max_batch, "servers": {}}
    for n, rs in runs.items():
        lat, ttft = np.concatenate([r["latency_s"] for r in rs]), np.concatenate([r["ttft_s"] for r in rs])
        eng = {k: float(np.mean([r["engine"][k] for r in rs])) for k in rs[0]["engine"]}
        out["servers"][n] = {
            "tokens_per_s": spread([r["tokens_per_s"] for r in rs]),
            "latency_p50_s": float(np.percentile(lat, 50)), "latency_p99_s": float(np.percentile(lat, 99)),
            "ttft_p50_s": float(np.nanpercentile(ttft, 50)), "ttft_p99_s": float(np.nanpercentile(ttft, 99)),
            "engine_per_run": eng,  # means over rounds: steps, calls, rows, seconds in steps and in device calls
            "engine_busy": eng["step_s"] / float(np.mean([r["wall_s"] for r in rs])),
            "runs": [{k: v for k, v in r.items() if k not in ("latency_s", "ttft_s")} for r in rs],
        }  # fmt: skip
    tps = {n: [r["tokens_per_s"] for r in rs] for n, rs in runs.items()}
    out["bank_over_loop"] = spread([b / lo for b, lo in zip(tps["bank"], tps["loop"])])
    out["bank_over_base"] = spread([b / ba for b, ba in zip(tps["bank"], tps["base"])])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-batch", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--requests", type=int, default=64, help="concurrent requests per run")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (each server once per round)")
    ap.add_argument("--seed", type=int, default=0, help="shuffles the servers' order in each round")
    ap.add_argument("--rank", type=int, default=16, help="the stand-in adapters' ranks (rank, rank // 2) and slots'")
    ap.add_argument("--form", default="auto", help="the bank's select form (examples/serve.py --form)")
    ap.add_argument("--out", default=None, help="write the results as JSON here (nothing is written without it)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    results = [asyncio.run(bench(args, b, rng)) for b in args.max_batch]
    print(f"{args.requests} concurrent streamed requests x {args.max_tokens} tokens, 8 adapters, {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'batch':>5} {'server':<6} {'tokens/s (min-max)':>24} {'ttft p50':>9} {'ttft p99':>9} {'p50 s':>7} "
          f"{'p99 s':>7} {'steps':>6} {'busy':>5} {'in calls':>8}")  # fmt: skip
    for res in results:
        for n, s in res["servers"].items():
            t = s["tokens_per_s"]
            print(f"{res['max_batch']:>5} {n:<6} {t['median']:>8.1f} ({t['min']:>6.1f}-{t['max']:>6.1f}) "
                  f"{s['ttft_p50_s']:>9.3f} {s['ttft_p99_s']:>9.3f} {s['latency_p50_s']:>7.3f} "
                  f"{s['latency_p99_s']:>7.3f} {s['engine_per_run']['steps']:>6.0f} {s['engine_busy']:>5.0%} "
                  f"{s['engine_per_run']['call_s'] / max(s['engine_per_run']['step_s'], 1e-9):>8.0%}")  # fmt: skip
        lo, ba = res["bank_over_loop"], res["bank_over_base"]
        print(f"max batch {res['max_batch']}: bank/loop {lo['median']:.2f}x ({lo['min']:.2f}-{lo['max']:.2f}), "
              f"bank/base {ba['median']:.2f}x ({ba['min']:.2f}-{ba['max']:.2f}) per round")  # fmt: skip
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"benchmark": "serve_load", "config": vars(args), "cpus": os.cpu_count(), "results": results},
                      fh, indent=2)  # fmt: skip
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
