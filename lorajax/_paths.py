"""Naming parameters: JAX key paths as '/'-joined strings, framework-neutral."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import jax
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from lorajax import _boxes

KeyPath: TypeAlias = tuple[Any, ...]


def _key_name(key: Any) -> str:
    if isinstance(key, DictKey):
        return str(key.key)
    if isinstance(key, GetAttrKey):
        return key.name
    if isinstance(key, SequenceKey):
        return str(key.idx)
    if isinstance(key, FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_parts(path: KeyPath) -> tuple[str, ...]:
    """Names along a JAX key path, without the attribute keys of Flax boxes.

    NNX Variables and linen ``Partitioned`` boxes flatten to a ``.value``
    attribute; dropping it keeps paths framework-neutral. A *module* named
    ``value`` (NNX attention) is a dict key, not an attribute, and stays.
    """
    return tuple(_key_name(k) for k in path if not (isinstance(k, GetAttrKey) and k.name in ("value", "raw_value")))


def path_str(path: KeyPath) -> str:
    """The '/'-joined name of a key path, e.g. ``"params/Dense_0/kernel"``.

    >>> import jax
    >>> [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path({"a": {"kernel": 1}})[0]]
    ['a/kernel']
    """
    return "/".join(path_parts(path))


def module_path(path: KeyPath) -> str:
    """The '/'-joined name of the module that owns a leaf (the path minus its last name)."""
    return "/".join(path_parts(path)[:-1])


def tree_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[KeyPath, Any]]:
    """``tree_flatten_with_path`` that stops at Flax boxes (and anything ``is_leaf`` says)."""

    def stop(x: Any) -> bool:
        return _boxes.is_box(x) or (is_leaf is not None and is_leaf(x))

    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=stop)[0]


def rebuild(tree: Any, leaves: list[tuple[KeyPath, Any]], replaced: dict[int, Any], is_leaf: Callable) -> Any:
    """``tree`` with leaf ``n`` of ``tree_paths(tree, is_leaf)`` replaced by ``replaced[n]``."""
    treedef = jax.tree_util.tree_structure(tree, is_leaf=lambda x: _boxes.is_box(x) or is_leaf(x))
    return jax.tree_util.tree_unflatten(treedef, [replaced.get(n, leaf) for n, (_, leaf) in enumerate(leaves)])
