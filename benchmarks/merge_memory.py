"""Peak memory of merging a lorafied model: jit(merge) vs jit(merge, donate) vs merge(donate=True).

Run:  python benchmarks/merge_memory.py            (toy sweep + Llama-2-7B-shaped bf16 model, ~1 min)
      python benchmarks/merge_memory.py --quick    (toy sweep only)

Nothing is allocated: every program is lowered on ``jax.ShapeDtypeStruct`` trees and compiled, and
its ``compiled.memory_analysis()`` gives argument, output, alias (donated input reused as output) and
temporary bytes. A program's peak is ``arguments + outputs - aliased + temporaries``.

* ``jit(merge)``: one program over the whole tree; the lorafied model and the merged copy coexist.
* ``jit(merge, donate)``: the same with ``donate_argnums=0``; XLA may reuse base buffers for outputs,
  but the whole tree's temporaries are scheduled in one program.
* ``merge(donate=True)``: one small program per target, each donating its base. While target k is
  merged, the rest of the model sits in memory untouched, so the peak is
  ``model + factors + max_k(outputs_k - aliased_k + temporaries_k)``.

Prints a table and writes JSON (default benchmarks/merge_memory.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

import lorajax
from lorajax import _merge

MiB = 2**20


def stacked_model(layers: int, d: int, dtype) -> dict:
    return {f"layer_{i}": {"dense": {"kernel": jax.ShapeDtypeStruct((d, d), dtype)}} for i in range(layers)}


def llama2_7b_shapes() -> dict:
    """Llama-2-7B-shaped abstract params: 32 layers, d 4096, ffn 11008, vocab 32000, bf16."""
    d, f, v = 4096, 11008, 32000
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    layer = {
        "self_attn": {n: {"kernel": s(d, d)} for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "mlp": {"gate_proj": {"kernel": s(d, f)}, "up_proj": {"kernel": s(d, f)}, "down_proj": {"kernel": s(f, d)}},
        "input_layernorm": {"scale": s(d)},
        "post_attention_layernorm": {"scale": s(d)},
    }
    return {
        "embed_tokens": {"embedding": s(v, d)},
        **{f"layers_{i}": layer for i in range(32)},
        "norm": {"scale": s(d)},
        "lm_head": {"kernel": s(d, v)},
    }


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def peak(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
        "temporaries": m.temp_size_in_bytes,
    }
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def measure(name: str, base: dict, rank: int, where) -> dict:
    lora = lorajax.lorafy(base, rank=rank, where=where, key=jax.random.key(0))
    model, factors = nbytes(base), nbytes(lora) - nbytes(base)
    t0 = time.perf_counter()
    whole = peak(jax.jit(lorajax.merge).lower(lora).compile())
    with warnings.catch_warnings():  # the factors are donated too but have no output to alias: expected
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        donated = peak(jax.jit(lorajax.merge, donate_argnums=0).lower(lora).compile())
    # merge(donate=True): the per-target programs it runs (one per distinct shape/dtype/layout).
    sharding = SingleDeviceSharding(jax.devices()[0])
    worst, biggest_kernel, programs = 0, 0, {}
    for node in jax.tree.leaves(lora, is_leaf=lorajax.is_lora):
        if not lorajax.is_lora(node):
            continue
        meta = node.spec
        sig = (node.base.shape, node.base.dtype, node.a.dtype, meta)
        if sig not in programs:
            compiled = _merge.merge_program(sharding).lower(node.base, node.a, node.b, meta).compile()
            programs[sig] = peak(compiled)
        p = programs[sig]
        worst = max(worst, p["outputs"] - p["aliased"] + p["temporaries"])
        biggest_kernel = max(biggest_kernel, node.base.size * node.base.dtype.itemsize)
    per_target = {"peak": model + factors + worst, "extra_over_model_and_factors": worst, "programs": len(programs)}
    row = {
        "model": name,
        "model_bytes": model,
        "factor_bytes": factors,
        "biggest_kernel_bytes": biggest_kernel,
        "jit_merge": whole,
        "jit_merge_donated": donated,
        "merge_donate_true": per_target,
        "compile_seconds": time.perf_counter() - t0,
    }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="toy sweep only")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "merge_memory.json"))
    args = ap.parse_args()

    cases = [
        (f"{layers} x {d}x{d} {jnp.dtype(dt).name}", stacked_model(layers, d, dt), 16, ["dense"])
        for layers, d, dt in [(8, 1024, jnp.float32), (8, 2048, jnp.float32), (16, 2048, jnp.bfloat16)]
    ]
    if not args.quick:
        cases.append(("Llama-2-7B shapes bf16, all_linear r16", llama2_7b_shapes(), 16, lorajax.all_linear))
    rows = [measure(*c) for c in cases]

    head = ("model", "model MiB", "jit(merge)", "jit(merge, donate)", "merge(donate=True)", "largest kernel")
    table = [head]
    for r in rows:
        rel = lambda b: f"{b / MiB:,.0f} ({b / r['model_bytes']:.2f}x)"
        table.append(
            (
                r["model"],
                f"{r['model_bytes'] / MiB:,.0f}",
                rel(r["jit_merge"]["peak"]),
                rel(r["jit_merge_donated"]["peak"]),
                rel(r["merge_donate_true"]["peak"]),
                f"{r['biggest_kernel_bytes'] / MiB:,.0f}",
            )
        )
    widths = [max(len(t[k]) for t in table) for k in range(len(head))]
    print("Peak memory of merging (MiB, and x model size), from compiled memory_analysis():")
    for i, t in enumerate(table):
        print(" | ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(t, widths))))
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    out = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "machine": platform.machine(),
        "rows": rows,
    }
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=1, default=str)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
