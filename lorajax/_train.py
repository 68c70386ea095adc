"""Training helpers: which leaves train, and an optimizer that moves only those."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from lorajax import _boxes, _targets
from lorajax._node import is_lora


def _true(x: Any) -> Any:
    return jax.tree.map(lambda _: True, x)


def _false(x: Any) -> Any:
    return jax.tree.map(lambda _: False, x)


def mask(params: Any, also: Any = None) -> Any:
    """A bool pytree shaped like ``params``: True exactly at the LoRA factors.

    Use it as ``optax.masked(tx, lorajax.mask)``, but note that plain
    ``optax.masked`` passes the *unmasked* (frozen) gradients through untouched:
    prefer :func:`masked`, which zeroes them.

    Args:
        params: a pytree with :class:`LoRA` nodes.
        also: extra leaves to train (biases, norms, a head: PEFT's ``bias=`` and
            ``modules_to_save``), as a ``where`` of :func:`lorafy` (regex over the
            '/'-joined path, list of module names, or callable ``(path, leaf) -> bool``).

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> p = {"q": {"kernel": jnp.eye(4), "bias": jnp.zeros(4)}}
        >>> p = lorajax.lorafy(p, rank=2, where=["q"], key=jax.random.key(0))
        >>> m = lorajax.mask(p)
        >>> m["q"]["kernel"].a, m["q"]["kernel"].base, m["q"]["bias"]
        (True, False, False)
    """
    extra = _targets.compile_where(also) if also is not None else None

    def label(path: Any, x: Any) -> Any:
        if is_lora(x):
            return dataclasses.replace(x, base=_false(x.base), a=_true(x.a), b=_true(x.b))
        return _true(x) if extra is not None and extra(path, _boxes.unbox(x)) else _false(x)

    return jax.tree_util.tree_map_with_path(label, params, is_leaf=lambda x: is_lora(x) or _boxes.is_box(x))


def masked(tx: optax.GradientTransformation, also: Any = None) -> optax.GradientTransformation:
    """``tx`` on the LoRA factors (and ``also`` leaves), zero updates for everything else.

    Unlike ``optax.masked(tx, mask)``, which lets the frozen leaves' gradients
    through as updates, every frozen leaf gets an exact zero update, and the
    optimizer state is kept only for the trainable leaves.

    Args:
        tx: the optimizer for the trainable leaves.
        also: extra leaves to train, as in :func:`mask`.

    Example:
        >>> import jax, jax.numpy as jnp, optax, lorajax
        >>> p = lorajax.lorafy({"q": {"kernel": jnp.eye(4)}}, rank=2, where=["q"], key=jax.random.key(0))
        >>> tx = lorajax.masked(optax.adam(1e-2))
        >>> state = tx.init(p)
        >>> grads = jax.tree.map(jnp.ones_like, p)
        >>> updates, state = tx.update(grads, state, p)
        >>> bool((updates["q"]["kernel"].base == 0).all())
        True
    """

    def labels(params: Any) -> Any:
        return jax.tree.map(lambda m: "train" if m else "freeze", mask(params, also))

    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def partition(params: Any, also: Any = None) -> tuple[Any, Any]:
    """Split ``params`` into ``(trainable, frozen)`` trees with ``None`` holes.

    Differentiate with respect to ``trainable`` only and no gradient of a frozen
    leaf is ever formed: ``jax.grad(lambda t: loss(combine(t, frozen)))(trainable)``.

    Args:
        params: a pytree with :class:`LoRA` nodes.
        also: extra leaves to train, as in :func:`mask`.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> p = lorajax.lorafy({"q": {"kernel": jnp.eye(4)}}, rank=2, where=["q"], key=jax.random.key(0))
        >>> trainable, frozen = lorajax.partition(p)
        >>> trainable["q"]["kernel"].base is None, frozen["q"]["kernel"].a is None
        (True, True)
        >>> lorajax.combine(trainable, frozen)["q"]["kernel"].base is p["q"]["kernel"].base
        True
    """
    keep = mask(params, also)
    trainable = jax.tree.map(lambda m, x: x if m else None, keep, params)
    frozen = jax.tree.map(lambda m, x: None if m else x, keep, params)
    return trainable, frozen


def combine(*trees: Any) -> Any:
    """Put trees with ``None`` holes (from :func:`partition`) back together.

    Each leaf is taken from the first tree that has it.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> p = lorajax.lorafy({"q": {"kernel": jnp.eye(4)}}, rank=2, where=["q"], key=jax.random.key(0))
        >>> trainable, frozen = lorajax.partition(p)
        >>> grads = jax.grad(lambda t: lorajax.merge(lorajax.combine(t, frozen))["q"]["kernel"].sum())(trainable)
        >>> grads["q"]["kernel"].a.shape, grads["q"]["kernel"].base is None
        ((4, 2), True)
    """

    def first(*xs: Any) -> Any:
        return next((x for x in xs if x is not None), None)

    return jax.tree.map(first, *trees, is_leaf=lambda x: x is None)
