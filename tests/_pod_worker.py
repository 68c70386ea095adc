"""One process of a (possibly multi-process) training job on CPU devices, run by tests/test_pods.py.

The test launches this script as 1 process with 8 devices or as 2 processes with 4 devices each (JAX's own
distributed runtime over gloo on localhost), on one `data x model` mesh whose `data` axis spans the processes. It
trains a small LoRA model (sharded base, masked AdamW through `merge`, dropout-like noise drawn from the run's
key), checkpoints with `lorajax.Checkpoints`, and can SIGKILL itself right after a save completes, so that a
second launch resumes. Process 0 writes what the test compares as JSON (`--out`). Run by hand to debug:

    python tests/_pod_worker.py --procs 1 --dir /tmp/ck --steps 6 --out /tmp/out.json
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

if __name__ == "__main__":  # only as a script: pytest's doctest collection imports this file too
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--pid", type=int, default=0)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--kill-after", type=int, default=None, help="SIGKILL this process once step K is saved")
    ap.add_argument("--out", default=None)
    ap.add_argument("--io", action="store_true", help="also save and load adapter files from every process")
    ARGS = ap.parse_args()
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={8 // ARGS.procs}"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lorajax

D, H, V, BATCH = 16, 32, 12, 8


def start(procs: int, pid: int, port: int) -> None:
    if procs > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=procs, process_id=pid)


def placed(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    # Every process holds the same host value; each fills the shards its own devices hold.
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def build(mesh: jax.sharding.Mesh) -> dict:
    rng = np.random.default_rng(0)
    base = {
        "fc1": {"kernel": rng.normal(size=(D, H)).astype(np.float32), "bias": np.zeros(H, np.float32)},
        "fc2": {"kernel": rng.normal(size=(H, D)).astype(np.float32) / 4, "bias": np.zeros(D, np.float32)},
        "head": {"kernel": rng.normal(size=(D, 4)).astype(np.float32)},
        "embed": {"embedding": rng.normal(size=(V, D)).astype(np.float32) / 4},
    }
    specs = {
        "fc1": {"kernel": P(None, "model"), "bias": P("model")},
        "fc2": {"kernel": P("model", None), "bias": P()},
        "head": {"kernel": P()},
        "embed": {"embedding": P(None, "model")},
    }
    base = jax.tree.map(lambda x, s: placed(x, NamedSharding(mesh, s)), base, specs)
    # Every kind of trained leaf an adapter file carries: factors, LoRA biases (fc1's sharded across the model axis),
    # an also= leaf, and trainable token rows of a sharded table.
    return lorajax.lorafy(
        base,
        rank=4,
        where=["fc1", "fc2"],
        also=["head"],
        lora_bias=True,
        trainable_tokens={"embed": [1, 3]},
        key=jax.random.key(1),
    )


def apply(p: dict, x: jax.Array) -> jax.Array:
    x = x + p["embed"]["embedding"][jnp.arange(x.shape[0]) % V]
    h = jax.nn.gelu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    h = h @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    return h @ p["head"]["kernel"]


def batch(step: int, mesh: jax.sharding.Mesh) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(100 + step)
    x = rng.normal(size=(BATCH, D)).astype(np.float32)
    y = rng.integers(0, 4, size=BATCH).astype(np.int32)
    return placed(x, NamedSharding(mesh, P("data", None))), placed(y, NamedSharding(mesh, P("data")))


def digest(params: dict) -> dict[str, str]:
    from jax.experimental import multihost_utils

    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(lorajax.partition(params)[0]):
        host = np.asarray(multihost_utils.process_allgather(x, tiled=True))
        out[lorajax.path_str(path)] = hashlib.sha256(host.tobytes()).hexdigest()
    return out


def file_io(folder: str, mesh: jax.sharding.Mesh, initial: dict, params: dict) -> dict:
    """save_adapter/save_peft called by every process, 3 times to one path; read and loaded back in every process."""
    from jax.experimental import multihost_utils

    def whole(x):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    lorajax.save_adapter(f"{folder}/initial.safetensors", initial)
    for _ in range(3):
        lorajax.save_adapter(f"{folder}/adapter.safetensors", params)
        lorajax.save_peft(f"{folder}/peft", params)
    trained = {
        lorajax.path_str(p): whole(x) for p, x in jax.tree_util.tree_leaves_with_path(lorajax.partition(params)[0])
    }
    read = lorajax.read_adapter(f"{folder}/adapter.safetensors")
    file_equal = (
        all(
            np.array_equal(read[t].a, trained[f"{t}/a"])
            and np.array_equal(read[t].b, trained[f"{t}/b"])
            and np.array_equal(read[t].bias, trained[f"{t}/bias"])
            for t in read.factors
        )
        and np.array_equal(read.trainables["head/kernel"], trained["head/kernel"])
        and np.array_equal(read.trainables["embed/embedding"].values, trained["embed/embedding/values"])
    )
    base = lorajax.unlorafy(initial)  # the sharded base, as a fresh process would load it
    out = {"file_equal": bool(file_equal)}
    for name, loaded in [
        ("adapter", lorajax.load_adapter(f"{folder}/adapter.safetensors", base)),
        ("peft", lorajax.load_peft(f"{folder}/peft", base)),
    ]:
        node = loaded["fc1"]["kernel"]
        out[f"{name}_b_spec"] = str(node.b.sharding.spec)
        out[f"{name}_bias_spec"] = str(node.bias.sharding.spec)
        tokens = loaded["embed"]["embedding"].values
        out[f"{name}_tokens_spec"] = str(tokens.sharding.spec)
        out[f"{name}_equal"] = bool(
            np.allclose(whole(node.b), trained["fc1/kernel/b"], rtol=1e-6, atol=0)
            and np.array_equal(whole(node.bias), trained["fc1/kernel/bias"])
            and np.array_equal(whole(tokens), trained["embed/embedding/values"])
        )
    # The content, canonically: safetensors orders its header's metadata map differently in each process.
    from safetensors import safe_open

    with safe_open(f"{folder}/initial.safetensors", "np") as fh:
        content = hashlib.sha256(json.dumps(fh.metadata(), sort_keys=True).encode())
        for k in sorted(fh.keys()):
            content.update(k.encode() + fh.get_tensor(k).tobytes())
    out["initial_content"] = content.hexdigest()
    out["litter"] = sorted(n for n in os.listdir(folder) if n.startswith("."))
    return out


def main() -> None:
    start(ARGS.procs, ARGS.pid, ARGS.port)
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    params = initial = build(mesh)
    tx = optax.masked(optax.adamw(1e-2, weight_decay=0.1), lorajax.mask)
    opt_state, key = tx.init(params), jax.random.key(42)

    @jax.jit
    def step(params, opt_state, key, x, y):
        key, noise_key = jax.random.split(key)

        def loss(p):
            noisy = x + 0.1 * jax.random.normal(noise_key, x.shape)  # the RNG must resume too
            logits = apply(lorajax.merge(p), noisy)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key, value

    ckpts = lorajax.Checkpoints(ARGS.dir, max_to_keep=2)
    first = 0
    if ckpts.latest_step is not None:
        first, params, opt_state, key = ckpts.restore(params, opt_state, key)
    losses = []
    for i in range(first, ARGS.steps):
        params, opt_state, key, value = step(params, opt_state, key, *batch(i, mesh))
        losses.append(float(value))
        ckpts.save(i + 1, params, opt_state, key)
        if ARGS.kill_after == i + 1:
            ckpts.wait()
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    steps = ckpts.all_steps()
    ckpts.close()
    # Every process takes part in the gathers; process 0 writes.
    result = {
        "first": first,
        "losses": losses,
        "digest": digest(params),
        "steps": steps,
        "b_spec": str(params["fc1"]["kernel"].b.sharding.spec),
    }
    if ARGS.io:
        result["io"] = file_io(ARGS.dir + "-io", mesh, initial, params)
    if ARGS.out and jax.process_index() == 0:
        with open(ARGS.out, "w") as fh:
            json.dump(result, fh)


if __name__ == "__main__":
    main()
