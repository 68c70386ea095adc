"""Serve many LoRA adapters on one base: adapter files, a mixed-adapter batch, hot swaps and merging tasks.

Run:  python examples/multi_adapter.py      (a few seconds on CPU)

1. Three tenants each "fine-tune" an adapter (random factors here) and ship it as one small
   safetensors file (`lorajax.save_adapter`).
2. The server keeps ONE base model, reads the files (`lorajax.read_adapter`), stacks them into a
   bank (`lorajax.stack_adapters`) and answers a batch that mixes tenants, plus a request for the
   plain base model, in one call (`lorajax.select` + `lorajax.factored`).
3. A single-tenant deployment with merged weights switches adapters in place (`lorajax.swap`).
4. Two tasks are folded into one adapter (`lorajax.combine_adapters`).
5. Hot-swappable slots (`lorajax.adapter_slots`): tenants come and go, the jitted server compiles once.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import lorajax


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(64, name="fc1")(x))
        x = nn.gelu(nn.Dense(64, name="fc2")(x))
        return nn.Dense(8, name="head")(x)


def fake_finetune(base, seed, rank):
    """Stand-in for a training run: lorafy and give the factors random values."""
    lora = lorajax.lorafy(base, rank=rank, where=["fc1", "fc2"], key=jax.random.key(seed), alpha=2.0 * rank)
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: (
            dataclasses.replace(x, b=jnp.asarray(0.1 * rng.normal(size=x.b.shape), jnp.float32))
            if lorajax.is_lora(x)
            else x
        ),
        lora,
        is_leaf=lorajax.is_lora,
    )


def main() -> None:
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (6, 16))
    base = model.init(jax.random.key(1), x)["params"]

    # 1. Tenants ship adapter files (a few KB each; the base is never copied).
    folder = tempfile.mkdtemp()
    for seed, (tenant, rank) in enumerate({"alice": 4, "bob": 8, "carol": 2}.items()):
        path = os.path.join(folder, f"{tenant}.safetensors")
        lorajax.save_adapter(path, fake_finetune(base, seed, rank), metadata={"tenant": tenant})
        print(f"{tenant:>5}: {os.path.getsize(path):6d} bytes, rank {rank}")

    # 2. One server, one base, a batch mixing tenants (None = the plain base model).
    adapters = {t: lorajax.read_adapter(os.path.join(folder, f"{t}.safetensors")) for t in ("alice", "bob", "carol")}
    bank = lorajax.stack_adapters(adapters, base=base)
    serve = jax.jit(lambda bank, ids, x: lorajax.factored(model.apply)({"params": lorajax.select(bank, ids)}, x))
    requests = ["bob", "alice", None, "carol", "bob", "alice"]
    y = serve(bank, bank.ids(requests), x)
    for n, tenant in enumerate(requests):
        own = base if tenant is None else lorajax.merge(lorajax.attach(base, adapters[tenant]))
        alone = model.apply({"params": own}, x[n : n + 1])
        print(f"request {n} ({tenant or 'base'}): max |mixed - alone| = {float(jnp.abs(y[n] - alone[0]).max()):.1e}")

    # 3. A merged deployment (no W0 kept) switches from alice to bob in place.
    deployed = lorajax.merge(lorajax.attach(base, adapters["alice"]))
    deployed = lorajax.swap(deployed, adapters["alice"], adapters["bob"])
    want = lorajax.merge(lorajax.attach(base, adapters["bob"]))
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(deployed), jax.tree.leaves(want)))
    print(f"swap alice -> bob on merged weights: max |W - W_bob| = {diff:.1e}")

    # 4. One adapter for both alice's and carol's tasks: exact (cat) or compressed (svd).
    cat = lorajax.combine_adapters([adapters["alice"], adapters["carol"]], [0.5, 0.5], method="cat")
    svd = lorajax.combine_adapters([adapters["alice"], adapters["carol"]], [0.5, 0.5], method="svd", rank=4)
    err = svd.metadata["combine"]["max_relative_error"]
    print(f"combined: cat rank {cat['fc1/kernel'].rank} (exact), svd rank 4 (relative error {err:.3f})")

    # 5. Hot-swappable slots: tenants come and go, the jitted server compiles once (ids pick the slot per row).
    slots = lorajax.adapter_slots({"alice": adapters["alice"]}, 2, rank=8, base=base)
    traces = []
    run = lorajax.factored(model.apply)

    @jax.jit
    def serve_slots(bank, ids, x):
        traces.append(1)  # runs only while tracing
        return run({"params": lorajax.select(bank, ids, form="onehot")}, x)

    for change in [("put", "bob"), ("evict", "alice"), ("put", "carol")]:
        slots = slots.put(change[1], adapters[change[1]]) if change[0] == "put" else slots.evict(change[1])
        names = list(slots.names)  # one row per slot, a free slot (None) runs the base: the shapes never change
        y = serve_slots(slots.bank, slots.ids(names), x[:2])
        err = 0.0
        for k, n in enumerate(names):
            own = base if n is None else lorajax.merge(lorajax.attach(base, adapters[n]))
            err = max(err, float(jnp.abs(y[k] - model.apply({"params": own}, x[k])).max()))
        print(f"slots after {change[0]} {change[1]}: {names}, max |slots - alone| = {err:.1e}")
    print(f"slot changes: the server was traced {len(traces)} time(s)")


if __name__ == "__main__":
    main()
