"""The JAX peers of the training-step benchmark: flax ``nnx.LoRALinear`` and qwix's LoRA provider, same GPT."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from _gpt import lm_loss

import lorajax

RANK = 8


def make_nnx(cfg, tokens, where):
    """Peer: the same GPT in flax.nnx with nnx.LoRALinear at the targets (base frozen by filtering LoRAParam)."""
    from flax import nnx

    d, h = cfg["d"], cfg["heads"]
    lin_targets = {"query", "value"} if where == "attn_qv" else {"query", "key", "value", "out", "fc1", "fc2"}

    def linear(name, i, o, rngs):
        if name in lin_targets:
            return nnx.LoRALinear(i, o, lora_rank=RANK, rngs=rngs)
        return nnx.Linear(i, o, rngs=rngs)

    class NBlock(nnx.Module):
        def __init__(self, rngs):
            self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
            self.query, self.key, self.value = (linear(n, d, d, rngs) for n in ("query", "key", "value"))
            self.out = linear("out", d, d, rngs)
            self.fc1, self.fc2 = linear("fc1", d, 4 * d, rngs), linear("fc2", 4 * d, d, rngs)

        def __call__(self, x, mask):
            b, s, _ = x.shape
            y = self.ln1(x)
            q, k, v = (f(y).reshape(b, s, h, d // h) for f in (self.query, self.key, self.value))
            att = nnx.dot_product_attention(q, k, v, mask=mask)
            x = x + self.out(att.reshape(b, s, d))
            return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))

    class NGPT(nnx.Module):
        def __init__(self, rngs):
            self.wte = nnx.Embed(cfg["vocab"], d, rngs=rngs)
            self.wpe = nnx.Embed(cfg["seq"], d, rngs=rngs)
            self.blocks = nnx.List([NBlock(rngs) for _ in range(cfg["layers"])])
            self.ln_f = nnx.LayerNorm(d, rngs=rngs)
            self.lm_head = nnx.Linear(d, cfg["vocab"], use_bias=False, rngs=rngs)

        def __call__(self, tokens):
            x = self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[1]))[None]
            mask = nnx.make_causal_mask(tokens)
            for blk in self.blocks:
                x = blk(x, mask)
            return self.lm_head(self.ln_f(x))

    model = NGPT(nnx.Rngs(0))
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    tx = optax.adam(1e-4)

    def step(lora, opt, rest, tokens):
        def loss_fn(lora):
            return lm_loss(nnx.merge(graphdef, lora, rest)(tokens), tokens)

        loss, g = jax.value_and_grad(loss_fn)(lora)
        upd, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, upd), opt, loss

    return step, (lora, tx.init(lora)), (rest, tokens)


def make_qwix(model, tokens, where):
    """Peer: qwix's LoRA provider over the same linen GPT (only lora_a/lora_b are trained)."""
    import qwix

    regex = r".*attn/(query|value)" if where == "attn_qv" else r".*(attn/(query|key|value|out)|fc1|fc2)"
    qmodel = qwix.apply_lora_to_model(model, qwix.LoraProvider(module_path=regex, rank=RANK, alpha=2.0 * RANK))
    variables = qmodel.init(jax.random.key(0), tokens)
    params = variables["params"]
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    is_lora = {
        lorajax.path_str(p): ("lora_a" in lorajax.path_str(p) or "lora_b" in lorajax.path_str(p)) for p, _ in flat
    }
    if not any(is_lora.values()):
        raise RuntimeError("qwix created no lora_a/lora_b params")
    train = jax.tree_util.tree_map_with_path(lambda p, x: x if is_lora[lorajax.path_str(p)] else None, params)
    frozen = jax.tree_util.tree_map_with_path(lambda p, x: None if is_lora[lorajax.path_str(p)] else x, params)
    tx = optax.adam(1e-4)

    def step(t, opt, frozen, tokens):
        def loss_fn(t):
            p = lorajax.combine(t, frozen)
            return lm_loss(qmodel.apply({**variables, "params": p}, tokens), tokens)

        loss, g = jax.value_and_grad(loss_fn)(t)
        upd, opt = tx.update(g, opt, t)
        return optax.apply_updates(t, upd), opt, loss

    return step, (train, tx.init(train)), (frozen, tokens)
