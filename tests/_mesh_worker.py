"""Mesh checks on 8 virtual CPU devices, run ONCE in a subprocess by tests/test_sharding.py.

Forcing 8 host devices must happen before JAX starts, so it cannot run inside the main pytest
process. This script runs every mesh case in one process (one XLA start-up) and prints one JSON
document on its last stdout line; the test module asserts on it. Run it by hand to debug:

    python tests/_mesh_worker.py
"""

from __future__ import annotations

import dataclasses
import os

if __name__ == "__main__":  # only as a script: pytest's doctest collection imports this file too
    # 8 virtual devices; a cheap LLVM backend (the collectives checked below are chosen before it runs).
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (
        " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
        " --xla_llvm_disable_expensive_passes=true"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"

import json
import re
import sys
import time
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _models import TinyGPT, lm_loss

import lorajax
from lorajax import _merge

TARGETS = ["query", "key", "value", "out", "fc1", "fc2"]
STEPS = 2
EPS = 1e-3  # adam's update is then a smooth function of the gradient, so mesh/one-device agree closely


def spec_for(case: str, path: str, shape: tuple[int, ...]) -> P:
    """The base model's PartitionSpec per leaf for each mesh case (mesh axes 'data' x 'model' = 2 x 4)."""
    if case == "dp" or len(shape) < 2:
        if case == "tp" and re.search(r"(query|key|value)/bias$", path):
            return P("model", None)  # heads
        if case == "tp" and re.search(r"fc1/bias$", path):
            return P("model")
        return P()
    if case == "fsdp":
        return P("model")  # every matrix sharded on its first (fan-in) axis
    # tensor parallel (Megatron): q/k/v by heads (fan-out), out by heads (fan-in), fc1 fan-out, fc2 fan-in.
    if re.search(r"(query|key|value)/kernel$", path):
        return P(None, "model", None)
    if re.search(r"out/kernel$", path):
        return P("model", None, None)
    if re.search(r"fc1/kernel$", path):
        return P(None, "model")
    if re.search(r"fc2/kernel$", path):
        return P("model", None)
    return P()


DATA_SPEC = {"dp": P(("data", "model")), "fsdp": P(("data", "model")), "tp": P("data")}


def full_kernel_collectives(hlo: str, shapes: set[tuple[int, ...]], ops=("all-gather",)) -> list[str]:
    """Collective ops in compiled HLO whose result has the full shape of a LoRA base kernel."""
    found = []
    for line in hlo.splitlines():
        m = re.search(r"=\s*\(?([a-z0-9]+)\[([0-9,]*)\][^=]*?\s(" + "|".join(ops) + r")(-start)?\(", line)
        if m:
            shape = tuple(int(d) for d in m.group(2).split(",") if d)
            if shape in shapes:
                found.append(line.strip()[:160])
    return found


def make_step(model, tx, factored: bool):
    apply = lorajax.factored(model.apply) if factored else (lambda v, t: model.apply(lorajax.merge(v), t))

    def loss_fn(params, tokens):
        return lm_loss(apply({"params": params}, tokens), tokens)

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def factors(params):
    out = {}
    for path, node in jax.tree_util.tree_flatten_with_path(params, is_leaf=lorajax.is_lora)[0]:
        if lorajax.is_lora(node):
            name = lorajax.path_str(path)
            out[name + "/a"] = np.asarray(node.a)
            out[name + "/b"] = np.asarray(node.b)
    return out


def run_steps(step, params, opt_state, tokens):
    losses = []
    for _ in range(STEPS):
        params, opt_state, loss = step(params, opt_state, tokens)
        losses.append(float(loss))
    return params, losses


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


T0 = time.time()


class ScanBlock(nn.Module):
    d: int

    @nn.compact
    def __call__(self, x, _):
        x = x + nn.SelfAttention(num_heads=4, deterministic=True, name="attn")(nn.LayerNorm()(x))
        h = nn.gelu(nn.Dense(4 * self.d, name="fc1")(nn.LayerNorm()(x)))
        return x + nn.Dense(self.d, name="fc2")(h), None


class ScanLM(nn.Module):
    """A transformer whose layers are stacked by nn.scan, as every large JAX LLM does: each kernel has a leading
    layer axis (q/k/v "sioo", out "siio", fc1/fc2 "sio") and every layer keeps its own factors."""

    vocab: int = 64
    d: int = 32
    layers: int = 3

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.d, name="embed")(tokens)
        stack = nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers)
        x, _ = stack(self.d, name="blocks")(x, None)
        return nn.Dense(self.vocab, name="head")(x)


