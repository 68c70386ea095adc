"""Training-step benchmark: full fine-tuning vs LoRA through merge vs LoRA through lorajax.factored, and peers
(flax nnx.LoRALinear, qwix, PyTorch full fine-tuning and PEFT).

Run:  python benchmarks/train_step.py            (the published run: 9 timed rounds, ~6 min on 2 idle cores)
      python benchmarks/train_step.py --quick    (tiny smoke run for CI)
      XLA_FLAGS=... python benchmarks/train_step.py   (XLA:CPU options; see benchmarks/RESULTS.md for what paid)

Every mode, JAX and torch alike, is stepped round-robin: ``--warmup`` untimed rounds, then ``--steps`` timed rounds
of one step of each mode, so a load spike from other processes hits every mode alike; the step time is the median.
torch's intra-op pool is set to the machine's cores (``torch.set_num_threads``); XLA:CPU's intra-op pool is sized
to the same cores by default (it has no public setter; ``--xla_cpu_multi_thread_eigen=false`` would make it 1).
Each mode's time is given absolute, relative to its OWN framework's full fine-tune, and relative to JAX's.
FLOPs and peak memory come from XLA's ``compiled.cost_analysis()`` / ``memory_analysis()`` (JAX modes only).
Prints a plain table and a markdown table; writes JSON (default benchmarks/train_step.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings

import _jax_peers
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _gpt import GPT, lm_loss, tree_bytes

import lorajax

RANK = 8
DEFAULT_JSON = os.path.join(os.path.dirname(__file__), "train_step.json")


# --- steps ---------------------------------------------------------------------------------------------------------
def make_full(model, params, tokens):
    tx = optax.adam(1e-4)

    def step(params, opt, tokens):
        loss, g = jax.value_and_grad(lambda p: lm_loss(model.apply({"params": p}, tokens), tokens))(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    params = jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jnp.copy(x), params)  # donated
    return step, (params, tx.init(params)), (tokens,)


def make_floor(model, params, tokens):
    """The floor of any LoRA step: only the positional table trains, so the backward is the input-gradient
    chain through every layer with no weight gradient at all (forward + input-gradient backward)."""
    tx = optax.adam(1e-4)
    frozen = {k: v for k, v in params.items() if k != "wpe"}

    def step(wpe, opt, frozen, tokens):
        def loss_fn(wpe):
            return lm_loss(model.apply({"params": {**frozen, "wpe": wpe}}, tokens), tokens)

        loss, g = jax.value_and_grad(loss_fn)(wpe)
        upd, opt = tx.update(g, opt, wpe)
        return optax.apply_updates(wpe, upd), opt, loss

    wpe = jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jnp.copy(x), params["wpe"])
    return (
        step,
        (wpe, jax.eval_shape(tx.init, wpe) if isinstance(tokens, jax.ShapeDtypeStruct) else tx.init(wpe)),
        (
            frozen,
            tokens,
        ),
    )


def make_lora(model, params, tokens, where, path, **factored_kw):
    lp = lorajax.lorafy(params, rank=RANK, where=where, key=jax.random.key(1), alpha=2.0 * RANK)
    trainable, frozen = lorajax.partition(lp)
    tx = optax.adam(1e-4)
    apply = lorajax.factored(model.apply, **factored_kw) if path == "factored" else None

    def forward(t, frozen, tokens):
        p = lorajax.combine(t, frozen)
        if path == "factored":
            return apply({"params": p}, tokens)
        return model.apply({"params": lorajax.merge(p)}, tokens)

    def step(t, opt, frozen, tokens):
        loss, g = jax.value_and_grad(lambda t: lm_loss(forward(t, frozen, tokens), tokens))(t)
        upd, opt = tx.update(g, opt, t)
        return optax.apply_updates(t, upd), opt, loss

    return step, (trainable, tx.init(trainable)), (frozen, tokens), lp


# --- measuring -----------------------------------------------------------------------------------------------------
def analyse(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    peak = None
    if mem is not None:
        peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    return {"flops": float(cost.get("flops", float("nan"))), "peak_bytes": peak}


class Runner:
    """A compiled JAX step with its state; ``once()`` runs and times one step."""

    framework = "jax"

    def __init__(self, name, step, state, extra, opt_bytes, compile_only=False):
        self.name, self.extra, self.times = name, extra, []
        jitted = jax.jit(step, donate_argnums=(0, 1))
        with warnings.catch_warnings():
            warnings.simplefilter("error", lorajax.FallbackWarning)
            t0 = time.perf_counter()
            self.compiled = jitted.lower(*state, *extra).compile()
            self.compile_s = time.perf_counter() - t0
        self.info = analyse(self.compiled)
        self.info["opt_state_bytes"] = opt_bytes
        self.state = state

    def once(self):
        t0 = time.perf_counter()
        p, o, loss = self.compiled(*self.state, *self.extra)
        loss.block_until_ready()
        self.times.append(time.perf_counter() - t0)
        self.state = (p, o)


def run_rounds(runners, warmup, steps, log):
    """``warmup`` untimed rounds, then ``steps`` timed rounds; each round runs one step of every runner in turn."""
    for i in range(warmup + steps):
        for r in runners:
            r.once()
        if i < warmup:
            for r in runners:
                r.times.clear()
            log(f"  warm-up round {i + 1}/{warmup} done")
        else:
            log(f"  round {i + 1 - warmup}/{steps}: " + ", ".join(f"{r.name} {r.times[-1] * 1e3:.0f}" for r in runners))


def run_config(cfg, targets, steps, warmup, time_it, peers, log):
    model = GPT(cfg["vocab"], cfg["d"], cfg["layers"], cfg["heads"], cfg["seq"])
    tokens = jax.random.randint(jax.random.key(0), (cfg["batch"], cfg["seq"]), 0, cfg["vocab"])
    if time_it:
        params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    else:
        params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
        tokens = jax.ShapeDtypeStruct(tokens.shape, tokens.dtype)
    torch_on = time_it and "torch" in peers
    if torch_on:
        import _torch_peer
    runners = []  # (targets, runner)
    step, state, tok = make_full(model, params, tokens)
    full = Runner("full FT", step, state, tok, 2 * tree_bytes(params), compile_only=not time_it)
    runners.append(("all", full))
    tfull = None
    if torch_on:
        tfull = _torch_peer.TorchRunner("torch full FT", cfg)
        runners.append(("all", tfull))
    step, state, extra = make_floor(model, params, tokens)
    runners.append(("-", Runner("floor (no dW)", step, state, extra, 0, compile_only=not time_it)))
    for where in targets:
        preset = getattr(lorajax, where)
        for path in ("merge", "factored"):
            step, state, tok, lp = make_lora(model, params, tokens, preset, path)
            opt_bytes = 2 * tree_bytes(state[0])
            runners.append((where, Runner(f"LoRA {path}", step, state, tok, opt_bytes, compile_only=not time_it)))
            log(f"  compiled {where} {path} in {runners[-1][1].compile_s:.1f}s")
        if time_it and "nnx" in peers:
            try:
                step, state, tok = _jax_peers.make_nnx(cfg, tokens, where)
                runners.append((where, Runner("nnx.LoRALinear", step, state, tok, tree_bytes(state[1]))))
            except Exception as e:  # a peer that fails to build is reported, not fatal
                log(f"  nnx peer failed: {e!r}")
        if time_it and "qwix" in peers:
            try:
                step, state, tok = _jax_peers.make_qwix(model, tokens, where)
                runners.append((where, Runner("qwix LoRA", step, state, tok, tree_bytes(state[1]))))
            except Exception as e:
                log(f"  qwix peer failed: {e!r}")
        if torch_on:
            runners.append((where, _torch_peer.TorchRunner("PEFT (torch)", cfg, where)))
    if time_it:
        run_rounds([r for _, r in runners], warmup, steps, log)
    base = full.info
    med = {id(r): (statistics.median(r.times) if r.times else None) for _, r in runners}
    t_jax = med[id(full)]
    own = {"jax": t_jax, "torch": med[id(tfull)] if tfull is not None else None}
    rows = []
    for where, r in runners:
        t, t_own = med[id(r)], own[r.framework]
        flops, peak = r.info["flops"], r.info["peak_bytes"]
        rows.append(
            {
                "config": cfg["name"],
                "targets": where,
                "mode": r.name,
                "framework": r.framework,
                "step_s": t,
                "step_s_all": list(r.times),
                "own_full_ratio": (t / t_own) if t and t_own else None,
                "time_ratio": (t / t_jax) if t and t_jax else None,
                "flops": flops,
                "flops_ratio": (flops / base["flops"]) if flops is not None else None,
                "peak_bytes": peak,
                "peak_ratio": (peak / base["peak_bytes"]) if peak is not None and base["peak_bytes"] else None,
                "opt_state_bytes": r.info["opt_state_bytes"],
                "compile_s": r.compile_s,
            }
        )
    return rows, model, params, tokens


def inference(model, params, tokens, steps):
    """Factored forward vs merged forward; the merged model must compile to exactly the base model's FLOPs."""
    lp = lorajax.lorafy(params, rank=RANK, where=lorajax.all_linear, key=jax.random.key(1))
    fwd = jax.jit(lambda p, t: model.apply({"params": p}, t))
    ffwd = jax.jit(lambda p, t: lorajax.factored(model.apply)({"params": p}, t))
    merged = jax.jit(lorajax.merge)(lp)
    c_base = fwd.lower(params, tokens).compile()
    c_merged = fwd.lower(merged, tokens).compile()
    c_fac = ffwd.lower(lp, tokens).compile()
    f_base, f_merged, f_fac = (analyse(c)["flops"] for c in (c_base, c_merged, c_fac))
    times = {"merged": [], "factored": []}
    c_merged(merged, tokens).block_until_ready()
    c_fac(lp, tokens).block_until_ready()
    for _ in range(steps):
        for name, c, p in (("merged", c_merged, merged), ("factored", c_fac, lp)):
            t0 = time.perf_counter()
            c(p, tokens).block_until_ready()
            times[name].append(time.perf_counter() - t0)
    return {
        "base_flops": f_base,
        "merged_flops": f_merged,
        "merged_equals_base_flops": f_base == f_merged,
        "factored_flops": f_fac,
        "merged_fwd_s": statistics.median(times["merged"]),
        "factored_fwd_s": statistics.median(times["factored"]),
    }


