"""Quantized bases on 8 virtual CPU devices with explicit mesh axes, run once by tests/test_quant_sharding.py.

``jax.make_mesh`` gives explicit axes by default; the base is FSDP-sharded (fan-in) on them. Prints one JSON
document on its last stdout line. Run by hand to debug: ``python tests/_quant_mesh_worker.py``.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # only as a script: pytest's doctest collection imports this file too
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lorajax

FORMATS = [("nf4", True), ("nf4", False), ("int8", False), ("fp8", False)]


def mlp(params, x):
    return jax.nn.relu(x @ params["fc1"]["kernel"]) @ params["fc2"]["kernel"]


def kernels(mesh, results) -> None:
    """Each format on fan-in (FSDP) and fan-out shardings: bits as on one device, per-device bytes."""
    w = jnp.asarray(np.random.default_rng(0).standard_normal((512, 256), np.float32))
    out = {}
    for kind, dq in FORMATS:
        quant = lambda x: lorajax.quantize({"k": x}, where=["k"], dtype=kind, double_quant=dq)["k"]
        one = quant(w)
        for axis, spec in (("fan_in", P("fsdp", None)), ("fan_out", P(None, "fsdp"))):
            q = quant(jax.device_put(w, NamedSharding(mesh, spec)))
            back = lorajax.dequantize(q)
            jit_back = jax.jit(lorajax.dequantize)(q)
            arrays = {f: getattr(q, f) for f in ("codes", "scales", "nested", "offset") if getattr(q, f) is not None}
            out[f"{kind}_{'dq' if dq else 'plain'}_{axis}"] = {
                "specs": {f: str(x.sharding.spec) for f, x in arrays.items()},
                # the same bits as one device, whatever shape the codes are kept in
                "codes_equal": all(
                    np.array_equal(np.asarray(x).reshape(-1), np.asarray(getattr(one, f)).reshape(-1))
                    for f, x in arrays.items()
                ),
                "dequantize_equal": bool(np.array_equal(np.asarray(back), np.asarray(lorajax.dequantize(one)))),
                # jit against jit: XLA may fuse the double-quantization multiply-add differently from eager ops
                "jit_dequantize_equal": bool(
                    np.array_equal(np.asarray(jit_back), np.asarray(jax.jit(lorajax.dequantize)(one)))
                ),
                "dequantize_spec": str(back.sharding.spec),
                "per_device": {f: x.addressable_shards[0].data.nbytes for f, x in arrays.items()},
                # what one device's program takes in: its share of the codes and scales
                "argument_bytes": jax.jit(lorajax.dequantize)
                .lower(q)
                .compile()
                .memory_analysis()
                .argument_size_in_bytes,
                "total": {f: x.nbytes for f, x in arrays.items()},
            }
    try:
        lorajax.quantize({"k": jax.device_put(w, NamedSharding(mesh, P("fsdp", None)))}, where=["k"], block_size=128)
        out["misaligned_error"] = ""
    except ValueError as e:
        out["misaligned_error"] = str(e)
    results["kernels"] = out


def qlora(mesh, results) -> None:
    """A QLoRA MLP with an FSDP-sharded NF4 base: forward and gradient through merge and factored, as one device."""
    rng = np.random.default_rng(1)
    # 256 inputs a kernel: 32 columns of each row a device, whole blocks of 32.
    base = {"fc1": {"kernel": rng.normal(0, 0.2, (256, 256))}, "fc2": {"kernel": rng.normal(0, 0.2, (256, 256))}}
    base = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), base)
    x = jnp.asarray(rng.standard_normal((8, 256), np.float32))

    def build(params):
        quantized = lorajax.quantize(params, where=["fc1", "fc2"], block_size=32)
        lora = lorajax.lorafy(quantized, rank=4, where=["fc1", "fc2"])

        def fill(n):  # a nonzero B, the same on every mesh
            if not lorajax.is_lora(n):
                return n
            b = 0.1 * np.random.default_rng(n.b.size).standard_normal(n.b.shape, np.float32)
            return lorajax.LoRA(base=n.base, a=n.a, b=jax.device_put(b, n.b.sharding), spec=n.spec)

        return jax.tree.map(fill, lora, is_leaf=lorajax.is_lora)

    paths = {
        "merge": lambda p, x: mlp(lorajax.merge(p), x),
        "factored": lorajax.factored(mlp),
    }
    sharded = jax.device_put(base, NamedSharding(mesh, P("fsdp", None)))
    ref, lora = build(base), build(sharded)
    out = {"codes_spec": str(lora["fc1"]["kernel"].base.codes.sharding.spec)}
    # partition_specs from the dense specs describes the arrays as quantize placed them
    specs = lorajax.partition_specs(lora, jax.tree.map(lambda _: P("fsdp", None), base))
    out["partition_specs_match"] = all(
        jax.tree.leaves(
            jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(NamedSharding(mesh, s), x.ndim), lora, specs)
        )
    )
    for name, apply in paths.items():
        loss = lambda t, f: jnp.sum(apply(lorajax.combine(t, f), x) ** 2)
        step = jax.jit(jax.value_and_grad(loss))
        (v1, g1), (v8, g8) = step(*lorajax.partition(ref)), step(*lorajax.partition(lora))
        fwd = jax.jit(apply)
        out[name] = {
            # relative to the largest value: the fan-in shards sum their partial products in another order
            "forward_err": float(np.max(np.abs(np.asarray(fwd(lora, x)) - np.asarray(fwd(ref, x)))))
            / float(np.max(np.abs(np.asarray(fwd(ref, x))))),
            "loss_rel": abs(float(v8) - float(v1)) / abs(float(v1)),
            "grad_err": max(
                float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))
                for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1))
            ),
        }
    results["qlora"] = out


def explicit_merge(mesh, results) -> None:
    """A QLoRA step through merge on the explicit-axis mesh itself (dequantize runs under auto_axes there)."""
    rng = np.random.default_rng(2)
    base = {"fc1": {"kernel": rng.normal(0, 0.2, (256, 256))}, "fc2": {"kernel": rng.normal(0, 0.2, (256, 256))}}
    base = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), base)
    x = jnp.asarray(rng.standard_normal((8, 256), np.float32))
    build = lambda p: lorajax.lorafy(lorajax.quantize(p, where=["fc1", "fc2"], block_size=32), rank=4, where=["fc1"])
    loss = lambda t, f: jnp.sum(mlp(lorajax.merge(lorajax.combine(t, f)), x) ** 2)
    step = jax.jit(jax.value_and_grad(loss))
    try:
        (v1, _), (v8, _) = (
            step(*lorajax.partition(build(base))),
            step(*lorajax.partition(build(jax.device_put(base, NamedSharding(mesh, P("fsdp", None)))))),
        )
        results["explicit_merge_loss_rel"] = abs(float(v8) - float(v1)) / abs(float(v1))
    except Exception as e:  # reported, not raised: the test says what failed
        results["explicit_merge_loss_rel"] = f"{type(e).__name__}: {e}"[:2000]


def requantized(mesh, results) -> None:
    """requantize (merge for serving) of an FSDP-sharded QLoRA layer: codes sharded again, the one-device bits."""
    w = {"fc": {"kernel": jnp.asarray(np.random.default_rng(3).standard_normal((256, 128), np.float32))}}

    def build(p):
        node = lorajax.lorafy(lorajax.quantize(p, where=["fc"], block_size=32), rank=4, where=["fc"])["fc"]["kernel"]
        b = 0.1 * np.random.default_rng(0).standard_normal(node.b.shape, np.float32)
        return {
            "fc": {
                "kernel": lorajax.LoRA(base=node.base, a=node.a, b=jax.device_put(b, node.b.sharding), spec=node.spec)
            }
        }

    one = lorajax.requantize(build(w))["fc"]["kernel"]
    q = lorajax.requantize(build(jax.device_put(w, NamedSharding(mesh, P("fsdp", None)))))["fc"]["kernel"]
    results["requantize"] = {
        "codes_spec": str(q.codes.sharding.spec),
        "equal": bool(np.array_equal(np.asarray(lorajax.dequantize(q)), np.asarray(lorajax.dequantize(one)))),
    }


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("fsdp",))  # explicit axes: JAX's default
    results: dict = {"axis_types": [str(t) for t in mesh.axis_types]}
    kernels(mesh, results)
    explicit_merge(mesh, results)
    requantized(mesh, results)
    # The factored path's custom VJP does not take explicit-axis types yet: the QLoRA step runs on automatic axes.
    qlora(jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,)), results)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