def scan_spec(case: str, path: str, shape: tuple[int, ...]) -> P:
    # Stacked kernels: layer axis unsharded; heads, fc1 fan-out, fc2 fan-in on 'model' (tensor parallel per layer).
    if re.search(r"(query|key|value)/kernel$", path):
        return P(None, None, "model", None)
    if path.endswith("out/kernel"):
        return P(None, "model", None, None)
    if path.endswith("fc1/kernel"):
        return P(None, None, "model")
    if path.endswith("fc2/kernel"):
        return P(None, "model", None)
    return P()


def cheap_init(key, base, layout, rank, dtype):
    """Deterministic factors without a PRNG program: XLA compiles threefry slowly on CPU, and the training
    checks compare against a one-device run, which only needs the same start (B is filled in below)."""
    a_shape, b_shape = layout.a_shape(base.shape, rank), layout.b_shape(base.shape, rank)
    a = 0.3 * jnp.sin(0.7 * jnp.arange(np.prod(a_shape), dtype=dtype)).reshape(a_shape)
    return a, jnp.zeros(b_shape, dtype)


def check_model(name, model, tokens, targets, layout, cases, kinds, mesh, results) -> None:
    """Every mesh case of one model against its one-device run."""
    # Numpy-filled params of the model's shapes: Flax's init would compile a large PRNG program.
    shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    rng = np.random.default_rng(0)
    base = jax.tree_util.tree_map_with_path(
        lambda p, s: jnp.asarray(
            (lorajax.path_str(p).endswith("scale")) + rng.normal(0.0, 0.2 if len(s.shape) > 1 else 0.02, s.shape),
            s.dtype,
        ),
        shapes,
    )
    key = jax.random.key(3)
    tx = lorajax.masked(optax.adam(1e-2, eps=EPS))
    init_opt = jax.jit(tx.init)
    paths = {lorajax.path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(base)[0]}
    kernel_shapes = {s for p, s in paths.items() if p.split("/")[-2] in targets and p.endswith("kernel")}

    def lora_init(params):
        lora = lorajax.lorafy(params, rank=4, where=targets, key=key, layout=layout, init=cheap_init)

        # B = 0 at init; give it the same random values on every mesh so the step moves A and merge changes W.
        def fill(x):
            if not lorajax.is_lora(x):
                return x
            b = 0.1 * np.random.default_rng(x.b.size).standard_normal(x.b.shape, np.float32)
            return dataclasses.replace(x, b=jax.device_put(b, x.b.sharding))

        return jax.tree.map(fill, lora, is_leaf=lorajax.is_lora)

    # One-device reference.
    ref_params = lora_init(base)
    ref = {}
    for kind in kinds:
        step = jax.jit(make_step(model, tx, kind == "factored"))
        p, losses = run_steps(step, ref_params, init_opt(ref_params), tokens)
        ref[kind] = (losses, factors(p))
    log(f"{name}: one-device reference done")

    # The default (kaiming, threefry) init: one jitted single-device run to compare the sharded init with.
    # Two targets are enough: a fan-out-sharded and a fan-in-sharded kernel (each RNG program compiles slowly).
    init_targets = targets[::3]
    default_init = jax.jit(lambda p: lorajax.lorafy(p, rank=4, where=init_targets, key=key, layout=layout))
    same_sharding = lambda tree, want: all(
        jax.tree.leaves(jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), tree, want))
    )
    for case, (spec_fn, data_spec) in cases.items():
        specs = jax.tree_util.tree_map_with_path(lambda p, x: spec_fn(case, lorajax.path_str(p), x.shape), base)
        shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
        sharded_base = jax.device_put(base, shardings)
        lora = lora_init(sharded_base)
        want = lorajax.partition_specs(lora, shardings)
        data = jax.device_put(tokens, NamedSharding(mesh, data_spec))
        entry = {"factors_placed": same_sharding(lora, want)}
        if case == "tp":  # default init on the mesh: placed, and the same numbers as on one device
            lorafied_raw = lorajax.lorafy(sharded_base, rank=4, where=init_targets, key=key, layout=layout)
            same_init = jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), lorafied_raw, default_init(base))
            raw_want = lorajax.partition_specs(lorafied_raw, shardings)
            entry["factors_placed"] = entry["factors_placed"] and same_sharding(lorafied_raw, raw_want)
            entry["init_matches_single_device"] = all(jax.tree.leaves(same_init))
        merge_compiled = jax.jit(lorajax.merge).lower(lora).compile()
        merge_hlo = merge_compiled.as_text()
        merged = merge_compiled(lora)
        entry["merge_keeps_sharding"] = same_sharding(merged, shardings)
        entry["merge_collectives"] = full_kernel_collectives(
            merge_hlo, kernel_shapes, ("all-gather", "all-reduce", "all-to-all", "collective-permute")
        )
        if case == "tp":  # the per-target donated merge, on the mesh with the most varied shardings
            # merge(donate=True): per-target programs on a copy; same values, same shardings, no collectives.
            donor = jax.tree.map(lambda x: x.copy(), lora)
            programs = {}  # one compile per distinct (shape, sharding, layout), as merge(donate=True) does
            for x in jax.tree.leaves(donor, is_leaf=lorajax.is_lora):
                sig = (x.shape, x.base.sharding, x.layout) if lorajax.is_lora(x) else None
                if sig is not None and sig not in programs:
                    meta = x.spec
                    programs[sig] = _merge.merge_program(x.base.sharding).lower(x.base, x.a, x.b, meta).compile()
            donated_hlo = [c.as_text() for c in programs.values()]
            merged_donated = lorajax.merge(donor, donate=True)
            entry["donated_merge_ok"] = same_sharding(merged_donated, shardings) and all(
                jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), merged_donated, merged))
            )
            every = ("all-gather", "all-reduce", "all-to-all", "collective-permute")
            entry["donated_merge_collectives"] = [
                op for h in donated_hlo for op in full_kernel_collectives(h, kernel_shapes, every)
            ]
        for kind in kinds:
            step = jax.jit(make_step(model, tx, kind == "factored"), out_shardings=(want, None, None))
            opt_state = init_opt(lora)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", lorajax.FallbackWarning)
                compiled = step.lower(lora, opt_state, data).compile()  # compile once; reuse it for the steps
            p, losses = run_steps(compiled, lora, opt_state, data)
            ref_losses, ref_factors = ref[kind]
            got = factors(p)
            entry[kind] = {
                "gathers": full_kernel_collectives(compiled.as_text(), kernel_shapes),
                # A full-size weight gradient reduced across devices (the merge path forms dW; factored never does).
                "weight_reductions": full_kernel_collectives(
                    compiled.as_text(), kernel_shapes, ("all-reduce", "reduce-scatter")
                ),
                "loss": losses,
                "ref_loss": ref_losses,
                "loss_err": max(abs(a - b) for a, b in zip(losses, ref_losses)),
                "factor_err": max(float(np.max(np.abs(got[k] - ref_factors[k]))) for k in ref_factors),
                "keeps_sharding": same_sharding(p, want),
                "fallbacks": [str(w.message) for w in caught if issubclass(w.category, lorajax.FallbackWarning)],
            }
        if case == "fsdp":
            # FSDP gathers each weight for its forward by design (ZeRO-3); count what a full fine-tune of the
            # base model gathers, so the test can check that LoRA adds no gather of its own.
            full_tx = optax.adam(1e-2)

            def full_step(params, opt_state, tokens):
                loss, grads = jax.value_and_grad(lambda p: lm_loss(model.apply({"params": p}, tokens), tokens))(params)
                updates, opt_state = full_tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, loss

            hlo = jax.jit(full_step).lower(sharded_base, jax.eval_shape(full_tx.init, base), data).compile().as_text()
            entry["full_finetune_gathers"] = full_kernel_collectives(hlo, kernel_shapes)
        results["cases"][case if name == "gpt" else f"{name}_{case}"] = entry
        log(f"{name} {case} done")


