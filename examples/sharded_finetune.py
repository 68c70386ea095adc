"""Sharded LoRA fine-tune on an 8-device mesh: the same code runs on 1 CPU, 8 GPUs or a TPU pod.

On a machine without accelerators this script asks XLA for 8 virtual CPU devices (before JAX starts),
lays them out as a ``data x model`` mesh and fine-tunes the tiny byte-level GPT from ``textlm.py``
(pretrained mostly on stdlib prose, ``assets/base_prose.safetensors``) on lorajax's own source code:

1. the base weights are placed with ``NamedSharding``s: tensor parallel (``--mesh tp``: attention
   heads and the MLP hidden axis on ``model``), FSDP (``--mesh fsdp``: every matrix sharded on its
   fan-in axis) or plain data parallel (``--mesh dp``);
2. ``lorajax.lorafy`` on those sharded arrays creates each factor already sharded like its base
   (A like the fan-in axes, B like the fan-out axes, rank replicated): nothing passes through the
   host and no weight is gathered;
3. ``lorajax.partition_specs`` gives the lorafied tree's shardings for ``jax.jit(out_shardings=...)``;
4. each step runs ``lorajax.factored(model.apply)`` (``x @ W0 + s * (x @ A) @ B``, no ``W`` formed)
   with the batch sharded on ``data``; XLA's SPMD partitioner inserts the collectives;
5. at the end ``lorajax.merge(params, donate=True)`` folds the factors into the sharded base buffers,
   target by target.

Run:  python examples/sharded_finetune.py [--mesh tp|fsdp|dp] [--steps 30]
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Only affects the CPU backend; real GPUs/TPUs are used as they are. Must precede `import jax`.
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse
import re
import time
from pathlib import Path

import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from textlm import TinyGPT, load_params, loss_fn, train_batches, val_windows

import lorajax

ROOT = Path(__file__).resolve().parent.parent


def base_spec(mesh_kind: str, path: str, ndim: int) -> P:
    """PartitionSpec of each base parameter (mesh axes: 'data', 'model')."""
    if mesh_kind == "dp":
        return P()
    if mesh_kind == "fsdp":
        return P("model") if ndim >= 2 and not path.endswith("pos") else P()
    # Tensor parallel (Megatron): heads of q/k/v and of the output projection, the MLP hidden axis.
    rules = [
        (r".*/attn/(query|key|value)/kernel", P(None, "model", None)),  # (d, heads, head_dim)
        (r".*/attn/(query|key|value)/bias", P("model", None)),
        (r".*/attn/out/kernel", P("model", None, None)),  # (heads, head_dim, d)
        (r".*/fc1/kernel", P(None, "model")),
        (r".*/fc1/bias", P("model")),
        (r".*/fc2/kernel", P("model", None)),
    ]
    return next((spec for pattern, spec in rules if re.fullmatch(pattern, path)), P())


def code_corpus() -> tuple[np.ndarray, np.ndarray]:
    text = b"\n\n".join(p.read_bytes() for p in sorted((ROOT / "lorajax").glob("*.py")))
    data = np.frombuffer(text, np.uint8)
    cut = int(0.9 * len(data))
    return data[:cut], data[cut:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mesh", choices=["tp", "fsdp", "dp"], default="tp")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    t0 = time.perf_counter()

    # jax.devices() lists every device of every process: on a pod, after jax.distributed.initialize(),
    # this is the global mesh and the rest of the script is unchanged.
    n = jax.device_count()
    model_axis = 4 if n % 4 == 0 else 1
    # Auto axes: XLA's partitioner propagates shardings through the model (JAX's default mesh is Explicit,
    # which types every intermediate; lorafy/merge/factored work there too under `with jax.set_mesh(mesh)`).
    mesh = jax.make_mesh((n // model_axis, model_axis), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    print(f"{n} devices ({jax.default_backend()}), mesh {dict(mesh.shape)}, sharding: {args.mesh}")

    variables, config = load_params(ROOT / "assets" / "base_prose.safetensors")
    model = TinyGPT(config)
    specs = jax.tree_util.tree_map_with_path(lambda p, x: base_spec(args.mesh, lorajax.path_str(p), x.ndim), variables)
    base = jax.device_put(variables, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))

    params = lorajax.lorafy(base, rank=args.rank, where=lorajax.all_linear, key=jax.random.key(0))
    shardings = lorajax.partition_specs(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    node = params["params"]["block0"]["attn"]["query"]["kernel"]
    print(
        f"query kernel {node.shape}: base {node.base.sharding.spec}, A {node.a.sharding.spec}, B {node.b.sharding.spec}"
    )
    print(lorajax.summary(params, optimizer=optax.adamw(1e-3), devices=n).memory)

    tx = lorajax.masked(optax.adamw(3e-3))
    opt_state = jax.jit(tx.init)(params)
    apply = lorajax.factored(model.apply)

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(model, p, tokens, apply))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step, out_shardings=(shardings, None, None), donate_argnums=(0, 1))
    evaluate = jax.jit(lambda p, tokens: loss_fn(model, p, tokens, apply))
    train, val = code_corpus()
    batch_sharding = NamedSharding(mesh, P("data"))
    val_tokens = jax.device_put(val_windows(val, config.seq_len, 32), batch_sharding)
    print(f"validation loss before: {float(evaluate(params, val_tokens)):.3f} nats/byte")
    batches = train_batches(train, args.batch, config.seq_len, seed=0)
    for k in range(1, args.steps + 1):
        # Multi-host: each process passes its own rows with jax.make_array_from_process_local_data.
        tokens = jax.device_put(next(batches), batch_sharding)
        params, opt_state, loss = step(params, opt_state, tokens)
        if k == 1 or k % 10 == 0 or k == args.steps:
            print(f"step {k:3d}  loss {float(loss):.3f}")
    after = float(evaluate(params, val_tokens))
    print(f"validation loss after:  {after:.3f} nats/byte")

    merged = lorajax.merge(params, donate=True)  # params' LoRA buffers are consumed here
    kernel = merged["params"]["block0"]["attn"]["query"]["kernel"]
    merged_loss = float(jax.jit(lambda p, t: loss_fn(model, p, t))(merged, val_tokens))
    print(f"merged query kernel sharding {kernel.sharding.spec}; merged model validation loss {merged_loss:.3f}")
    assert abs(merged_loss - after) < 1e-3, (merged_loss, after)
    print(f"done in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
