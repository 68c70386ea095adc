"""Merge precision for low-precision bases: lorajax.merge vs naive low-precision adds, against float64.

Run:  python benchmarks/precision.py            (d = 2048, a few seconds)
      python benchmarks/precision.py --quick    (d = 512)

A base kernel W (std 0.02, as in LLM weights) is stored in bf16 or fp16; float32 factors A, B give an
update scale*A@B whose size relative to W is swept (``rel`` = std(update) / std(W)). The reference is
computed in float64 from the very same stored values: ``W64 + scale * A64 @ B64``. Methods:

* ``floor``: the reference rounded once to the base dtype: the best any stored merge can do.
* ``lorajax.merge``: update and sum in float32 (Precision.HIGHEST), rounded once to the base dtype.
* ``f32 update, low add``: the update computed in float32, cast to the base dtype, added in the base
  dtype (two roundings; what a merge that adds in the weight's dtype does).
* ``low factors``: the whole adapter cast to the base dtype first (a model ``.to(bfloat16)``): the
  update is formed from rounded factors in the base dtype, then added in the base dtype.
* ``lorajax.merge, low factors``: lorafy(..., dtype=bf16) factors (the memory option) merged by lorajax.

Metrics per method: ``update lost`` = ||merged - ref|| / ||update|| (the share of the fine-tune that
the merge destroys), ``|err|/ulp`` max and mean (error in units of the base dtype's spacing at
max(|ref|, |W|) per element), and ``exact`` = fraction of elements equal to the correctly rounded
result (the floor).
A last table checks the factored forward (``lorajax.factored``) with low-precision activations:
``y = x @ W`` against float64.

Prints tables and writes JSON (default benchmarks/precision.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

import lorajax


def ulp(x: np.ndarray, dtype) -> np.ndarray:
    """Spacing of the low-precision dtype at |x| (computed exactly in float64)."""
    info = jnp.finfo(dtype)
    e = np.floor(np.log2(np.maximum(np.abs(x), float(info.smallest_normal))))
    return np.exp2(e - info.nmant)


def make(d: int, rel: float, dtype, rank: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(0.0, 0.02, (d, d)), dtype)
    lora = lorajax.lorafy({"w": {"kernel": w}}, rank=rank, where=["w"], key=jax.random.key(seed), alpha=2 * rank)
    node = lora["w"]["kernel"]
    # Scale B so that std(scale * A @ B) = rel * std(W).
    a = np.asarray(node.a, np.float64)
    b_dir = rng.standard_normal(node.b.shape)
    std = np.std(node.scale * a @ b_dir)
    b = jnp.asarray(b_dir * (rel * 0.02 / std), jnp.float32)
    return dataclasses.replace(node, b=b)


def metrics(merged, ref, floor, update, w, dtype) -> dict:
    m = np.asarray(merged, np.float64)
    err = np.abs(m - ref)
    # ulp at max(|ref|, |W|): where the update cancels W, the stored weight's own spacing is the fair unit.
    unit = ulp(np.maximum(np.abs(ref), np.abs(w)), dtype)
    return {
        "update_lost": float(np.linalg.norm(m - ref) / np.linalg.norm(update)),
        "max_err_ulp": float(np.max(err / unit)),
        "mean_err_ulp": float(np.mean(err / unit)),
        "exact": float(np.mean(m == floor)),
    }


def run_merge(d: int, rel: float, dtype) -> dict:
    node = make(d, rel, dtype)
    w64 = np.asarray(node.base, np.float64)
    a64, b64 = np.asarray(node.a, np.float64), np.asarray(node.b, np.float64)
    update = node.scale * a64 @ b64
    ref = w64 + update
    floor = np.asarray(jnp.asarray(ref.astype(np.float32), dtype), np.float64)  # f64 -> f32 exact enough, one rounding
    floor_direct = np.asarray(ref.astype(jnp.dtype(dtype)), np.float64)
    if np.mean(floor == floor_direct) < 1:  # keep the stricter, direct rounding where the dtype library has it
        floor = floor_direct
    tree = {"w": {"kernel": node}}
    ours = jax.jit(lorajax.merge)(tree)["w"]["kernel"]
    f32_update = lorajax.delta(node)
    two_roundings = node.base + f32_update.astype(dtype)
    a_lo, b_lo = node.a.astype(dtype), node.b.astype(dtype)
    low = node.base + (jnp.asarray(node.scale, dtype) * jnp.matmul(a_lo, b_lo, preferred_element_type=dtype))
    low_factor_node = dataclasses.replace(node, a=a_lo, b=b_lo)
    ours_low_factors = jax.jit(lorajax.merge)({"w": {"kernel": low_factor_node}})["w"]["kernel"]
    methods = {
        "floor": floor,
        "lorajax.merge": ours,
        "f32 update, low add": two_roundings,
        "low factors": low,
        "lorajax.merge, low factors": ours_low_factors,
    }
    return {name: metrics(v, ref, floor, update, w64, dtype) for name, v in methods.items()}


def run_factored(d: int, dtype, batch: int = 256) -> dict:
    node = make(d, 0.1, dtype, seed=1)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((batch, d)), dtype)
    x64 = np.asarray(x, np.float64)
    ref = x64 @ (np.asarray(node.base, np.float64) + node.scale * np.asarray(node.a, np.float64) @ np.asarray(node.b))
    fn = lambda p, x: x @ p["w"]["kernel"]
    tree = {"w": {"kernel": node}}
    outs = {
        "factored (LoRA branch in x dtype)": jax.jit(lorajax.factored(fn))(tree, x),
        "merge then x @ W": jax.jit(lambda t, x: fn(lorajax.merge(t), x))(tree, x),
        "float32 everywhere": fn(
            jax.tree.map(lambda v: v.astype(jnp.float32), lorajax.merge(tree)), x.astype(jnp.float32)
        ),
    }
    scale = np.linalg.norm(ref)
    return {
        k: {"dtype": str(v.dtype), "rel_err": float(np.linalg.norm(np.asarray(v, np.float64) - ref) / scale)}
        for k, v in outs.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "precision.json"))
    args = ap.parse_args()
    d = 512 if args.quick else 2048
    results: dict = {
        "d": d,
        "rank": 16,
        "jax": jax.__version__,
        "machine": platform.machine(),
        "merge": [],
        "factored": {},
    }
    for dtype in (jnp.bfloat16, jnp.float16):
        name = jnp.dtype(dtype).name
        print(f"\n{name} base {d}x{d}, float32 factors rank 16 (float64 reference)")
        head = ("rel", "method", "update lost", "max |err|/ulp", "mean |err|/ulp", "exact")
        rows = []
        for rel in (0.01, 0.1, 1.0):
            for method, m in run_merge(d, rel, dtype).items():
                results["merge"].append({"dtype": name, "rel": rel, "method": method, **m})
                rows.append(
                    (
                        f"{rel:g}",
                        method,
                        f"{100 * m['update_lost']:.2f}%",
                        f"{m['max_err_ulp']:.2f}",
                        f"{m['mean_err_ulp']:.3f}",
                        f"{100 * m['exact']:.3f}%",
                    )
                )
        widths = [max(len(r[k]) for r in [head, *rows]) for k in range(len(head))]
        for i, r in enumerate([head, *rows]):
            print(" | ".join(c.ljust(w) if k < 2 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths))))
            if i == 0:
                print("-+-".join("-" * w for w in widths))
        fac = run_factored(d, dtype)
        results["factored"][name] = fac
        print(f"forward y = x @ W with {name} activations, relative error vs float64:")
        for k, v in fac.items():
            print(f"  {k:36s} {v['dtype']:9s} {v['rel_err']:.2e}")
    with open(args.json, "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