# Quantized kernels on the mesh: (name, shape, layout, spec, kind, double_quant) and the code specs lorajax derives.
QUANT_KERNELS = [
    ("fan_out_nf4", (256, 512), "io", P(None, "model"), "nf4", True),  # 32768 weights a device: nested absmax too
    ("fan_in_nf4", (256, 128), "io", P("model", None), "nf4", True),  # fan-in: codes per row, 64 columns a device
    ("fan_in_int8", (256, 128), "io", P("model", None), "int8", False),  # int8 columns follow it
    ("fan_out_fp8", (64, 128), "io", P(None, "model"), "fp8", False),
    ("stacked_nf4", (4, 64, 96), "sio", P("model", None, None), "nf4", True),  # one layer a device
    ("heads_nf4", (32, 4, 16), "ioo", P(None, "model", None), "nf4", False),  # a query kernel, heads on 'model'
    ("two_axes_nf4", (256, 512), "io", P("data", "model"), "nf4", True),  # rows and columns both sharded
]


def collectives(hlo: str) -> list[str]:
    """Every collective op in compiled HLO, whatever its shape."""
    ops = r"\s(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(-start)?\("
    return [line.strip()[:160] for line in hlo.splitlines() if re.search(ops, line)]


def check_quantized_kernels(mesh, results) -> None:
    """quantize a sharded kernel: where its codes land, the same bits as one device, dequantize back in place."""
    out = {}
    for name, shape, layout, spec, kind, dq in QUANT_KERNELS:
        rng = np.random.default_rng(len(out))
        w = jnp.asarray(rng.standard_normal(shape, np.float32))
        quant = lambda x: lorajax.quantize({"k": x}, where=["k"], dtype=kind, double_quant=dq, layout={".*": layout})
        one = quant(w)["k"]  # one device
        sharding = NamedSharding(mesh, spec)
        q = quant(jax.device_put(w, sharding))["k"]
        arrays = {f: getattr(q, f) for f in ("codes", "scales", "nested", "offset") if getattr(q, f) is not None}
        dense = jax.jit(lorajax.dequantize)
        compiled = dense.lower(q).compile()
        back = compiled(q)
        abstract = quant(jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding))["k"]
        out[name] = {
            "specs": {f: str(x.sharding.spec) for f, x in arrays.items()},
            "abstract_specs": {f: str(getattr(abstract, f).sharding.spec) for f in arrays},
            # the same bits; fan-in sharded NF4 codes are kept per row (a reshape of the flat codes)
            "codes_equal": all(
                np.array_equal(np.asarray(x).reshape(-1), np.asarray(getattr(one, f)).reshape(-1))
                for f, x in arrays.items()
            ),
            "dequantize_equal": bool(np.array_equal(np.asarray(back), np.asarray(lorajax.dequantize(one)))),
            "dequantize_sharding": str(back.sharding.spec),
            "dequantize_is_kernel_sharding": back.sharding.is_equivalent_to(sharding, len(shape)),
            "abstract_dequantize_sharding": str(lorajax.dequantize(abstract).sharding.spec),
            "abstract_dequantize_is_kernel_sharding": lorajax.dequantize(abstract).sharding.is_equivalent_to(
                sharding, len(shape)
            ),
            "dequantize_collectives": collectives(compiled.as_text()),
        }
    results["quantized_kernels"] = out
    log("quantized kernels done")