def tricks(cfg, steps, warmup, log):
    """Which CPU tricks pay (all_linear): factored with fusion, 2-D flattening and the rank-major dA on and off."""
    model = GPT(cfg["vocab"], cfg["d"], cfg["layers"], cfg["heads"], cfg["seq"])
    tokens = jax.random.randint(jax.random.key(0), (cfg["batch"], cfg["seq"]), 0, cfg["vocab"])
    params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    runners = []
    for fuse in (True, False):
        for flatten in (True, False):
            step, state, extra, _ = make_lora(
                model, params, tokens, lorajax.all_linear, "factored", fuse=fuse, flatten=flatten
            )
            runners.append(Runner(f"fuse={fuse} flatten={flatten}", step, state, extra, 0))
    # The rank-major dA (a custom VJP) against plain autodiff, both with fuse and flatten on.
    step, state, extra, _ = make_lora(model, params, tokens, lorajax.all_linear, "factored", fast_weight_grads=False)
    runners.append(Runner("autodiff dA (fast_weight_grads=False)", step, state, extra, 0))
    run_rounds(runners, warmup, steps, log)
    rows = []
    for r in runners:
        rows.append({"variant": r.name, "step_s": statistics.median(r.times), "flops": r.info["flops"]})
        log(f"  {r.name:28} {rows[-1]['step_s'] * 1e3:7.0f} ms  FLOPs {r.info['flops']:.4e}")
    return rows


