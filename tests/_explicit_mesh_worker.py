"""``lorajax.factored`` gradients on 8 virtual CPU devices with explicit mesh axes, run once by
tests/test_explicit_mesh.py.

A two-layer MLP, its kernels sharded on a ``jax.make_mesh`` mesh with ``AxisType.Explicit`` axes (fan-out, then
fan-in: the second product contracts a sharded axis and names its ``out_sharding``), the batch on ``data``. Each
case compares ``jax.grad`` through ``factored`` with ``jax.grad`` through ``merge``, both jitted under
``jax.set_mesh``. Prints one JSON document on its last stdout line. Run by hand to debug:
``python tests/_explicit_mesh_worker.py``.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # only as a script: pytest's doctest collection imports this file too
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"

import json
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lorajax


def mlp(params, x):
    h = jax.nn.relu(x @ params["fc1"]["kernel"])  # (batch@data, hidden@model)
    return jnp.matmul(h, params["fc2"]["kernel"], out_sharding=P("data", None))  # contracts hidden@model


def case(mesh, dora: bool, quantized: bool) -> dict:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 128), np.float32) / 8
    w2 = rng.standard_normal((128, 64), np.float32) / 11
    put = lambda v, spec: jax.device_put(jnp.asarray(v), NamedSharding(mesh, spec))
    params = {"fc1": {"kernel": put(w1, P(None, "model"))}, "fc2": {"kernel": put(w2, P("model", None))}}
    if quantized:
        params = lorajax.quantize(params, where=["fc1", "fc2"], dtype="nf4", block_size=32)
    x = put(rng.standard_normal((16, 64), np.float32), P("data", None))
    lp = lorajax.lorafy(params, rank=4, where=["fc1", "fc2"], dora=dora, key=jax.random.key(0), init="gaussian")
    trainable, frozen = lorajax.partition(lp)
    # b nonzero, magnitudes off their initial norms: every factor gets a gradient that depends on the others
    trainable = jax.tree.map(
        lambda v: v + 0.05 * jnp.cos(jnp.arange(v.size, dtype=v.dtype).reshape(v.shape)), trainable
    )
    fac = lorajax.factored(mlp)
    loss_f = lambda t: jnp.mean(fac(lorajax.combine(t, frozen), x) ** 2)
    loss_m = lambda t: jnp.mean(mlp(lorajax.merge(lorajax.combine(t, frozen)), x) ** 2)
    with jax.set_mesh(mesh):
        lf, gf = jax.jit(jax.value_and_grad(loss_f))(trainable)
        lm, gm = jax.jit(jax.value_and_grad(loss_m))(trainable)
    names = [
        "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in p)
        for p, _ in jax.tree_util.tree_leaves_with_path(gf)
    ]
    leaves_f, leaves_m = jax.tree.leaves(gf), jax.tree.leaves(gm)
    return {
        "loss": [float(lf), float(lm)],
        "grads": {
            n: {
                "max_abs_diff": float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))),
                "max_abs": float(np.max(np.abs(np.asarray(b)))),
                "spec": str(jax.typeof(a).sharding.spec),
                "merge_spec": str(jax.typeof(b).sharding.spec),
                "primal_spec": str(jax.typeof(t).sharding.spec),
            }
            for n, a, b, t in zip(names, leaves_f, leaves_m, jax.tree.leaves(trainable))
        },
    }


def main() -> None:
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    out: dict = {"axis_types": [str(t) for t in mesh.axis_types], "cases": {}}
    for name, dora, quantized in (
        ("lora", False, False),
        ("dora", True, False),
        ("qlora", False, True),
        ("qdora", True, True),
    ):
        try:
            out["cases"][name] = case(mesh, dora, quantized)
        except Exception as e:  # reported, so the test names the failing case
            out["cases"][name] = {"error": f"{type(e).__name__}: {e}"[:2000], "trace": traceback.format_exc()[-3000:]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
