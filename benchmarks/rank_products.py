"""How XLA:CPU runs the backward of the rank-r product ``t = x @ A`` at the benchmark GPT's shapes.

Autodiff of ``x @ A`` asks for ``dA = xᵀ · g`` with shape (in, r). XLA:CPU folds the transpose into the dot and runs
it with the long token axis contracted on both sides and a skinny (in, r) output, which is slow there. Computing
``(gᵀ · x)`` in the (r, in) orientation and transposing the small result behind an optimization barrier (so XLA
cannot fold it back) gives the same numbers. This script times both, interleaved, next to PyTorch's ``xᵀ @ g``.

Run:  python benchmarks/rank_products.py            (about 30 s on 2 cores)
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax


@jax.custom_vjp
def rank_major_product(x, a):
    """``x @ a`` whose backward computes ``dA`` as ``(gᵀ · x)ᵀ`` with the transpose kept out of the dot."""
    return x @ a


def _fwd(x, a):
    return x @ a, (x, a)


def _bwd(res, g):
    x, a = res
    return g @ a.T, lax.optimization_barrier(g.T @ x).T


rank_major_product.defvjp(_fwd, _bwd)


def torch_bwd(x, g, a):
    return x.T @ g, g @ a.T


def vjp_step(f):
    def run(x, a, g):
        return jax.vjp(f, x, a)[1](g)

    return jax.jit(run)


def main():
    rounds = int(os.environ.get("ROUNDS", "40"))
    cases = {}
    key = jax.random.key(0)
    for n_in, r in ((512, 8), (512, 24), (2048, 8)):  # q/k/v fused (r 24), out and fc1 (in 512), fc2 (in 2048)
        x, a, g = (jax.random.normal(key, s) for s in ((1024, n_in), (n_in, r), (1024, r)))
        stock, custom = vjp_step(lambda x, a: x @ a), vjp_step(rank_major_product)
        same = all(bool(jnp.allclose(p, q, rtol=1e-5, atol=1e-5)) for p, q in zip(stock(x, a, g), custom(x, a, g)))
        cases[f"in {n_in}, r {r}: autodiff of x@A"] = (stock, (x, a, g))
        cases[f"in {n_in}, r {r}: dA as (gT x)T  [same: {same}]"] = (custom, (x, a, g))
        try:
            import numpy as np
            import torch

            torch.set_num_threads(len(os.sched_getaffinity(0)))
            tx, tg, ta = (torch.from_numpy(np.array(v)) for v in (x, g, a))
            cases[f"in {n_in}, r {r}: torch x.T@g and g@A.T"] = (torch_bwd, (tx, tg, ta))
        except ImportError:
            pass
    for f, args in cases.values():
        jax.block_until_ready(f(*args))
    times = {k: [] for k in cases}
    for _ in range(rounds):
        for k, (f, args) in cases.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[k].append(time.perf_counter() - t0)
    print(f"load average {os.getloadavg()[0]:.2f}; {rounds} interleaved rounds; median and fastest, ms")
    for k, v in times.items():
        print(f"  {k:52} {statistics.median(v) * 1e3:8.3f} {min(v) * 1e3:8.3f}")


if __name__ == "__main__":
    main()
