"""One mixture-of-experts block, one training step: LoRA on every expert, factored vs merge vs full fine-tune vs floor.

    python benchmarks/moe_step.py [--steps 7] [--warmup 2] [--out PATH]   (the published configs)
    python benchmarks/moe_step.py --quick --out /tmp/moe_step.json        (tiny smoke run for CI)
    python benchmarks/moe_step.py --config "E64 top-8" --tokens 1024 --forms dense   (a CPU-sized run)

The block is Qwen3-MoE's: a router (top-k of a softmax, the k gates renormalised) and SwiGLU experts, each a stacked
kernel ``gate``/``up`` ``(E, d, ffn)`` and ``down`` ``(E, ffn, d)``, adapted per expert (layout ``sio``: A ``E x d_in
x r``, B ``E x r x d_out``; rank 8, alpha 16; the router stays frozen). Configs: E=8 top-2 and E=64 top-8, d 512, ffn
1024, 4096 tokens. Two dispatch forms:

* ``dense``: every expert runs every token and the router's gates (zero off the top-k) weight the results, one
  einsum per kernel (``td,edf->etf``): E/k times the FLOPs of the routed form, the simplest code.
* ``ragged``: the top-k copies of the tokens sorted by expert and ``jax.lax.ragged_dot`` with the group sizes
  (MaxText/megablox), then scattered back weighted by the gates.

Modes per form (adam, every step jitted with the frozen tree an argument, so XLA's peak counts it):

* ``factored``: ``lorajax.factored(block, strict=True)``, never forming an expert's merged weight or its gradient.
* ``merge``: ``block(lorajax.merge(params))``: forms ``E·d·ffn`` merged weights (and their gradients) per kernel.
* ``full``: full fine-tuning of the experts and the router.
* ``floor``: no LoRA, the base frozen under ``stop_gradient``; only an input offset trains, so the backward is the
  input-gradient chain through the experts with no weight gradient at all: the floor no LoRA step can beat.

Wall time is the median over ``--steps`` interleaved rounds (every mode once per round, shuffled order; warm-up
rounds first), FLOPs and peak memory are XLA's (``compiled.cost_analysis()`` / ``memory_analysis()``), and
``bank_arrays`` counts the values of an expert bank's full size the step's jaxpr computes (the merge path forms
them; the factored one should not). Ratios are to the floor of the same config and form. A factored mode no rule
supports yet (``ragged_dot`` before its rule) is recorded as ``unsupported`` with the reason, not run.

Writes JSON (default ``benchmarks/moe_step.json``) and prints a markdown table per config.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).parent))
from _gpt import compiled_step, equations, interleaved_rounds

import lorajax

RANK = 8
CONFIGS = {"E8 top-2": (8, 2), "E64 top-8": (64, 8)}
FULL = dict(d=512, ffn=1024, tokens=4096)
QUICK = dict(d=32, ffn=64, tokens=256)
KERNELS = ("gate", "up", "down")


def init_params(key, experts: int, d: int, ffn: int) -> dict:
    ks = jax.random.split(key, 4)
    normal = lambda k, shape, fan_in: jax.random.normal(k, shape, jnp.float32) / fan_in**0.5
    return {
        "router": {"kernel": normal(ks[0], (d, experts), d)},
        "gate": {"kernel": normal(ks[1], (experts, d, ffn), d)},
        "up": {"kernel": normal(ks[2], (experts, d, ffn), d)},
        "down": {"kernel": normal(ks[3], (experts, ffn, d), ffn)},
    }


def route(p, x, k: int):
    """Top-``k`` experts per token and their gates (renormalised over the k, as Qwen3-MoE does)."""
    probs = jax.nn.softmax(x @ p["router"]["kernel"], axis=-1)
    gates, idx = jax.lax.top_k(probs, k)
    return gates / gates.sum(-1, keepdims=True), idx


def dense_block(k: int):
    def block(p, x):
        gates, idx = route(p, x, k)
        combine = jnp.einsum("tk,tke->te", gates, jax.nn.one_hot(idx, p["router"]["kernel"].shape[1], dtype=x.dtype))
        h = jax.nn.silu(jnp.einsum("td,edf->etf", x, p["gate"]["kernel"]))
        h = h * jnp.einsum("td,edf->etf", x, p["up"]["kernel"])
        y = jnp.einsum("etf,efd->etd", h, p["down"]["kernel"])
        return jnp.einsum("etd,te->td", y, combine)

    return block


def ragged_block(k: int):
    def block(p, x):
        gates, idx = route(p, x, k)
        experts = p["router"]["kernel"].shape[1]
        flat = idx.reshape(-1)
        order = jnp.argsort(flat)
        token = order // k  # the token each sorted row copies
        sizes = jnp.bincount(flat, length=experts).astype(jnp.int32)
        xs = x[token]
        h = jax.nn.silu(jax.lax.ragged_dot(xs, p["gate"]["kernel"], sizes))
        h = h * jax.lax.ragged_dot(xs, p["up"]["kernel"], sizes)
        ys = jax.lax.ragged_dot(h, p["down"]["kernel"], sizes) * gates.reshape(-1)[order][:, None]
        return jnp.zeros_like(x).at[token].add(ys)

    return block


def mse(y, target):
    return jnp.mean((y - target) ** 2)


def _bank_arrays(step, args, shapes) -> int:
    """How many values of an expert bank's shape ``step``'s jaxpr computes (sub-jaxprs included)."""

    return sum(
        tuple(getattr(v.aval, "shape", ())) in shapes
        for eqn in equations(jax.make_jaxpr(step)(*args).jaxpr)
        if eqn.primitive.name != "stop_gradient"
        for v in eqn.outvars
    )


def make_mode(mode: str, block, params, x, target, shapes):
    tx = optax.adam(1e-4)
    if mode == "full":

        @jax.jit
        def step(p, opt, x, target):
            loss, g = jax.value_and_grad(lambda p: mse(block(p, x), target))(p)
            upd, opt = tx.update(g, opt, p)
            return optax.apply_updates(p, upd), opt, loss

        p = jax.tree.map(jnp.copy, params)
        state, extra = (p, tx.init(p)), (x, target)
    elif mode == "floor":

        @jax.jit
        def step(offset, opt, frozen, x, target):
            def loss_fn(offset):
                return mse(block(jax.lax.stop_gradient(frozen), x + offset), target)

            loss, g = jax.value_and_grad(loss_fn)(offset)
            upd, opt = tx.update(g, opt, offset)
            return optax.apply_updates(offset, upd), opt, loss

        offset = jnp.zeros(x.shape[-1], x.dtype)
        state, extra = (offset, tx.init(offset)), (params, x, target)
    else:
        lp = lorajax.lorafy(
            params, rank=RANK, alpha=2.0 * RANK, where=list(KERNELS), layout=dict.fromkeys(_paths(), "sio")
        )
        trainable, frozen = lorajax.partition(lp)
        fac = lorajax.factored(block, strict=True)

        def forward(t, frozen, x):
            p = lorajax.combine(t, frozen)
            return fac(p, x) if mode == "factored" else block(lorajax.merge(p), x)

        @jax.jit
        def step(t, opt, frozen, x, target):
            loss, g = jax.value_and_grad(lambda t: mse(forward(t, frozen, x), target))(t)
            upd, opt = tx.update(g, opt, t)
            return optax.apply_updates(t, upd), opt, loss

        state, extra = (trainable, tx.init(trainable)), (frozen, x, target)
    once, figures = compiled_step(step, state, *extra)
    return once, {**figures, "bank_arrays": _bank_arrays(step, (*state, *extra), shapes)}


def _paths() -> list[str]:
    return [f"{name}/kernel" for name in KERNELS]


def run_config(name: str, experts: int, k: int, size: dict, args) -> dict:
    d, ffn, tokens = size["d"], size["ffn"], size["tokens"]
    params = init_params(jax.random.key(0), experts, d, ffn)
    kx, kt = jax.random.split(jax.random.key(1))
    x, target = jax.random.normal(kx, (tokens, d)), jax.random.normal(kt, (tokens, d))
    shapes = {(experts, d, ffn), (experts, ffn, d)}
    modes, unsupported = {}, {}
    for form, make_block in (("dense", dense_block), ("ragged", ragged_block)):
        if form not in args.forms:
            continue
        for mode in ("factored", "merge", "full", "floor"):
            label = f"{form} {mode}"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", lorajax.FallbackWarning)
                    modes[label] = make_mode(mode, make_block(k), params, x, target, shapes)
            except (ValueError, NotImplementedError, lorajax.FallbackWarning) as e:
                if mode != "factored":
                    raise
                unsupported[label] = f"{type(e).__name__}: {e}"[:400]
                print(f"{name}: {label} unsupported: {unsupported[label][:160]}")
    rows, machine = interleaved_rounds(modes, args.warmup, args.steps)
    for label, why in unsupported.items():
        rows[label] = {"unsupported": why}
    ratios = {}
    for form in args.forms:
        floor = rows[f"{form} floor"]
        for mode in ("factored", "merge", "full"):
            r = rows[f"{form} {mode}"]
            for key, what in (("median_s", "wall"), ("flops", "flops"), ("peak_bytes", "peak")):
                if key in r:
                    ratios[f"{form} {mode}/floor, {what}"] = r[key] / floor[key]
    config = dict(experts=experts, top_k=k, rank=RANK, **size)
    return {"config": config, "rounds": args.steps, "machine": machine, "modes": rows, "ratios": ratios}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (d 32, ffn 64, 256 tokens), 3 rounds")
    ap.add_argument("--out", default=str(Path(__file__).parent / "moe_step.json"))
    ap.add_argument("--config", action="append", choices=sorted(CONFIGS), help="run only these configs (repeatable)")
    ap.add_argument("--tokens", type=int, help="tokens per step instead of the config's (CPU-sized runs)")
    ap.add_argument("--forms", default="dense,ragged", help="comma-separated dispatch forms to run")
    args = ap.parse_args()
    args.forms = [f for f in args.forms.split(",") if f]
    if not set(args.forms) <= {"dense", "ragged"}:
        ap.error(f"--forms {args.forms}: use dense and/or ragged")
    size = dict(QUICK if args.quick else FULL)
    if args.tokens:
        size["tokens"] = args.tokens
    if args.quick:
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
    chosen = {n: c for n, c in CONFIGS.items() if not args.config or n in args.config}
    results = {name: run_config(name, e, k, size, args) for name, (e, k) in chosen.items()}
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    for name, res in results.items():
        machine = res["machine"]
        print(
            f"\n{name}: {res['config']}, {args.steps} timed rounds; load average "
            f"{machine['loadavg_start']} -> {machine['loadavg_end']}"
        )
        print("| mode | median step (ms) | GFLOP | peak (MiB) | bank-size arrays |")
        print("|---|---:|---:|---:|---:|")
        for label, r in res["modes"].items():
            if "unsupported" in r:
                print(f"| {label} | unsupported | | | |")
                continue
            print(
                f"| {label} | {r['median_s'] * 1e3:.1f} | {r['flops'] / 1e9:.3f} | {r['peak_bytes'] / 2**20:.1f} "
                f"| {r['bank_arrays']} |"
            )
        for key, v in res["ratios"].items():
            print(f"{key}: {v:.3f}")


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing anything
    main()
