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


def _split_key(key: Any) -> tuple[str, ...]:
    name = _key_name(key)
    # A flat dict keyed by whole paths (keras ``"block_0/attention/query/kernel"``, Hugging Face
    # ``"model.layers.0.self_attn.q_proj.weight"``) names the same parameters as the nested tree would.
    if isinstance(key, DictKey) and isinstance(key.key, str):
        for sep in ("/", "."):
            if sep in name:
                return tuple(part for part in name.split(sep) if part)
    return (name,)


def path_parts(path: KeyPath) -> tuple[str, ...]:
    """Names along a JAX key path, without the attribute keys of Flax boxes.

    NNX Variables and linen ``Partitioned`` boxes flatten to a ``.value``
    attribute; dropping it keeps paths framework-neutral. A *module* named
    ``value`` (NNX attention) is a dict key, not an attribute, and stays.
    A dict key that holds a whole path (``"attn/query/kernel"`` or the dotted
    ``"attn.query.kernel"``) is split into its names, so flat and nested
    dicts are matched alike.

    >>> from jax.tree_util import DictKey
    >>> path_parts((DictKey("model.layers.0.q_proj.weight"),))
    ('model', 'layers', '0', 'q_proj', 'weight')
    """
    return tuple(
        part
        for k in path
        if not (isinstance(k, GetAttrKey) and k.name in ("value", "raw_value"))
        for part in _split_key(k)
    )


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


_MUTABLE_VARIABLES = {"penzai": ("Parameter", "StateVariable")}


def mutable_variable_hint(leaves: list[tuple[KeyPath, Any]]) -> str:
    """A hint for trees whose weights hide in mutable variable objects (penzai), or ``""``.

    Such objects are pytree leaves without a shape, so nothing inside them can be
    found; penzai's ``pz.unbind_params``/``pz.freeze_params`` turn them into
    plain pytree nodes.
    """
    for path, leaf in leaves:
        cls = type(leaf)
        names = _MUTABLE_VARIABLES.get(cls.__module__.split(".")[0], ())
        if cls.__name__ in names:
            return (
                f" {path_str(path)} is a mutable penzai {cls.__name__}, which holds its array out of the pytree's "
                "reach: pass `pz.freeze_params(model)` (or the values from `pz.unbind_params(model)`) instead, "
                "and rebuild the model from them."
            )
    return ""
