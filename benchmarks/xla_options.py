"""Which XLA:CPU options pay for the training step: one worker process per option set, stepped round-robin.

XLA_FLAGS are read once per process, so each variant runs in its own worker; the parent tells the workers in
turn to run one step of each mode (JAX full fine-tune, factored attn_qv and all_linear; a torch worker runs full
fine-tune and PEFT), so every variant sees the same background load, as in train_step.py. Only one worker computes
at a time; the others wait on their pipe.

Run:  python benchmarks/xla_options.py                       (gpt-small, 7 timed rounds)
      python benchmarks/xla_options.py --quick               (tiny shapes, smoke test)
      python benchmarks/xla_options.py --variants default,xnnpack --steps 9
Writes benchmarks/xla_options.json and prints a markdown table (each time also relative to the same worker's
full fine-tune and to the default variant's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = {
    "default": "",
    "thunk_runtime_off": "--xla_cpu_use_thunk_runtime=false",
    "onednn": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "one_thread": "--xla_cpu_multi_thread_eigen=false",
    "torch": None,  # the PyTorch + PEFT worker
}
SMALL = dict(name="gpt-small", vocab=1024, d=512, layers=4, heads=8, seq=128, batch=8)
QUICK = dict(name="quick", vocab=128, d=64, layers=2, heads=4, seq=32, batch=2)


def worker(variant, cfg):
    """Build the modes, say 'ready', then answer each 'step' line with one JSON line of step times."""
    threads = len(os.sched_getaffinity(0))
    if variant == "torch":
        import _torch_peer

        _torch_peer.set_threads(threads)
        runners = [_torch_peer.TorchRunner("full FT", cfg)]
        runners += [_torch_peer.TorchRunner(f"{w}", cfg, w) for w in ("attn_qv", "all_linear")]
    else:
        import jax
        import train_step as ts

        import lorajax

        model = ts.GPT(cfg["vocab"], cfg["d"], cfg["layers"], cfg["heads"], cfg["seq"])
        tokens = jax.random.randint(jax.random.key(0), (cfg["batch"], cfg["seq"]), 0, cfg["vocab"])
        params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
        runners = [ts.Runner("full FT", *ts.make_full(model, params, tokens), 0)]
        for w in ("attn_qv", "all_linear"):
            runners.append(ts.Runner(w, *ts.make_lora(model, params, tokens, getattr(lorajax, w), "factored")[:3], 0))
    print(json.dumps({"ready": [r.name for r in runners]}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        out = {}
        for r in runners:
            r.once()
            out[r.name] = r.times[-1]
        print(json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "xla_options.json"))
    args = ap.parse_args()
    cfg = QUICK if args.quick else SMALL
    if args.worker:
        return worker(args.worker, cfg)
    t0 = time.perf_counter()
    names = args.variants.split(",")
    procs = {}
    for name in names:  # started one after another: compiling in parallel would only contend for the cores
        env = dict(os.environ)
        if VARIANTS[name]:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + VARIANTS[name]).strip()
        cmd = [sys.executable, __file__, "--worker", name] + (["--quick"] if args.quick else [])
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        ready = p.stdout.readline()
        if not ready:
            raise SystemExit(f"worker {name} failed to start")
        procs[name] = p
        print(f"{name}: ready {json.loads(ready)['ready']}", flush=True)
    load0 = os.getloadavg()
    times = {n: {} for n in names}
    for i in range(args.warmup + args.steps):
        for n, p in procs.items():
            p.stdin.write("step\n")
            p.stdin.flush()
            got = json.loads(p.stdout.readline())
            if i >= args.warmup:
                for mode, t in got.items():
                    times[n].setdefault(mode, []).append(t)
        print(f"round {i + 1}/{args.warmup + args.steps} done", flush=True)
    for p in procs.values():
        p.stdin.close()
        p.wait()
    med = {n: {m: statistics.median(ts) for m, ts in d.items()} for n, d in times.items()}
    lines = [
        "| variant | XLA_FLAGS | mode | step ms | / same variant's full FT | / default's same mode |",
        "|---|---|---|---:|---:|---:|",
    ]
    for n in names:
        for m, t in med[n].items():
            ref = med.get("default", {}).get(m) if n != "torch" else None
            flags = "(PyTorch)" if VARIANTS[n] is None else f"`{VARIANTS[n]}`" if VARIANTS[n] else "(none)"
            rel = f"{t / ref:.2f}" if ref else "-"
            lines.append(f"| {n} | {flags} | {m} | {t * 1e3:.0f} | {t / med[n]['full FT']:.2f} | {rel} |")
    load1 = os.getloadavg()
    print(f"\nload average {load0[0]:.2f} at start, {load1[0]:.2f} at end; {args.steps} timed rounds\n")
    print("\n".join(lines))
    print(f"total {time.perf_counter() - t0:.0f}s")
    with open(args.json, "w") as fh:
        out = {"cfg": cfg, "steps": args.steps, "warmup": args.warmup, "loadavg": [load0, load1]}
        json.dump(out | {"variants": {n: VARIANTS[n] for n in names}, "times": times, "median": med}, fh, indent=1)


if __name__ == "__main__":
    main()
