"""Trainable tokens (PEFT's ``trainable_token_indices``): some rows of an embedding table train, the rest stay frozen.

PEFT's ``TrainableTokensLayer`` keeps a copy of the named rows (``trainable_tokens_delta``, despite its name
the rows' new *values*, started from the table's own rows) and runs the layer on the table with those rows
replaced (``index_copy``); merging writes them into the table. Only the rows are trained and saved, which is
the point when a chat template adds a handful of tokens to a large vocabulary. An LM head tied to the table
reads the same replaced rows.

Here a :class:`TrainableTokens` node stands where the table was: the frozen ``base`` table, the trained
``values`` (one row per index) and the static ``indices``. :func:`tokens_table` is the table with the rows
replaced; ``merge`` returns it in the table's place, ``factored`` runs the model on it, so a tied head that
reads the same leaf (``Embed.attend``) sees the new rows too, and the gradient reaches ``values`` only.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lorajax import _boxes
from lorajax._node import OnBase

__all__ = ["TrainableTokens", "check_indices", "is_tokens", "tokens_table"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainableTokens(OnBase):
    """An embedding table (``(rows, dim)``) whose rows ``indices`` train: PEFT's ``trainable_token_indices``.

    ``base`` is the caller's table (array or Flax box), frozen. ``values`` holds the trained rows,
    ``(len(indices), dim)``, in the order of ``indices``; they *replace* the table's rows (PEFT's
    semantics), and start as those rows, so the model starts at the base. ``indices`` is static.
    ``merge`` gives :func:`lorajax.tokens_table`; ``mask`` marks ``values`` True.

    >>> import jax.numpy as jnp
    >>> node = TrainableTokens(jnp.zeros((4, 2)), jnp.ones((1, 2)), (2,))
    >>> node.shape, node.indices
    ((4, 2), (2,))
    """

    base: Any
    values: Any
    indices: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))


def is_tokens(x: Any) -> bool:
    """True for a :class:`TrainableTokens` node.

    >>> is_tokens(1)
    False
    """
    return isinstance(x, TrainableTokens)


def tokens_table(node: TrainableTokens) -> Any:
    """The table with the node's rows replaced by its ``values`` (PEFT's ``index_copy``), boxed like the base.

    >>> import jax.numpy as jnp
    >>> tokens_table(TrainableTokens(jnp.zeros((3, 2)), jnp.ones((1, 2)), (1,))).tolist()
    [[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]
    """
    table = _boxes.unbox(node.base)
    rows = jnp.asarray(_boxes.unbox(node.values)).astype(table.dtype)
    return _boxes.rebox(node.base, table.at[jnp.asarray(node.indices, jnp.int32)].set(rows))


def rows_like(table: Any, values: Any) -> Any:
    """Trained rows ``values`` boxed and placed like the (possibly boxed) ``table``, its row axis left unsharded.

    A table sharded by columns keeps that sharding on its rows: in a multi-process job the rows become one global
    array on the table's mesh, not a copy per process.

    >>> import jax.numpy as jnp
    >>> rows_like(jnp.zeros((5, 3)), jnp.ones((2, 3))).shape
    (2, 3)
    """
    array = _boxes.unbox(table)
    sharding = getattr(array, "sharding", None)
    if isinstance(values, jax.core.Tracer) or not isinstance(sharding, jax.sharding.Sharding):
        placed = jnp.asarray(values)
    elif isinstance(sharding, jax.sharding.NamedSharding):
        columns = (tuple(sharding.spec) + (None, None))[1]
        placed = jax.device_put(
            values, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(None, columns))
        )
    elif sharding.is_fully_replicated:
        placed = jax.device_put(values, sharding)
    else:
        placed = jnp.asarray(values)
    names = _boxes.names(table)
    return _boxes.rebox(table, placed, None if names is None else (None, names[1]))


def check_indices(indices: Any, rows: int, name: str) -> str | None:
    """Why ``indices`` cannot name trainable rows of a table with ``rows`` rows, or ``None``.

    >>> check_indices([1, 2], 4, "emb"), check_indices([1, 1, 9], 4, "emb")
    (None, 'emb: token indices [1, 9] repeat or lie outside the table of 4 rows')
    """
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence) or not indices:
        return f"{name}: token indices must be a non-empty list of integers, got {indices!r}"
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in indices):
        return f"{name}: token indices must be integers, got {list(indices)!r}"
    seen: set[int] = set()
    bad = []
    for i in indices:
        if int(i) in seen or not 0 <= int(i) < rows:
            bad.append(int(i))
        seen.add(int(i))
    if bad:
        return f"{name}: token indices {bad} repeat or lie outside the table of {rows} rows"
    return None
