"""The tiny mixture-of-experts block of the MoE tests, in every dispatch form real MoE code uses.

A router, per-expert up/down banks ``(E, d, f)`` and ``(E, f, d)`` and a DeepSeek-style shared expert, written as a
dense all-experts einsum weighted by the router, MaxText's capacity-factor dispatch (``EBCM,EMH->EBCH``), a gather
of the experts' kernels by top-k index (``W[idx]``) and ``jax.lax.ragged_dot`` over tokens sorted by expert. Used by
tests/test_moe_dispatch.py and tests/test_moe_quant.py.
"""

import jax
import jax.numpy as jnp
import numpy as np

E, D, F, T, K, R, C = 4, 8, 6, 10, 2, 2, 5  # experts, d_model, ffn, tokens, top-k, rank, capacity per expert
EXPERTS = ("experts/up", "experts/down")
KERNELS = {"experts/up": (E, D, F), "experts/down": (E, F, D)}
# Per expert, every bank the same kind: one LoRA per expert.
LAYOUTS = {"experts/up": "sio", "experts/down": "sio"}


def normal(seed, shape, scale=0.3):
    # NumPy draws: no XLA compile per shape (eager jax.random costs seconds each on a busy CI machine).
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def params():
    return {
        "router": {"kernel": normal(0, (D, E))},
        "experts": {"up": normal(1, (E, D, F)), "down": normal(2, (E, F, D))},
        "shared": {"up": {"kernel": normal(3, (D, F))}, "down": {"kernel": normal(4, (F, D))}},
    }


X = normal(5, (T, D), 1.0)


def route(p, x):
    probs = jax.nn.softmax(x @ p["router"]["kernel"], axis=-1)  # (T, E)
    weights, idx = jax.lax.top_k(probs, K)
    return probs, weights, idx


def shared_expert(p, x):
    return jax.nn.silu(x @ p["shared"]["up"]["kernel"]) @ p["shared"]["down"]["kernel"]


def dense(p, x):
    """All experts on every token, weighted by the router (tunix's CPU form, Mixtral's reference)."""
    probs, _, _ = route(p, x)
    h = jax.nn.silu(jnp.einsum("td,edf->tef", x, p["experts"]["up"]))
    y = jnp.einsum("tef,efd->ted", h, p["experts"]["down"])
    return jnp.einsum("ted,te->td", y, probs) + shared_expert(p, x)


def capacity(p, x):
    """MaxText's capacity-factor dispatch: tokens into (E, batch, capacity) slots, ``EBCM,EMH->EBCH``."""
    _, weights, idx = route(p, x)
    onehot = jax.nn.one_hot(idx, E)  # (T, K, E)
    # Position of each (token, choice) in its expert's queue; over capacity C: dropped.
    slot = (jnp.cumsum(onehot.reshape(T * K, E), axis=0).reshape(T, K, E) - 1).astype(jnp.int32)
    keep = onehot * (slot < C)
    dispatch = jnp.einsum("tke,tkec->tec", keep, jax.nn.one_hot(slot, C))[None]  # (B=1, T, E, C)
    combine = jnp.einsum("tke,tk,tkec->tec", keep, weights, jax.nn.one_hot(slot, C))[None]
    xe = jnp.einsum("BTM,BTEC->EBCM", x[None], dispatch)
    h = jax.nn.silu(jnp.einsum("EBCM,EMH->EBCH", xe, p["experts"]["up"]))
    y = jnp.einsum("EBCH,EHM->EBCM", h, p["experts"]["down"])
    return jnp.einsum("EBCM,BTEC->BTM", y, combine)[0] + shared_expert(p, x)


def gathered(p, x):
    """Each token's top-k experts' kernels gathered by index, then a batched product with the token."""
    _, weights, idx = route(p, x)
    h = jax.nn.silu(jnp.einsum("td,tkdf->tkf", x, p["experts"]["up"][idx]))
    y = jnp.einsum("tkf,tkfd->tkd", h, p["experts"]["down"][idx])
    return jnp.einsum("tkd,tk->td", y, weights) + shared_expert(p, x)


def ragged(p, x):
    """MaxText/megablox: (token, expert) pairs sorted by expert, two grouped matmuls, unsorted and combined."""
    _, weights, idx = route(p, x)
    flat = idx.reshape(-1)
    order = jnp.argsort(flat)
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    xs = x[order // K]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, p["experts"]["up"], sizes))
    y = jax.lax.ragged_dot(h, p["experts"]["down"], sizes) * weights.reshape(-1)[order][:, None]
    return jnp.zeros_like(x).at[order // K].add(y) + shared_expert(p, x)


FORMS = {"dense": dense, "capacity": capacity, "gathered": gathered, "ragged": ragged}


def random_init(key, base, layout, rank, dtype):
    # Nonzero b, so the adapters change the output; seeded by the kernel's shape (up and down differ).
    seed = int(np.ravel_multi_index(base.shape[-2:], (64, 64)))
    return (
        normal(seed, layout.a_shape(base.shape, rank)).astype(dtype),
        normal(seed + 1, layout.b_shape(base.shape, rank)).astype(dtype),
    )


def close(got, want):
    # float32 sums in another order (rank-r products against the merged kernel): 1e-5 of the output's scale.
    scale = max(1.0, float(jnp.max(jnp.abs(want))))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * scale)
