"""Training-step benchmark: full fine-tuning vs LoRA through merge vs LoRA through lorajax.factored, and peers.

Run:  python benchmarks/train_step.py            (full run, < 10 min on 2 CPU cores)
      python benchmarks/train_step.py --quick    (tiny smoke run for CI)

Prints a table and writes JSON (default benchmarks/train_step.json). FLOPs and peak memory come from
XLA's ``compiled.cost_analysis()`` / ``memory_analysis()``; wall time is the median of steps timed
round-robin across the modes (so a load spike from other processes hits every mode alike).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _gpt import GPT, tree_bytes

import lorajax

RANK = 8


# --- the loss ---------------------------------------------------------------------------------------------------
def lm_loss(logits, tokens):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


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


def make_nnx(cfg, tokens, where):
    """Peer: the same GPT in flax.nnx with nnx.LoRALinear at the targets (base frozen by filtering LoRAParam)."""
    from flax import nnx

    d, h = cfg["d"], cfg["heads"]
    lin_targets = {"query", "value"} if where == "attn_qv" else {"query", "key", "value", "out", "fc1", "fc2"}

    def linear(name, i, o, rngs):
        if name in lin_targets:
            return nnx.LoRALinear(i, o, lora_rank=RANK, rngs=rngs)
        return nnx.Linear(i, o, rngs=rngs)

    class NBlock(nnx.Module):
        def __init__(self, rngs):
            self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
            self.query, self.key, self.value = (linear(n, d, d, rngs) for n in ("query", "key", "value"))
            self.out = linear("out", d, d, rngs)
            self.fc1, self.fc2 = linear("fc1", d, 4 * d, rngs), linear("fc2", 4 * d, d, rngs)

        def __call__(self, x, mask):
            b, s, _ = x.shape
            y = self.ln1(x)
            q, k, v = (f(y).reshape(b, s, h, d // h) for f in (self.query, self.key, self.value))
            att = nnx.dot_product_attention(q, k, v, mask=mask)
            x = x + self.out(att.reshape(b, s, d))
            return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))

    class NGPT(nnx.Module):
        def __init__(self, rngs):
            self.wte = nnx.Embed(cfg["vocab"], d, rngs=rngs)
            self.wpe = nnx.Embed(cfg["seq"], d, rngs=rngs)
            self.blocks = nnx.List([NBlock(rngs) for _ in range(cfg["layers"])])
            self.ln_f = nnx.LayerNorm(d, rngs=rngs)
            self.lm_head = nnx.Linear(d, cfg["vocab"], use_bias=False, rngs=rngs)

        def __call__(self, tokens):
            x = self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[1]))[None]
            mask = nnx.make_causal_mask(tokens)
            for blk in self.blocks:
                x = blk(x, mask)
            return self.lm_head(self.ln_f(x))

    model = NGPT(nnx.Rngs(0))
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    tx = optax.adam(1e-4)

    def step(lora, opt, rest, tokens):
        def loss_fn(lora):
            return lm_loss(nnx.merge(graphdef, lora, rest)(tokens), tokens)

        loss, g = jax.value_and_grad(loss_fn)(lora)
        upd, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, upd), opt, loss

    return step, (lora, tx.init(lora)), (rest, tokens)


def make_qwix(model, tokens, where):
    """Peer: qwix's LoRA provider over the same linen GPT (only lora_a/lora_b are trained)."""
    import qwix

    regex = r".*attn/(query|value)" if where == "attn_qv" else r".*(attn/(query|key|value|out)|fc1|fc2)"
    qmodel = qwix.apply_lora_to_model(model, qwix.LoraProvider(module_path=regex, rank=RANK, alpha=2.0 * RANK))
    variables = qmodel.init(jax.random.key(0), tokens)
    params = variables["params"]
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    is_lora = {
        lorajax.path_str(p): ("lora_a" in lorajax.path_str(p) or "lora_b" in lorajax.path_str(p)) for p, _ in flat
    }
    if not any(is_lora.values()):
        raise RuntimeError("qwix created no lora_a/lora_b params")
    train = jax.tree_util.tree_map_with_path(lambda p, x: x if is_lora[lorajax.path_str(p)] else None, params)
    frozen = jax.tree_util.tree_map_with_path(lambda p, x: None if is_lora[lorajax.path_str(p)] else x, params)
    tx = optax.adam(1e-4)

    def step(t, opt, frozen, tokens):
        def loss_fn(t):
            p = lorajax.combine(t, frozen)
            return lm_loss(qmodel.apply({**variables, "params": p}, tokens), tokens)

        loss, g = jax.value_and_grad(loss_fn)(t)
        upd, opt = tx.update(g, opt, t)
        return optax.apply_updates(t, upd), opt, loss

    return step, (train, tx.init(train)), (frozen, tokens)


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
    """A compiled step with its state; ``once()`` runs and times one step."""

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
        if not compile_only:
            self.once()  # warm-up (and donation of the initial buffers)
            self.times = []

    def once(self):
        t0 = time.perf_counter()
        p, o, loss = self.compiled(*self.state, *self.extra)
        loss.block_until_ready()
        self.times.append(time.perf_counter() - t0)
        self.state = (p, o)


