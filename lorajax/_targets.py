"""Choosing which kernels get LoRA: presets, ``where`` specs and PEFT's name-pattern rule."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

from lorajax import _boxes, _names
from lorajax._paths import KeyPath, module_path, path_parts, path_str, tree_paths

__all__ = [
    "KeyPath",
    "Preset",
    "compile_where",
    "is_embedding",
    "is_kernel",
    "match_pattern",
    "module_matches",
    "module_path",
    "path_parts",
    "path_str",
    "pattern_key",
    "tree_paths",
]

Where: TypeAlias = "Preset | str | Sequence[str] | Callable[[KeyPath, Any], bool]"


def is_kernel(path: KeyPath, leaf: Any) -> bool:
    """A weight matrix by name and rank: ``kernel``/``weight``/``embedding`` with two or more axes."""
    parts = path_parts(path)
    return bool(parts) and parts[-1] in _names.KERNEL_NAMES and len(getattr(_boxes.unbox(leaf), "shape", ())) >= 2


def is_embedding(path: KeyPath, leaf: Any) -> bool:
    """An embedding table by its leaf name (``embedding``) or its module's name."""
    parts = path_parts(path)
    return is_kernel(path, leaf) and (
        parts[-1] == "embedding" or (len(parts) > 1 and _names.EMBED_MODULES.fullmatch(parts[-2]) is not None)
    )


def module_matches(module: str, names: Sequence[str]) -> bool:
    # PEFT's rule with '/' for '.': the name itself or a '/'-suffix of the module path.
    return any(module == n or module.endswith("/" + n) for n in names)


class Preset:
    """A named target set: kernels whose module path matches one of ``patterns``.

    Each pattern is a regex that must match a '/'-suffix of the module path
    (the parameter path without its leaf name). Presets compose with ``|``.

    >>> import jax.numpy as jnp
    >>> import jax
    >>> params = {"attn": {"query": {"kernel": jnp.ones((4, 4))}, "key": {"kernel": jnp.ones((4, 4))}}}
    >>> [path_str(p) for p, x in jax.tree_util.tree_flatten_with_path(params)[0] if attn_qv(p, x)]
    ['attn/query/kernel']
    """

    def __init__(self, name: str, patterns: Sequence[str], doc: str = "") -> None:
        self.name = name
        self.patterns = tuple(patterns)
        self.__doc__ = doc or f"Preset {name}."
        self._regex = _names.suffix_regex(*self.patterns)

    def __call__(self, path: KeyPath, leaf: Any) -> bool:
        return (
            is_kernel(path, leaf)
            and not is_embedding(path, leaf)
            and self._regex.fullmatch(module_path(path)) is not None
        )

    def __or__(self, other: Any) -> Preset:
        return _Union(self, other)

    def __ror__(self, other: Any) -> Preset:
        return _Union(other, self)

    def __repr__(self) -> str:
        return f"lorajax.{self.name}"


class _Union(Preset):
    """Any of several ``where`` specs (presets, regexes, module lists, callables)."""

    def __init__(self, *wheres: Any) -> None:
        super().__init__(" | ".join(map(repr, wheres)), [])
        self._preds = [compile_where(w) for w in wheres]

    def __call__(self, path: KeyPath, leaf: Any) -> bool:
        return any(p(path, leaf) for p in self._preds)

    def __repr__(self) -> str:
        return self.name


class _AllLinear(Preset):
    def __call__(self, path: KeyPath, leaf: Any) -> bool:
        parts = path_parts(path)
        if not is_kernel(path, leaf) or is_embedding(path, leaf) or len(parts) < 2:
            return False
        # The output head and convolutions are not adapted (PEFT's 'all-linear' skips the head too).
        return not (_names.HEAD_MODULES.fullmatch(parts[-2]) or _names.CONV_MODULES.fullmatch(parts[-2]))


attn_qv = Preset(
    "attn_qv",
    [_names.QUERY, _names.VALUE, _names.FUSED_QKV],
    "Attention query and value projections (Hu et al.'s default).",
)
attn_qkv = Preset(
    "attn_qkv",
    [_names.QUERY, _names.KEY, _names.VALUE, _names.FUSED_QKV],
    "Attention query, key and value projections.",
)
attn_all = Preset(
    "attn_all",
    [_names.QUERY, _names.KEY, _names.VALUE, _names.FUSED_QKV, _names.ATTN_OUT],
    "Attention query, key, value and output projections.",
)
mlp = Preset("mlp", [_names.MLP], "Feed-forward (MLP) projections.")
all_linear = _AllLinear(
    "all_linear", [], "Every linear kernel except embeddings, convolutions and the output head (PEFT's 'all-linear')."
)

PRESETS = {p.name: p for p in (attn_qv, attn_qkv, attn_all, mlp, all_linear)}


def compile_where(where: Any) -> Callable[[KeyPath, Any], bool]:
    """Turn any accepted ``where`` into a predicate ``(path, leaf) -> bool``.

    Accepted: a :class:`Preset`, a callable ``(path, leaf) -> bool``, a regex
    string (full match on the '/'-joined path, leaf name included), or a list
    of module names (a module matches a name it equals or ends with, after a
    '/', as in PEFT's ``target_modules``; only kernel leaves are taken).
    """
    if isinstance(where, str):
        try:
            regex = re.compile(where)
        except re.error as e:
            raise ValueError(f"where={where!r} is not a valid regular expression: {e}") from None
        return lambda path, leaf: regex.fullmatch(path_str(path)) is not None
    if callable(where):
        return where
    if isinstance(where, Sequence) and where and all(isinstance(n, str) for n in where):
        names = [n.replace(".", "/") for n in where]
        return lambda path, leaf: is_kernel(path, leaf) and module_matches(module_path(path), names)
    raise TypeError(
        f"where must be a preset (e.g. lorajax.attn_qv), a regex string, a non-empty list of module names "
        f"or a callable (path, leaf) -> bool; got {where!r}."
    )


def pattern_key(keys: Any, module: str) -> str | None:
    r"""PEFT's ``rank_pattern``/``alpha_pattern`` rule: the first key that names the dotted ``module``.

    A key names a module when the regex ``(.*\.)?(key)$`` matches its dotted name
    from the start: the key equals the name, or a '.'-suffix of it, or matches
    it as a regex (PEFT's ``get_pattern_key``). Returns ``None`` where no key does.

    >>> pattern_key(["q_proj", "layers.1.k_proj"], "model.layers.1.k_proj")
    'layers.1.k_proj'
    >>> pattern_key(["proj"], "model.q_proj") is None  # a suffix after a '.', not any suffix
    True
    """
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return str(key)
    return None


def match_pattern(pattern: dict[str, Any] | None, path: KeyPath) -> Any:
    """The value of the first key of ``pattern`` that names this parameter, or None.

    PEFT's rule (:func:`pattern_key`) on the module path, with '/' written as '.'
    (so ``"layers_0/q"`` and ``"layers_0.q"`` are the same key); failing that, a key
    that fully matches the '/'-joined parameter path as a regex (leaf name included,
    e.g. ``r".*/query/kernel"``).
    """
    if not pattern:
        return None
    dotted = {key.replace("/", r"\."): key for key in pattern}
    hit = pattern_key(list(dotted), module_path(path).replace("/", "."))
    if hit is not None:
        return pattern[dotted[hit]]
    full = path_str(path)
    for key, value in pattern.items():
        if re.fullmatch(key, full):
            return value
    return None
