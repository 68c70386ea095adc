"""LoRA fine-tuning of an Equinox model with lorajax: the module *is* the pytree.

    python examples/equinox_finetune.py [--steps 300]

``lorafy`` replaces the chosen ``weight`` leaves of the module by ``LoRA`` nodes (Equinox/PyTorch weights are
``(out, in)``: layout ``"oi"``, inferred from the name). ``lorajax.partition``/``combine`` play the role of
``eqx.partition``/``eqx.combine``: differentiate with respect to the trainable half only. ``merge`` returns an
ordinary Equinox module with plain weights.
"""

from __future__ import annotations

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import lorajax


class MLP(eqx.Module):
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, key: jax.Array):
        k1, k2, k3 = jax.random.split(key, 3)
        self.fc1, self.fc2 = eqx.nn.Linear(8, 128, key=k1), eqx.nn.Linear(128, 128, key=k2)
        self.head = eqx.nn.Linear(128, 1, key=k3)

    def __call__(self, x: jax.Array) -> jax.Array:  # one example; vmap for batches
        return self.head(jax.nn.gelu(self.fc2(jax.nn.gelu(self.fc1(x)))))


def task(key: jax.Array, shift: float, n: int = 512) -> tuple[jax.Array, jax.Array]:
    """A smooth regression target; ``shift`` makes a related but different task."""
    x = jax.random.normal(key, (n, 8))
    return x, jnp.sin(x[:, :1] * 2 + shift) + 0.5 * jnp.cos(x[:, 1:2] - shift) * x[:, 2:3]


def mse(model: MLP, data: tuple[jax.Array, jax.Array]) -> jax.Array:
    x, y = data
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def fit(trainable, frozen, data, steps, lr):
    """Adam on ``trainable``; the module is rebuilt (and LoRA merged) inside the loss."""
    tx = optax.adam(lr)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(t, opt_state):
        loss, grads = jax.value_and_grad(lambda t: mse(lorajax.merge(lorajax.combine(t, frozen)), data))(t)
        updates, opt_state = tx.update(grads, opt_state, t)
        return optax.apply_updates(t, updates), opt_state, loss

    for _ in range(steps):
        trainable, opt_state, _ = step(trainable, opt_state)
    return trainable


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args(argv)

    task_a, task_b = task(jax.random.key(1), shift=0.0), task(jax.random.key(2), shift=1.0)
    # 1. "Pretrain" the base on task A: every array trains (a combine with an empty frozen tree).
    model = MLP(jax.random.key(0))
    empty = jax.tree.map(lambda _: None, model)
    base = fit(model, empty, task_a, args.steps, 3e-3)

    # 2. LoRA on the hidden layers' weights, chosen by a regex over the '/'-joined path.
    lora = lorajax.lorafy(base, rank=4, where=r"fc\d/weight", key=jax.random.key(3))
    print(lorajax.summary(lora))
    trainable, frozen = lorajax.partition(lora)
    trainable = fit(trainable, frozen, task_b, args.steps, 1e-2)

    # 3. Merge: a plain Equinox module again (same structure as the base).
    adapted = lorajax.merge(lorajax.combine(trainable, frozen))
    assert jax.tree.structure(adapted) == jax.tree.structure(base)
    print(f"task B loss: base {mse(base, task_b):.4f} -> LoRA-adapted and merged {mse(adapted, task_b):.4f}")
    print(f"task A loss (what the base was trained for): {mse(base, task_a):.4f} -> {mse(adapted, task_a):.4f}")


if __name__ == "__main__":
    main()