def fmt_bytes(b):
    return "-" if b is None else f"{b / 2**20:.1f} MiB"


def _f(r, k, spec):
    v = r.get(k)
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def table(rows):
    head = (
        f"{'config':10} {'targets':10} {'mode':16} {'step ms':>8} {'/own full':>9} {'/JAX full':>9} "
        f"{'FLOPs/full':>10} {'peak/full':>9} {'opt state':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        ms = f"{r['step_s'] * 1e3:.0f}" if r.get("step_s") else "-"
        lines.append(
            f"{r['config']:10} {r['targets']:10} {r['mode']:16} {ms:>8} {_f(r, 'own_full_ratio', '.2f'):>9} "
            f"{_f(r, 'time_ratio', '.2f'):>9} {_f(r, 'flops_ratio', '.3f'):>10} {_f(r, 'peak_ratio', '.3f'):>9} "
            f"{fmt_bytes(r.get('opt_state_bytes')):>11}"
        )
    return "\n".join(lines)


MODE_MD = {
    "full FT": "full FT (JAX)",
    "torch full FT": "full FT (PyTorch)",
    "LoRA merge": "LoRA via `merge`",
    "LoRA factored": "**LoRA via `factored`**",
    "nnx.LoRALinear": "flax `nnx.LoRALinear`",
    "PEFT (torch)": "PEFT (PyTorch)",
}


def markdown(rows):
    """The table for benchmarks/RESULTS.md: ratios to each framework's own full fine-tune."""
    out = [
        "| config | targets | mode | step ms | time / own full FT | time / JAX full FT | FLOPs / full | "
        "peak mem / full | optimizer state |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ms = f"{r['step_s'] * 1e3:.0f}" if r.get("step_s") else "-"
        peak = _f(r, "peak_ratio", ".3f")
        if r["mode"] == "full FT" and r.get("peak_bytes"):
            peak += f" ({fmt_bytes(r['peak_bytes'])})"
        out.append(
            f"| {r['config']} | {r['targets']} | {MODE_MD.get(r['mode'], r['mode'])} | {ms} | "
            f"{_f(r, 'own_full_ratio', '.2f')} | {_f(r, 'time_ratio', '.2f')} | {_f(r, 'flops_ratio', '.3f')} | "
            f"{peak} | {fmt_bytes(r.get('opt_state_bytes'))} |"
        )
    return "\n".join(out)


def machine(threads):
    info = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cores_available": threads,
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "xla_intra_op_threads": 1 if "multi_thread_eigen=false" in os.environ.get("XLA_FLAGS", "") else threads,
        "loadavg_start": os.getloadavg(),
    }
    try:
        import _torch_peer
        import peft
        import torch

        info |= {"torch": torch.__version__, "peft": peft.__version__}
        info["torch_threads"] = _torch_peer.set_threads(threads)
    except ImportError:
        pass
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds: a smoke test")
    ap.add_argument("--steps", type=int, default=None, help="timed rounds (one step of every mode each; median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds before the timed ones")
    ap.add_argument("--no-gpt2", action="store_true", help="skip the compile-only GPT-2-small shapes")
    ap.add_argument("--peers", default="nnx,qwix,torch", help="comma list of peers: nnx,qwix,torch (or 'none')")
    ap.add_argument(
        "--tricks", action="store_true", help="only time factored with fuse/flatten/fast_weight_grads on and off"
    )
    ap.add_argument("--json", default=DEFAULT_JSON)
    args = ap.parse_args()
    steps = args.steps or (2 if args.quick else 9)
    warmup = 1 if args.quick else args.warmup
    peers = set(args.peers.split(",")) - {"none", ""}

    def log(msg):
        print(msg, flush=True)

    small = dict(name="gpt-small", vocab=1024, d=512, layers=4, heads=8, seq=128, batch=8)
    if args.quick:
        small = dict(name="quick", vocab=128, d=64, layers=2, heads=4, seq=32, batch=2)
    t_start = time.perf_counter()
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = machine(threads)
    log(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {threads} cores; XLA intra-op threads "
        f"{info['xla_intra_op_threads']} (XLA_FLAGS={info['xla_flags']!r}); torch "
        f"{info.get('torch', 'absent')} threads {info.get('torch_threads', '-')}; load average "
        f"{info['loadavg_start'][0]:.2f}; {platform.platform()}"
    )
    if args.tricks:
        rows = tricks(small, steps, warmup, log)
        # Its own file by default: a --tricks run must not overwrite the main run's figures.
        path = (
            args.json
            if args.json != DEFAULT_JSON
            else os.path.join(os.path.dirname(__file__), "train_step_tricks.json")
        )
        with open(path, "w") as fh:
            json.dump({"machine": info, "tricks": rows, "steps": steps, "warmup": warmup}, fh, indent=1)
        return
    rows, model, params, tokens = run_config(small, ["attn_qv", "all_linear"], steps, warmup, True, peers, log)
    inf = inference(model, params, tokens, steps)
    if not args.quick and not args.no_gpt2:
        gpt2 = dict(name="gpt2-124M", vocab=50257, d=768, layers=12, heads=12, seq=1024, batch=8)
        rows += run_config(gpt2, ["attn_qv", "all_linear"], 0, 0, False, set(), log)[0]
    log(table(rows))
    log(
        f"\ninference ({small['name']}, all_linear): merged fwd {inf['merged_fwd_s'] * 1e3:.0f} ms, factored fwd "
        f"{inf['factored_fwd_s'] * 1e3:.0f} ms; FLOPs base {inf['base_flops']:.3e}, merged {inf['merged_flops']:.3e} "
        f"(equal: {inf['merged_equals_base_flops']}), factored {inf['factored_flops']:.3e}"
    )
    info["loadavg_end"] = os.getloadavg()
    total = time.perf_counter() - t_start
    log(
        f"\n{steps} timed rounds after {warmup} warm-up; load average {info['loadavg_start'][0]:.2f} at start, "
        f"{info['loadavg_end'][0]:.2f} at end; total {total:.0f}s\n\n" + markdown(rows)
    )
    out = {"machine": info, "steps": steps, "warmup": warmup, "rows": rows, "inference": inf, "total_s": total}
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=1, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))


if __name__ == "__main__":
    main()
