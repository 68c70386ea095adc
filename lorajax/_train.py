"""Training helpers: which leaves train, and an optimizer that moves only those.

What trains is read from the params themselves: the LoRA factors, plus leaves
declared :class:`lorajax.Trainable` (``lorafy(..., also=...)``). Everything else is
frozen, and ``merge``/``factored`` stop its gradient, so the same answer holds for
the optimizer and for the loss.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from lorajax._node import is_lora
from lorajax._tokens import is_tokens
from lorajax._trainable import is_node, is_trainable

_MOVED = (
    "{caller}: also= moved to lorafy(..., also=...) / lorajax.trainable(params, where): declare extra trainable "
    "leaves once, in the params, so that merge, factored, the optimizer and the summary all agree (a leaf named "
    "only here would get a zero gradient from merge and silently not train)."
)


def reject_also(also: Any, caller: str) -> None:
    """Raise where a caller still passes the removed ``also=`` argument."""
    if also is not None:
        raise TypeError(_MOVED.format(caller=caller))


def _fill(x: Any, value: bool) -> Any:
    return jax.tree.map(lambda _: value, x)


def mask(params: Any, also: Any = None) -> Any:
    """A bool pytree shaped like ``params``: True exactly at what trains.

    What trains: the LoRA factors ``a`` and ``b`` (and a DoRA node's ``magnitude``), and the values of
    :class:`lorajax.Trainable` nodes (``lorafy(..., also=...)``). LoRA bases and
    every other leaf are False. Use it as ``optax.masked(tx, lorajax.mask)``: since
    ``merge`` and ``factored`` give every frozen leaf an exactly zero gradient, the
    frozen leaves stay bit-identical under any optimizer. :func:`masked` does the
    same and also keeps no optimizer state for frozen leaves.

    Args:
        params: a pytree with :class:`LoRA` (and :class:`lorajax.Trainable`) nodes.
        also: removed; raises ``TypeError`` (declare extra leaves with ``lorafy(..., also=...)``).

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> p = {"q": {"kernel": jnp.eye(4), "bias": jnp.zeros(4)}}
        >>> p = lorajax.lorafy(p, rank=2, where=["q"])
        >>> m = lorajax.mask(p)
        >>> m["q"]["kernel"].a, m["q"]["kernel"].base, m["q"]["bias"]
        (True, False, False)
    """
    reject_also(also, "mask")

    def label(x: Any) -> Any:
        if is_lora(x):
            trains = dict(a=_fill(x.a, True), b=_fill(x.b, True), magnitude=_fill(x.magnitude, True))
            return dataclasses.replace(x, base=_fill(x.base, False), bias=_fill(x.bias, True), **trains)
        if is_trainable(x):
            return dataclasses.replace(x, value=_fill(x.value, True))
        if is_tokens(x):  # trainable tokens: the rows train, the table does not
            return dataclasses.replace(x, base=_fill(x.base, False), values=_fill(x.values, True))
        return _fill(x, False)

    return jax.tree.map(label, params, is_leaf=is_node)


def masked(tx: optax.GradientTransformation, also: Any = None) -> optax.GradientTransformation:
    """``tx`` on what trains (see :func:`mask`), exact zero updates for everything else.

    Unlike ``optax.masked(tx, lorajax.mask)``, which hands the frozen leaves'
    gradients through as updates (zero once they come from ``merge``/``factored``,
    but whatever they are otherwise), every frozen leaf gets an exact zero update
    whatever the gradients say, and the optimizer state is kept only for the
    trainable leaves.

    Args:
        tx: the optimizer for the trainable leaves.
        also: removed; raises ``TypeError`` (declare extra leaves with ``lorafy(..., also=...)``).

    Example:
        >>> import jax, jax.numpy as jnp, optax, lorajax
        >>> p = lorajax.lorafy({"q": {"kernel": jnp.eye(4)}}, rank=2, where=["q"])
        >>> tx = lorajax.masked(optax.adam(1e-2))
        >>> state = tx.init(p)
        >>> grads = jax.tree.map(jnp.ones_like, p)
        >>> updates, state = tx.update(grads, state, p)
        >>> bool((updates["q"]["kernel"].base == 0).all())
        True
    """
    reject_also(also, "masked")

    def labels(params: Any) -> Any:
        return jax.tree.map(lambda m: "train" if m else "freeze", mask(params))

    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def partition(params: Any, also: Any = None) -> tuple[Any, Any]:
    """Split ``params`` into ``(trainable, frozen)`` trees with ``None`` holes.

    Differentiate with respect to ``trainable`` only and no gradient of a frozen
    leaf is ever formed: ``jax.grad(lambda t: loss(combine(t, frozen)))(trainable)``.

    Args:
        params: a pytree with :class:`LoRA` (and :class:`lorajax.Trainable`) nodes.
        also: removed; raises ``TypeError`` (declare extra leaves with ``lorafy(..., also=...)``).

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> p = lorajax.lorafy({"q": {"kernel": jnp.eye(4)}}, rank=2, where=["q"])
        >>> trainable, frozen = lorajax.partition(p)
        >>> trainable["q"]["kernel"].base is None, frozen["q"]["kernel"].a is None
        (True, True)
        >>> lorajax.combine(trainable, frozen)["q"]["kernel"].base is p["q"]["kernel"].base
        True
    """
    reject_also(also, "partition")
    keep = mask(params)
    trainable = jax.tree.map(lambda m, x: x if m else None, keep, params)
    frozen = jax.tree.map(lambda m, x: None if m else x, keep, params)
    return trainable, frozen


def combine(*trees: Any) -> Any:
    """Put trees with ``None`` holes (from :func:`partition`) back together.

    Each leaf is taken from the first tree that has it.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> p = lorajax.lorafy({"q": {"kernel": jnp.eye(4)}}, rank=2, where=["q"])
        >>> trainable, frozen = lorajax.partition(p)
        >>> grads = jax.grad(lambda t: lorajax.merge(lorajax.combine(t, frozen))["q"]["kernel"].sum())(trainable)
        >>> grads["q"]["kernel"].a.shape, grads["q"]["kernel"].base is None
        ((4, 2), True)
    """

    def first(*xs: Any) -> Any:
        return next((x for x in xs if x is not None), None)

    return jax.tree.map(first, *trees, is_leaf=lambda x: x is None)
