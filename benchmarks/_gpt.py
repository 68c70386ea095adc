"""The GPT-style linen transformer the benchmarks share."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class Block(nn.Module):
    d: int
    heads: int

    @nn.compact
    def __call__(self, x, mask):
        h = nn.LayerNorm(name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(self.heads, deterministic=True, name="attn")(h, h, mask=mask)
        h = nn.LayerNorm(name="ln2")(x)
        return x + nn.Dense(self.d, name="fc2")(nn.gelu(nn.Dense(4 * self.d, name="fc1")(h)))


class GPT(nn.Module):
    """Token embedding (+ learned positions when ``seq`` > 0), pre-norm blocks, untied head."""

    vocab: int
    d: int
    layers: int
    heads: int
    seq: int = 0

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.d, name="wte")(tokens)
        if self.seq:
            x = x + nn.Embed(self.seq, self.d, name="wpe")(jnp.arange(tokens.shape[1]))[None]
        mask = nn.make_causal_mask(tokens)
        for i in range(self.layers):
            x = Block(self.d, self.heads, name=f"h{i}")(x, mask)
        return nn.Dense(self.vocab, use_bias=False, name="lm_head")(nn.LayerNorm(name="ln_f")(x))


def tree_bytes(tree: Any) -> int:
    """Bytes of every array leaf of ``tree``."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def lm_loss(logits, tokens):
    """Next-token cross-entropy, mean over batch and positions."""
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def compiled_step(step, state, *extra):
    """Compile ``step(*state, *extra) -> (*state, loss)`` and return ``(once, figures)``.

    ``once()`` runs one step on the carried state and returns its wall time in seconds; ``figures`` holds XLA's
    FLOPs and memory (noise-free: from the compiled program, not from timing).
    """
    compiled = step.lower(*state, *extra).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    box = {"state": tuple(state)}

    def once():
        t0 = time.perf_counter()
        *new, loss = compiled(*box["state"], *extra)
        loss.block_until_ready()
        box["state"] = tuple(new)
        return time.perf_counter() - t0

    return once, {"flops": float(cost["flops"]), "peak_bytes": int(peak), "temp_bytes": int(mem.temp_size_in_bytes)}


def equations(jaxpr: Any):
    """Every equation of ``jaxpr`` and of its sub-jaxprs (scan and cond bodies, pjit, custom derivatives), in order."""
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for j in v if isinstance(v, tuple) else (v,):
                inner = getattr(j, "jaxpr", j)
                if hasattr(inner, "eqns"):
                    yield from equations(inner)


def round_order(names: list[str], k: int) -> list[str]:
    """Round ``k``'s order of ``names``: a permutation drawn from seed ``k``, so rounds are reproducible.

    A mode timed right after a heavy one pays for it (caches evicted: on XLA:CPU a one-hot bank step ran 19 ms after
    the gather form and 13 ms after itself), and a fixed or rotated order always puts the same mode behind it.
    """
    return [names[i] for i in np.random.default_rng(k).permutation(len(names))]


def interleaved_rounds(modes, warmup, steps):
    """Step every mode once per round (``modes``: name -> (once, figures)); ``(rows, machine)`` from the timed rounds.

    Round-robin timing puts a load spike from other processes on every mode alike; the order is shuffled each
    round (:func:`round_order`). Each row is the mode's figures plus the median and every timed step; ``machine``
    records the platform and the load average around the rounds.
    """
    load_start = os.getloadavg()
    times: dict[str, list[float]] = {name: [] for name in modes}
    for k in range(warmup + steps):
        for name in round_order(list(modes), k):
            dt = modes[name][0]()
            if k >= warmup:
                times[name].append(dt)
    rows = {
        name: {**info, "median_s": statistics.median(times[name]), "times_s": times[name]}
        for name, (_, info) in modes.items()
    }
    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }
    return rows, machine


def add_step_args(ap: argparse.ArgumentParser, steps: int, out: str) -> None:
    """The options of a one-training-step benchmark on this GPT: rounds and model/batch size."""
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", default=out)


def step_setup(args: argparse.Namespace) -> tuple[dict, GPT, jax.Array, Any]:
    """``(config, model, tokens, params)`` for :func:`add_step_args`' options (vocab 512, 4 heads)."""
    cfg = dict(vocab=512, d=args.d, layers=args.layers, heads=4, seq=args.seq, batch=args.batch)
    model = GPT(cfg["vocab"], cfg["d"], cfg["layers"], cfg["heads"], cfg["seq"])
    tokens = jax.random.randint(jax.random.key(0), (cfg["batch"], cfg["seq"]), 0, cfg["vocab"])
    return cfg, model, tokens, model.init(jax.random.key(1), tokens)["params"]
