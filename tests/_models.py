"""Small models shared by the tests (kept tiny so the suite stays fast)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class Block(nn.Module):
    d_model: int = 32
    heads: int = 4

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        x = x + nn.SelfAttention(num_heads=self.heads, deterministic=True)(h)
        h = nn.LayerNorm()(x)
        h = nn.Dense(4 * self.d_model, name="fc1")(h)
        return x + nn.Dense(self.d_model, name="fc2")(nn.gelu(h))


class TinyGPT(nn.Module):
    """Token embedding, ``layers`` pre-norm blocks, output head."""

    vocab: int = 64
    d_model: int = 32
    heads: int = 4
    layers: int = 2

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.d_model, name="embed")(tokens)
        for _ in range(self.layers):
            x = Block(self.d_model, self.heads)(x)
        return nn.Dense(self.vocab, name="lm_head")(nn.LayerNorm()(x))


def tiny_gpt(key=0, vocab=64, d_model=32, batch=4, seq=16):
    model = TinyGPT(vocab=vocab, d_model=d_model)
    tokens = jax.random.randint(jax.random.key(key + 1), (batch, seq), 0, vocab)
    params = model.init(jax.random.key(key), tokens)["params"]
    return model, params, tokens


def lm_loss(logits, tokens):
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()
