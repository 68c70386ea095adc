"""A kernel seen as the matrix its LoRA update lives in, for the inits that factorise it."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lorajax._layout import Layout


def as_matrix(w: jax.Array, layout: Layout) -> jax.Array:
    """The kernel as ``(*stacked, fan_in, fan_out)``: the matrix its LoRA update ``a @ b`` lives in.

    >>> as_matrix(jnp.zeros((2, 3, 4)), Layout("ioo")).shape
    (2, 12)
    """
    shape = tuple(w.shape)
    fan_in, fan_out = layout.sizes(shape)
    moved = jnp.transpose(w, layout.stack + layout.fan_in + layout.fan_out)
    return moved.reshape(*(shape[k] for k in layout.stack), fan_in, fan_out)


def replicated(m: jax.Array) -> jax.Array:
    """``m`` gathered where its sharding is explicit: JAX's SVD and QR take no sharded matrix axes."""
    sharding: Any = getattr(jax.typeof(m), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if sharding is None or spec is None or all(entry is None for entry in spec):
        return m
    return jax.sharding.reshard(m, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))