def check_qlora_model(mesh, tokens, results) -> None:
    """A QLoRA model (NF4 base, tensor parallel) on the mesh: placement; forward and gradient as on one device."""
    model = TinyGPT(vocab=64, d_model=32, heads=4, layers=1)
    shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    rng = np.random.default_rng(1)
    base = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), s.dtype), shapes)
    specs = jax.tree_util.tree_map_with_path(lambda p, x: spec_for("tp", lorajax.path_str(p), x.shape), base)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)

    def qlora(params):
        # block_size 32: fc2's fan-in share (32 a device) is whole blocks, so its codes shard with it.
        lora = lorajax.lorafy(
            lorajax.quantize(params, where=TARGETS, block_size=32), rank=4, where=TARGETS, init=cheap_init
        )

        def fill(x):  # a nonzero B (the same on every mesh), so the adapters change the output
            if not lorajax.is_lora(x):
                return x
            b = 0.1 * np.random.default_rng(x.b.size).standard_normal(x.b.shape, np.float32)
            return dataclasses.replace(x, b=jax.device_put(b, x.b.sharding))

        return jax.tree.map(fill, lora, is_leaf=lorajax.is_lora)

    apply = lorajax.factored(model.apply)

    def loss(trainable, frozen, tokens):
        return lm_loss(apply({"params": lorajax.combine(trainable, frozen)}, tokens), tokens)

    grad = jax.jit(jax.value_and_grad(loss))
    forward = jax.jit(lambda p, t: apply({"params": p}, t))
    ref = qlora(base)
    ref_out = np.asarray(forward(ref, tokens))
    ref_loss, ref_grads = grad(*lorajax.partition(ref), tokens)
    lora = qlora(jax.device_put(base, shardings))
    want = lorajax.partition_specs(lora, shardings)
    placed = jax.tree.leaves(jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), lora, want))
    data = jax.device_put(tokens, NamedSharding(mesh, P("data")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", lorajax.FallbackWarning)
        out = np.asarray(forward(lora, data))
        value, grads = grad(*lorajax.partition(lora), data)
    # The planning path: sharded ShapeDtypeStructs quantize and lorafy into what the concrete arrays got.
    sharded_abstract = lorajax.quantize(
        jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), base, shardings),
        where=TARGETS,
        block_size=32,
    )
    planned = lorajax.lorafy(sharded_abstract, rank=4, where=TARGETS, init=cheap_init)
    planned_ok = jax.tree.leaves(
        jax.tree.map(lambda x, y: x.sharding.is_equivalent_to(y.sharding, len(x.shape)), planned, lora)
    )
    grad_err = max(
        float(np.max(np.abs(np.asarray(g) - np.asarray(r))))
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads))
    )
    query = lora["Block_0"]["SelfAttention_0"]["query"]["kernel"].base
    results["qlora_model"] = {
        "placed": all(placed),
        "planned_like_concrete": all(planned_ok),
        "forward_err": float(np.max(np.abs(out - ref_out))),
        "loss_err": abs(float(value) - float(ref_loss)),
        "grad_err": grad_err,
        "fallbacks": [str(w.message) for w in caught if issubclass(w.category, lorajax.FallbackWarning)],
        "query_codes_spec": str(query.codes.sharding.spec),
        # Integer collectives: the step reduces float gradients only (no scalar moved between devices per product).
        "int_collectives": [
            c for c in collectives(grad.lower(*lorajax.partition(lora), data).compile().as_text()) if " s32[" in c
        ],
    }
    log("qlora model done")


def main() -> None:
    t0 = time.time()
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    results: dict = {"cases": {}}
    tokens = jax.random.randint(jax.random.key(7), (8, 16), 0, 64)
    # One block keeps compile time down; every kernel kind (q/k/v "ioo", out "iio", Dense "io") is there.
    gpt = TinyGPT(vocab=64, d_model=32, heads=4, layers=1)
    cases = {case: (spec_for, DATA_SPEC[case]) for case in ("dp", "fsdp", "tp")}
    check_model("gpt", gpt, tokens, TARGETS, None, cases, ("merge", "factored"), mesh, results)
    # Layers stacked by nn.scan: each layer keeps its own factors ("sio"), trained through factored.
    scan_cases = {"tp": (scan_spec, P("data"))}
    check_model(
        "scan",
        ScanLM(),
        tokens,
        TARGETS,
        lambda path, leaf: "s...",  # one leading layer axis; the rest inferred ("sioo", "siio", "sio")
        scan_cases,
        ("factored",),
        mesh,
        results,
    )
    check_quantized_kernels(mesh, results)
    check_qlora_model(mesh, tokens, results)
    results["seconds"] = time.time() - t0
    print(json.dumps(results))


if __name__ == "__main__":
    main()
