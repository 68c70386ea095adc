"""Naming parameters and choosing which kernels get LoRA."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import jax
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from lorajax import _boxes

KeyPath: TypeAlias = tuple[Any, ...]
Where: TypeAlias = "Preset | str | Sequence[str] | Callable[[KeyPath, Any], bool]"

#: Leaf names that hold a weight matrix (Flax ``kernel``/``embedding``, Equinox/PyTorch ``weight``).
KERNEL_NAMES = frozenset({"kernel", "weight", "embedding", "w"})
_EMBED_MODULES = re.compile(
    r"(?i)(embed|embedding|embeddings|embed_tokens|word_embeddings|position_embeddings|token_type_embeddings|wte|wpe|"
    r"tok_embeddings|shared|token_embedding|pos_embedding)"
)
_CONV_MODULES = re.compile(r"(?i)(?:\w*_)?conv\w*")
_HEAD_MODULES = re.compile(r"(?i)(lm_head|head|output_head|classifier|logits|unembed|embed_out|score|decoder_head)")


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


def is_kernel(path: KeyPath, leaf: Any) -> bool:
    """A weight matrix by name and rank: ``kernel``/``weight``/``embedding`` with two or more axes."""
    parts = path_parts(path)
    return bool(parts) and parts[-1] in KERNEL_NAMES and len(getattr(_boxes.unbox(leaf), "shape", ())) >= 2


def is_embedding(path: KeyPath, leaf: Any) -> bool:
    """An embedding table by its leaf name (``embedding``) or its module's name."""
    parts = path_parts(path)
    return is_kernel(path, leaf) and (
        parts[-1] == "embedding" or (len(parts) > 1 and _EMBED_MODULES.fullmatch(parts[-2]) is not None)
    )


def _module_matches(module: str, names: Sequence[str]) -> bool:
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
        self._regex = re.compile(r"(?:.*/)?(?:" + "|".join(f"(?:{p})" for p in self.patterns) + ")")

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
        return not (_HEAD_MODULES.fullmatch(parts[-2]) or _CONV_MODULES.fullmatch(parts[-2]))


_Q = r"query|q_proj|q|query_proj|to_q|q_lin|wq"
_K = r"key|k_proj|k|key_proj|to_k|k_lin|wk"
_V = r"value|v_proj|v|value_proj|to_v|v_lin|wv"
_FUSED = r"c_attn|qkv|query_key_value|Wqkv|qkv_proj|in_proj"
_OUT = (
    r"out|o_proj|o|out_proj|output_proj|to_out|out_lin|"
    r"attention/output/dense|attn/c_proj|self_attn/dense|attention/dense"
)
_MLP = (
    r"gate_proj|up_proj|down_proj|fc1|fc2|fc_in|fc_out|c_fc|mlp/c_proj|intermediate/dense|(?<!attention/)output/dense|"
    r"wi|wo|wi_0|wi_1|w1|w2|w3|dense_h_to_4h|dense_4h_to_h|"
    r"[^/]*(?:mlp|Mlp|MLP|MlpBlock|ffn|FFN|feed_forward|FeedForward)[^/]*/[^/]+"
)

attn_qv = Preset("attn_qv", [_Q, _V, _FUSED], "Attention query and value projections (Hu et al.'s default).")
attn_qkv = Preset("attn_qkv", [_Q, _K, _V, _FUSED], "Attention query, key and value projections.")
attn_all = Preset("attn_all", [_Q, _K, _V, _FUSED, _OUT], "Attention query, key, value and output projections.")
mlp = Preset("mlp", [_MLP], "Feed-forward (MLP) projections.")
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
        return lambda path, leaf: is_kernel(path, leaf) and _module_matches(module_path(path), names)
    raise TypeError(
        f"where must be a preset (e.g. lorajax.attn_qv), a regex string, a non-empty list of module names "
        f"or a callable (path, leaf) -> bool; got {where!r}."
    )


def match_pattern(pattern: dict[str, Any] | None, path: KeyPath) -> Any:
    """The value of the first key of ``pattern`` that names this parameter, or None.

    A key names a parameter when it fully matches the path or the module path as
    a regex, or when the module path equals it or ends with '/' + key (PEFT's
    ``rank_pattern`` rule, with '/' for '.').
    """
    if not pattern:
        return None
    full, module = path_str(path), module_path(path)
    for key, value in pattern.items():
        k = key.replace(".", "/")
        if _module_matches(module, [k]) or re.fullmatch(key, full) or re.fullmatch(key, module):
            return value
    return None


def tree_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[KeyPath, Any]]:
    """``tree_flatten_with_path`` that stops at Flax boxes (and anything ``is_leaf`` says)."""

    def stop(x: Any) -> bool:
        return _boxes.is_box(x) or (is_leaf is not None and is_leaf(x))

    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=stop)[0]
