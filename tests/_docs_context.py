"""What the docs' code blocks may assume: a reader's small model, its parameters and inputs.

The guides write ``model.apply``, ``params``, ``x``, ``tokens``, ``key``, ``loss_fn``, ``train`` and a few trained
adapters (``p_alice``...) for the reader's own; tests/test_docs.py runs each page's Python blocks, in order, in a
namespace that starts from ``namespace()``: a tiny Flax language model with the usual module names (``embed``,
``query``/``key``/``value``/``out`` in attention, ``fc1``/``fc2`` in the MLP, ``lm_head``), so every preset finds its
targets. Anything else a page uses is set up on the page itself, in a ``<!-- docs-test: setup ... -->`` comment
(hidden from readers) before the block.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lorajax

VOCAB, D, BATCH, SEQ = 32, 16, 3, 8


class TinyLM(nn.Module):
    """An embedding, one attention block with q/k/v/out projections, an MLP and an output head."""

    vocab: int = VOCAB
    d: int = D

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = nn.Embed(self.vocab, self.d, name="embed")(tokens)
        q, k, v = (nn.Dense(self.d, name=n)(h) for n in ("query", "key", "value"))
        weights = jax.nn.softmax(jnp.einsum("bqd,bkd->bqk", q, k) / self.d**0.5, axis=-1)
        h = h + nn.Dense(self.d, name="out")(jnp.einsum("bqk,bkd->bqd", weights, v))
        h = h + nn.Dense(self.d, name="fc2")(jax.nn.gelu(nn.Dense(2 * self.d, name="fc1")(h)))
        return nn.Dense(self.vocab, name="lm_head")(h)


def namespace() -> dict[str, Any]:
    """A fresh namespace for one page's blocks."""
    model = TinyLM()
    key = jax.random.key(0)
    tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, VOCAB)
    params = model.init(key, tokens)["params"]

    def loss_fn(logits: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

    def apply(params: Any, tokens: jax.Array) -> jax.Array:  # the model as a function of its parameters
        return model.apply({"params": params}, tokens)

    def loss(params: Any) -> jax.Array:
        return loss_fn(apply(params, tokens))

    def train(params: Any, steps: int = 2, lr: float = 0.1) -> Any:
        """The reader's training loop: a few SGD steps on what trains."""
        for _ in range(steps):
            trainable, frozen = lorajax.partition(params)
            grads = jax.grad(lambda t: loss(lorajax.merge(lorajax.combine(t, frozen))))(trainable)
            params = lorajax.combine(jax.tree.map(lambda t, g: t - lr * g, trainable, grads), frozen)
        return params

    def adapter(seed: int, rank: int, dora: bool = False) -> Any:
        """A trained adapter: every linear layer, random factors (as if trained), so adapters differ."""
        lora = lorajax.lorafy(params, rank=rank, where=lorajax.all_linear, key=jax.random.key(seed), dora=dora)
        return jax.tree.map(
            lambda n: (
                dataclasses.replace(n, b=0.1 * jax.random.normal(jax.random.key(seed + 1), n.b.shape))
                if lorajax.is_lora(n)
                else n
            ),
            lora,
            is_leaf=lorajax.is_lora,
        )

    return {
        "__name__": "__docs__",
        "jax": jax,
        "jnp": jnp,
        "optax": optax,
        "lorajax": lorajax,
        "model": model,
        "key": key,
        "tokens": tokens,
        "x": tokens,
        "params": params,
        "base_params": params,
        "loss_fn": loss_fn,
        "apply": apply,
        "loss": loss,
        "train": train,
        "batches": [{"tokens": tokens}] * 4,
        "p_alice": adapter(10, 4),
        "p_bob": adapter(20, 8),
        "p_carol": adapter(30, 4),
        "p_plain": adapter(40, 4),
        "p_dora": adapter(50, 4, dora=True),
    }
