"""LoRA fine-tuning of a Flax NNX model with lorajax: split, lorafy the State, train, merge back into a module.

    python examples/nnx_finetune.py [--steps 300]

An NNX module splits into a static ``graphdef`` and a ``State`` pytree of ``nnx.Param`` variables. lorajax works on
that State like on any pytree: ``lorafy`` puts a ``LoRA`` node (holding ``nnx.Param`` base and factors) at every
targeted kernel, ``partition`` splits trainable factors from the frozen rest, and ``merge`` turns it back into a
plain State that ``nnx.merge(graphdef, state)`` rebuilds into an ordinary module.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lorajax


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(8, 128, rngs=rngs)
        self.fc2 = nnx.Linear(128, 128, rngs=rngs)
        self.head = nnx.Linear(128, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(nnx.gelu(self.fc2(nnx.gelu(self.fc1(x)))))


def task(key: jax.Array, shift: float, n: int = 512) -> tuple[jax.Array, jax.Array]:
    """A smooth regression target; ``shift`` makes a related but different task."""
    x = jax.random.normal(key, (n, 8))
    return x, jnp.sin(x[:, :1] * 2 + shift) + 0.5 * jnp.cos(x[:, 1:2] - shift) * x[:, 2:3]


def fit(graphdef, trainable, frozen, data, steps, lr):
    """Adam on ``trainable``; the model is rebuilt from ``combine(trainable, frozen)`` inside the loss."""
    x, y = data
    tx = optax.adam(lr)
    opt_state = tx.init(trainable)

    def loss_fn(t):
        state = t if frozen is None else lorajax.merge(lorajax.combine(t, frozen))  # plain State: base + scale·a·b
        return jnp.mean((nnx.merge(graphdef, state)(x) - y) ** 2)

    @jax.jit
    def step(t, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(t)
        updates, opt_state = tx.update(grads, opt_state, t)
        return optax.apply_updates(t, updates), opt_state, loss

    for _ in range(steps):
        trainable, opt_state, loss = step(trainable, opt_state)
    return trainable, float(loss)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args(argv)

    graphdef, state = nnx.split(MLP(nnx.Rngs(0)))
    mse = lambda state, data: float(jnp.mean((nnx.merge(graphdef, state)(data[0]) - data[1]) ** 2))

    # 1. "Pretrain" the base on task A (full training: everything trainable, nothing frozen).
    task_a, task_b = task(jax.random.key(1), shift=0.0), task(jax.random.key(2), shift=1.0)
    base, _ = fit(graphdef, state, None, task_a, args.steps, 3e-3)

    # 2. LoRA on fc1 and fc2 (the head stays frozen) for task B.
    lora = lorajax.lorafy(base, rank=4, where=lorajax.all_linear, key=jax.random.key(3))
    print(lorajax.summary(lora))
    trainable, frozen = lorajax.partition(lora)
    trainable, _ = fit(graphdef, trainable, frozen, task_b, args.steps, 1e-2)

    # 3. Merge: an ordinary NNX module again, with no LoRA left in it.
    model = nnx.merge(graphdef, lorajax.merge(lorajax.combine(trainable, frozen)))
    assert isinstance(model.fc1.kernel, nnx.Param) and model.fc1.kernel.shape == (8, 128)
    adapted = nnx.state(model, nnx.Param)
    print(f"task B loss: base {mse(base, task_b):.4f} -> LoRA-adapted and merged {mse(adapted, task_b):.4f}")
    print(f"task A loss (what the base was trained for): {mse(base, task_a):.4f} -> {mse(adapted, task_a):.4f}")


if __name__ == "__main__":
    main()
