"""Mesh checks on 8 virtual CPU devices, run ONCE in a subprocess by tests/test_sharding.py.

Forcing 8 host devices must happen before JAX starts, so it cannot run inside the main pytest
process. This script runs every mesh case in one process (one XLA start-up) and prints one JSON
document on its last stdout line; the test module asserts on it. Run it by hand to debug:

    python tests/_mesh_worker.py
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # only as a script: pytest's doctest collection imports this file too
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"

import json
import re
import sys
import time

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _models import TinyGPT, lm_loss

import lorajax

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


def main() -> None:
    t0 = time.time()
    assert jax.device_count() == 8, jax.devices()
    # One block keeps compile time down; every kernel kind (q/k/v "ioo", out "iio", Dense "io") is there.
    model = TinyGPT(vocab=64, d_model=32, heads=4, layers=1)
    tokens = jax.random.randint(jax.random.key(7), (8, 16), 0, 64)
    base = jax.jit(model.init)(jax.random.key(0), tokens)["params"]  # one compile, not one per eager op
    key = jax.random.key(3)
    tx = lorajax.masked(optax.adam(1e-2, eps=EPS))
    paths = {lorajax.path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(base)[0]}
    kernel_shapes = {s for p, s in paths.items() if p.split("/")[-2] in TARGETS and p.endswith("kernel")}

    def lora_init(params):
        lora = lorajax.lorafy(params, rank=4, where=TARGETS, key=key)

        # B = 0 at init; give it the same random values on every mesh so the step moves A and merge changes W.
        def fill(x):
            if not lorajax.is_lora(x):
                return x
            b = 0.1 * np.random.default_rng(x.b.size).standard_normal(x.b.shape, np.float32)
            return lorajax.LoRA(**{**x.__dict__, "b": jax.device_put(b, x.b.sharding)})

        return jax.tree.map(fill, lora, is_leaf=lorajax.is_lora)

    # One-device reference.
    ref_params = lora_init(base)
    init_opt = jax.jit(tx.init)
    ref = {}
    for kind in ("merge", "factored"):
        step = jax.jit(make_step(model, tx, kind == "factored"))
        p, losses = run_steps(step, ref_params, init_opt(ref_params), tokens)
        ref[kind] = (losses, factors(p))
        log(f"reference {kind} done")

    single_device_init = lorajax.lorafy(base, rank=4, where=TARGETS, key=key)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    results: dict = {"cases": {}}
    for case in ("dp", "fsdp", "tp"):
        specs = jax.tree_util.tree_map_with_path(lambda p, x: spec_for(case, lorajax.path_str(p), x.shape), base)
        shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
        sharded_base = jax.device_put(base, shardings)
        lora = lora_init(sharded_base)
        want = lorajax.partition_specs(lora, shardings)
        placed = jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), lora, want)
        lorafied_raw = lorajax.lorafy(sharded_base, rank=4, where=TARGETS, key=key)
        raw_ok = jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), lorafied_raw, want)
        same_init = jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), lorafied_raw, single_device_init)
        data = jax.device_put(tokens, NamedSharding(mesh, DATA_SPEC[case]))
        entry = {
            "factors_placed": all(jax.tree.leaves(placed)) and all(jax.tree.leaves(raw_ok)),
            "init_matches_single_device": all(jax.tree.leaves(same_init)),
        }
        merge_compiled = jax.jit(lorajax.merge).lower(lora).compile()
        merge_hlo = merge_compiled.as_text()
        merged = merge_compiled(lora)
        entry["merge_keeps_sharding"] = all(
            jax.tree.leaves(jax.tree.map(lambda m, s: m.sharding.is_equivalent_to(s, m.ndim), merged, shardings))
        )
        entry["merge_gathers"] = full_kernel_collectives(merge_hlo, kernel_shapes)
        entry["merge_collectives"] = full_kernel_collectives(
            merge_hlo, kernel_shapes, ("all-gather", "all-reduce", "all-to-all", "collective-permute")
        )
        for kind in ("merge", "factored"):
            step = jax.jit(make_step(model, tx, kind == "factored"), out_shardings=(want, None, None))
            opt_state = init_opt(lora)
            compiled = step.lower(lora, opt_state, data).compile()  # compile once; reuse it for the steps
            hlo = compiled.as_text()
            p, losses = run_steps(compiled, lora, opt_state, data)
            ref_losses, ref_factors = ref[kind]
            got = factors(p)
            entry[kind] = {
                "gathers": full_kernel_collectives(hlo, kernel_shapes),
                "loss": losses,
                "ref_loss": ref_losses,
                "loss_err": max(abs(a - b) for a, b in zip(losses, ref_losses)),
                "factor_err": max(float(np.max(np.abs(got[k] - ref_factors[k]))) for k in ref_factors),
                "keeps_sharding": all(
                    jax.tree.leaves(jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), p, want))
                ),
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
        results["cases"][case] = entry
        log(f"{case} done")

    # Flax boxes with a real mesh: lorafy of nn.Partitioned arrays keeps the names and the placement.
    results["seconds"] = time.time() - t0
    print(json.dumps(results))


if __name__ == "__main__":
    main()