def torch_peft(cfg, where, steps, full=False):
    """Peer: PEFT on PyTorch CPU, same shapes; returns the median step time (s) and optimizer-state bytes."""
    import torch
    from torch import nn as tnn

    torch.set_num_threads(2)
    torch.manual_seed(0)
    d, h, s = cfg["d"], cfg["heads"], cfg["seq"]

    class TBlock(tnn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = tnn.LayerNorm(d), tnn.LayerNorm(d)
            self.query, self.key, self.value, self.out = (tnn.Linear(d, d) for _ in range(4))
            self.fc1, self.fc2 = tnn.Linear(d, 4 * d), tnn.Linear(4 * d, d)

        def forward(self, x):
            b = x.shape[0]
            y = self.ln1(x)
            q, k, v = (f(y).view(b, s, h, d // h).transpose(1, 2) for f in (self.query, self.key, self.value))
            att = tnn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.out(att.transpose(1, 2).reshape(b, s, d))
            return x + self.fc2(tnn.functional.gelu(self.fc1(self.ln2(x))))

    class TGPT(tnn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = tnn.Embedding(cfg["vocab"], d), tnn.Embedding(s, d)
            self.blocks = tnn.ModuleList([TBlock() for _ in range(cfg["layers"])])
            self.ln_f = tnn.LayerNorm(d)
            self.lm_head = tnn.Linear(d, cfg["vocab"], bias=False)

        def forward(self, t):
            x = self.wte(t) + self.wpe(torch.arange(t.shape[1]))[None]
            for blk in self.blocks:
                x = blk(x)
            return self.lm_head(self.ln_f(x))

    model = TGPT()
    if not full:
        from peft import LoraConfig, get_peft_model

        targets = ["query", "value"] if where == "attn_qv" else ["query", "key", "value", "out", "fc1", "fc2"]
        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)
    tokens = torch.randint(0, cfg["vocab"], (cfg["batch"], s))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        logits = model(tokens)
        loss = tnn.functional.cross_entropy(logits[:, :-1].reshape(-1, cfg["vocab"]), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    opt_bytes = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if v.dim() > 0)
    return statistics.median(times), opt_bytes


def run_config(cfg, targets, steps, time_it, peers, log):
    model = GPT(cfg["vocab"], cfg["d"], cfg["layers"], cfg["heads"], cfg["seq"])
    tokens = jax.random.randint(jax.random.key(0), (cfg["batch"], cfg["seq"]), 0, cfg["vocab"])
    if time_it:
        params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    else:
        params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
        tokens = jax.ShapeDtypeStruct(tokens.shape, tokens.dtype)
    rows = []
    runners = []
    step, state, tok = make_full(model, params, tokens)
    full = Runner("full FT", step, state, tok, 2 * tree_bytes(params), compile_only=not time_it)
    runners.append(("all", full))
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
                step, state, tok = make_nnx(cfg, tokens, where)
                runners.append((where, Runner("nnx.LoRALinear", step, state, tok, tree_bytes(state[1]))))
            except Exception as e:  # a peer that fails to build is reported, not fatal
                log(f"  nnx peer failed: {e!r}")
        if time_it and "qwix" in peers:
            try:
                step, state, tok = make_qwix(model, tokens, where)
                runners.append((where, Runner("qwix LoRA", step, state, tok, tree_bytes(state[1]))))
            except Exception as e:
                log(f"  qwix peer failed: {e!r}")
    if time_it:
        for i in range(steps):  # round-robin: every mode sees the same background load
            for _, r in runners:
                r.once()
            log(f"  step {i + 1}/{steps}: " + ", ".join(f"{r.name} {r.times[-1] * 1e3:.0f}ms" for _, r in runners))
    base = full.info
    t_full = statistics.median(full.times) if full.times else None
    for where, r in runners:
        t = statistics.median(r.times) if r.times else None
        rows.append(
            {
                "config": cfg["name"],
                "targets": where,
                "mode": r.name,
                "step_s": t,
                "time_ratio": (t / t_full) if t and t_full else None,
                "flops": r.info["flops"],
                "flops_ratio": r.info["flops"] / base["flops"],
                "peak_bytes": r.info["peak_bytes"],
                "peak_ratio": (r.info["peak_bytes"] / base["peak_bytes"]) if base["peak_bytes"] else None,
                "opt_state_bytes": r.info["opt_state_bytes"],
                "compile_s": r.compile_s,
            }
        )
    if time_it and "torch" in peers:
        try:
            tsteps = max(2, steps // 2)  # torch steps are slow; a few suffice for a median
            tf, ob_full = torch_peft(cfg, "all_linear", tsteps, full=True)
            rows.append(
                dict(config=cfg["name"], targets="all", mode="torch full FT", step_s=tf, time_ratio=tf / t_full)
                | dict(opt_state_bytes=ob_full)
            )
            for where in targets:
                tp, ob = torch_peft(cfg, where, tsteps)
                rows.append(
                    dict(config=cfg["name"], targets=where, mode="PEFT (torch)", step_s=tp, time_ratio=tp / t_full)
                    | dict(opt_state_bytes=ob)
                )
        except Exception as e:
            log(f"  torch peer failed: {e!r}")
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


def tricks(cfg, steps, log):
    """Which CPU tricks pay: factored with sibling fusion and 2-D flattening switched on and off (all_linear)."""
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
    for _ in range(steps):
        for r in runners:
            r.once()
    rows = []
    for r in runners:
        rows.append({"variant": r.name, "step_s": statistics.median(r.times), "flops": r.info["flops"]})
        log(f"  {r.name:28} {rows[-1]['step_s'] * 1e3:7.0f} ms  FLOPs {r.info['flops']:.4e}")
    return rows


def fmt_bytes(b):
    return "-" if b is None else f"{b / 2**20:.1f} MiB"


def table(rows):
    head = (
        f"{'config':10} {'targets':10} {'mode':16} {'step ms':>9} {'t/full':>7} {'FLOPs/full':>10} "
        f"{'peak/full':>9} {'opt state':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:

        def f(k, spec):
            v = r.get(k)
            return format(v, spec) if isinstance(v, (int, float)) else "-"

        ms = f"{r['step_s'] * 1e3:.0f}" if r.get("step_s") else "-"
        lines.append(
            f"{r['config']:10} {r['targets']:10} {r['mode']:16} {ms:>9} {f('time_ratio', '.2f'):>7} "
            f"{f('flops_ratio', '.3f'):>10} {f('peak_ratio', '.3f'):>9} {fmt_bytes(r.get('opt_state_bytes')):>11}"
        )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes and 2 steps: a smoke test")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per mode (median)")
    ap.add_argument("--no-gpt2", action="store_true", help="skip the compile-only GPT-2-small shapes")
    ap.add_argument("--peers", default="nnx,qwix,torch", help="comma list of peers: nnx,qwix,torch (or 'none')")
    ap.add_argument("--tricks", action="store_true", help="only time factored with fuse/flatten on and off")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "train_step.json"))
    args = ap.parse_args()
    steps = args.steps or (2 if args.quick else 5)
    peers = set(args.peers.split(",")) - {"none", ""}

    def log(msg):
        print(msg, flush=True)

    small = dict(name="gpt-small", vocab=1024, d=512, layers=4, heads=8, seq=128, batch=8)
    if args.quick:
        small = dict(name="quick", vocab=128, d=64, layers=2, heads=4, seq=32, batch=2)
    t_start = time.perf_counter()
    if args.tricks:
        rows = tricks(small, steps, log)
        with open(args.json, "w") as fh:
            json.dump({"tricks": rows, "steps": steps}, fh, indent=1)
        return
    log(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; {platform.platform()}")
    rows, model, params, tokens = run_config(small, ["attn_qv", "all_linear"], steps, True, peers, log)
    inf = inference(model, params, tokens, steps)
    if not args.quick and not args.no_gpt2:
        gpt2 = dict(name="gpt2-124M", vocab=50257, d=768, layers=12, heads=12, seq=1024, batch=8)
        rows += run_config(gpt2, ["attn_qv", "all_linear"], 0, False, set(), log)[0]
    log(table(rows))
    log(
        f"\ninference ({small['name']}, all_linear): merged fwd {inf['merged_fwd_s'] * 1e3:.0f} ms, factored fwd "
        f"{inf['factored_fwd_s'] * 1e3:.0f} ms; FLOPs base {inf['base_flops']:.3e}, merged {inf['merged_flops']:.3e} "
        f"(equal: {inf['merged_equals_base_flops']}), factored {inf['factored_flops']:.3e}"
    )
    total = time.perf_counter() - t_start
    log(f"total {total:.0f}s")
    out = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__},
        "steps": steps,
        "rows": rows,
        "inference": inf,
        "total_s": total,
    }
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=1, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))


if __name__ == "__main__":
    main()
