"""What trains: the LoRA factors plus leaves declared trainable once, in the tree itself.

A leaf the user wants to train beside the adapters (a bias, a norm, a new head) is
wrapped in a :class:`Trainable` node by ``lorafy(..., also=...)`` or
:func:`trainable`. Because the declaration lives in the params, every consumer reads
the same answer: ``mask`` (and so ``optax.masked``), ``masked``, ``partition``,
``summary``, and ``merge``/``factored``, which stop the gradient of everything else.
So a frozen leaf cannot move under any optimizer, and a declared leaf cannot be
silently left untrained by a forgotten argument.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from lorajax import _boxes, _names, _paths, _targets
from lorajax._node import LoRA, is_lora
from lorajax._tokens import TrainableTokens, is_tokens


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Trainable:
    """A leaf that trains beside the LoRA factors (a bias, a norm scale, a head).

    ``value`` is the caller's leaf (array or Flax box), unchanged. ``merge`` and
    ``unlorafy`` unwrap it; ``mask`` marks it True.

    >>> import jax.numpy as jnp
    >>> Trainable(jnp.zeros(3)).value.shape
    (3,)
    """

    value: Any


def is_trainable(x: Any) -> bool:
    """True for a :class:`Trainable` node."""
    return isinstance(x, Trainable)


def is_node(x: Any) -> bool:
    """True for the nodes lorajax puts into params (:class:`LoRA`, :class:`Trainable`, ``TrainableTokens``)."""
    return isinstance(x, (LoRA, Trainable, TrainableTokens))


def holds_nodes(tree: Any) -> bool:
    """Whether ``tree`` holds any :class:`LoRA` or :class:`Trainable` node."""
    return any(is_node(x) for x in jax.tree.leaves(tree, is_leaf=is_node))


def trainable(params: Any, where: Any) -> Any:
    """Declare extra leaves trainable: each leaf ``where`` picks is wrapped in :class:`Trainable`.

    The declaration is made once and read by everything: ``mask``/``optax.masked``,
    ``masked``, ``partition``, ``summary``, ``merge`` and ``factored``. Every leaf
    that is neither a LoRA factor nor declared here is frozen (its gradient through
    ``merge``/``factored`` is exactly zero). ``lorafy(..., also=where)`` does the
    same in one call.

    Args:
        params: a pytree (lorafied or not).
        where: which leaves, as ``lorafy``'s ``where`` (a regex over the '/'-joined
            path, a list of module names, or a callable ``(path, leaf) -> bool``);
            any leaf may be picked, not only kernels. LoRA nodes are never picked.

    Returns:
        ``params`` with :class:`Trainable` nodes at the picked leaves.

    Raises:
        ValueError: when ``where`` picks no leaf.

    Example:
        >>> import jax.numpy as jnp, lorajax
        >>> p = lorajax.trainable({"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}}, r".*/bias")
        >>> lorajax.mask(p)["dense"]["bias"].value, lorajax.mask(p)["dense"]["kernel"]
        (True, False)
    """
    return declare_trainable(params, where)


def declare_trainable(params: Any, where: Any, *, caller: str = "trainable", arg: str = "where") -> Any:
    """:func:`trainable`, with errors that name the public function called and its argument (``lorafy``'s ``also``)."""
    match = _targets.compile_where(where)
    if isinstance(where, (list, tuple)):
        # A module list picks every leaf of the named modules, not only their kernels.
        match = _module_list(where)
    leaves = _paths.tree_paths(params, is_leaf=is_node)
    chosen = {}
    for n, (path, leaf) in enumerate(leaves):
        if is_node(leaf) or not hasattr(_boxes.unbox(leaf), "shape"):
            continue
        if match(path, _boxes.unbox(leaf)):
            chosen[n] = Trainable(leaf)
    _check_picks(where, leaves, chosen, caller, arg)
    return _paths.rebuild(params, leaves, chosen, is_node)


def _module_list(where: Any) -> Any:
    """A module list's predicate: every leaf of a named module, and a bare kernel named itself (tunix's expert
    bank ``mlp/gate_proj`` is its own module, as :func:`lorajax.lorafy`'s ``where=`` reads it)."""
    names = [n.replace(".", "/") for n in where]

    def match(path: Any, leaf: Any) -> bool:
        own = _targets.kernel_module(path, leaf)
        return _targets.module_matches(_paths.module_path(path), names) or (
            own is not None and _targets.module_matches(own, names)
        )

    return match


def _check_picks(where: Any, leaves: list, chosen: dict, caller: str, arg: str) -> None:
    """Raise where ``where`` (or one module name of a list) picks nothing, or only kernels already adapted.

    A kernel that ``lorafy``'s ``where=`` adapted is a LoRA node: its factors train, and it cannot also be
    declared trainable whole. Saying "matched no leaf" there would be wrong: the leaf exists.
    """
    specs = list(where) if isinstance(where, (list, tuple)) else [where]
    problems, routers = [], False
    for spec in specs:
        if isinstance(where, (list, tuple)):
            match = _module_list([spec])
        else:
            match = _targets.compile_where(spec)
        plain = [n for n, (path, leaf) in enumerate(leaves) if n in chosen and match(path, _boxes.unbox(leaf))]
        adapted = [
            _paths.path_str(path) for path, leaf in leaves if is_lora(leaf) and match(path, _boxes.unbox(leaf.base))
        ]
        if adapted and not plain:
            problems.append(f"{spec!r} names {', '.join(adapted)}")
            routers = routers or any(_names.is_router(name.rsplit("/", 1)[0]) for name in adapted)
    if problems:
        listed = "; ".join(problems)
        raise ValueError(
            f"{caller}: {arg}={where!r}: {listed}, already adapted by lorafy's where= (a LoRA node: its factors a "
            f"and b train). Drop it from {arg}= to train its adapter only, or leave it out of lorafy's where= to "
            "train the whole kernel (then it trains through this declaration)."
            + (" A router: all_linear adapts it, lorajax.mlp leaves it plain." if routers else "")
        )
    if not chosen:
        shown = ", ".join([_paths.path_str(p) for p, x in leaves if not is_node(x)][:8])
        hint = ""
        if isinstance(where, str) and _is_name(where):
            hint = (
                f" A string is a regular expression over the whole path (r'.*/{where}/.*'); a list names modules, "
                f"as PEFT's modules_to_save does ([{where!r}])."
            )
        raise ValueError(
            f"{caller}: {arg}={where!r} matched no leaf. Paths available include: {shown or 'none'}.{hint}"
        )


def _is_name(text: str) -> bool:
    """Whether ``text`` is a plain module name (letters, digits, ``_``, ``/``, ``.``), not a pattern."""
    return bool(text) and all(c.isalnum() or c in "_/." for c in text)


def _stop(x: Any) -> Any:
    if isinstance(x, (jax.Array, np.ndarray, jax.core.Tracer)):
        return jax.lax.stop_gradient(x)
    return x


def stop_frozen(tree: Any) -> Any:
    """``tree`` with the gradient of every frozen leaf stopped.

    Frozen is everything but LoRA factors and :class:`Trainable` values: LoRA
    bases, and every plain leaf of a tree that holds adapters. Trees without any
    LoRA or Trainable node (inputs, RNG keys) are returned as they are.
    """
    if not holds_nodes(tree):
        return tree

    def one(x: Any) -> Any:
        if is_lora(x):
            return dataclasses.replace(x, base=jax.tree.map(_stop, x.base))
        if is_trainable(x):
            return x
        if is_tokens(x):  # trainable tokens: the table is frozen, its trained rows are not
            return dataclasses.replace(x, base=jax.tree.map(_stop, x.base))
        return jax.tree.map(_stop, x)

    return jax.tree.map(one, tree, is_leaf=is_node)
