"""lorajax in 35 lines: LoRA on a Flax linen model, trained with optax, merged back to plain params."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lorajax


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="fc2")(nn.relu(nn.Dense(64, name="fc1")(x)))


model, x = MLP(), jax.random.normal(jax.random.key(0), (256, 16))
y = jnp.sin(x @ jax.random.normal(jax.random.key(3), (16, 8)))  # the new task to adapt to
base = model.init(jax.random.key(1), x)  # stands in for pretrained weights

params = lorajax.lorafy(base, rank=4, where=lorajax.mlp, key=jax.random.key(2))  # base frozen, A random, B zero
print(lorajax.summary(params))
mse = lambda p: jnp.mean((model.apply(p, x) - y) ** 2)
tx = lorajax.masked(optax.adam(1e-2))  # updates only the LoRA factors
opt_state = tx.init(params)


@jax.jit
def step(params, opt_state):
    loss, grads = jax.value_and_grad(lambda p: mse(lorajax.merge(p)))(params)  # grads reach only a and b
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


for _ in range(200):
    params, opt_state, loss = step(params, opt_state)
merged = lorajax.merge(params)  # plain Flax params again: serve with model.apply, zero extra inference cost
print(f"base loss {mse(base):.4f} -> merged loss {mse(merged):.4f} with {lorajax.summary(params).trainable} params")
