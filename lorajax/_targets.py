"""Choosing which kernels get LoRA: presets, ``where`` specs and PEFT's name-pattern rule."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

from lorajax import _boxes, _names
from lorajax._paths import KeyPath, module_path, path_parts, path_str

__all__ = [
    "Known",
    "Preset",
    "compile_where",
    "is_embedding",
    "is_kernel",
    "kernel_kind",
    "kernel_module",
    "match_pattern",
    "module_matches",
    "pattern_key",
]

Where: TypeAlias = "Preset | str | Sequence[str] | Callable[[KeyPath, Any], bool]"


@dataclasses.dataclass(frozen=True)
class Known:
    """Kernels known from outside their names: ``{exact path: layout spec}`` (from ``layout=``) and the output heads.

    A leaf consumed as a matmul weight is a kernel whatever its name (gemma's bare
    ``mlp/gating_einsum``); :func:`lorajax.infer_layouts` finds them, and its heads are
    the weights whose product is the traced function's output.
    """

    layouts: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    heads: frozenset[str] = frozenset()


_BARE = _names.suffix_regex(_names.QUERY, _names.KEY, _names.VALUE, _names.FUSED_QKV, _names.ATTN_OUT, _names.MLP)


def _ndim(leaf: Any) -> int:
    return len(getattr(_boxes.unbox(leaf), "shape", ()))


def kernel_module(path: KeyPath, leaf: Any, known: Known | None = None) -> str | None:
    """The module path of a weight leaf, or ``None`` where the leaf is no kernel.

    A kernel is a leaf named ``kernel``/``weight``/``embedding``/``w`` with two or more
    axes (its module is the path before the name), a bare leaf of 2+ axes named like a
    projection (gemma's ``mlp/gating_einsum``, tunix's expert banks ``mlp/gate_proj``:
    the leaf is its own module), or a leaf ``known`` names.
    """
    parts = path_parts(path)
    if not parts:
        return None
    full = "/".join(parts)
    named = parts[-1] in _names.KERNEL_NAMES
    wrapped = len(_names.module_parts(parts)) < len(parts) - 1
    if known is not None and full in known.layouts:
        return "/".join(_names.module_parts(parts) if named or wrapped else parts)
    if _ndim(leaf) < 2:
        return None
    if named:
        return "/".join(parts[:-1])
    return full if _BARE.fullmatch(full) and not parts[-1].endswith(("bias", "scale")) else None


def is_kernel(path: KeyPath, leaf: Any, known: Known | None = None) -> bool:
    """A weight matrix: see :func:`kernel_module`."""
    return kernel_module(path, leaf, known) is not None


def _spec_codes(spec: Any) -> str:
    return str(getattr(spec, "axes", spec))


def kernel_kind(path: KeyPath, leaf: Any, known: Known | None = None) -> str | None:
    """``"embed"``, ``"conv"``, ``"head"`` or ``"linear"`` for a kernel, ``None`` for other leaves.

    By name (an ``embedding`` leaf, an embedding/conv/head module) or by a known
    layout (``e``/``w`` axes) or head.
    """
    module = kernel_module(path, leaf, known)
    if module is None:
        return None
    parts = path_parts(path)
    owner = module.rsplit("/", 1)[-1]
    full = "/".join(parts)
    codes = _spec_codes(known.layouts.get(full, "")) if known is not None else ""
    if parts[-1] == "embedding" or _names.EMBED_MODULES.fullmatch(owner) or "e" in codes:
        return "embed"
    if _names.CONV_MODULES.fullmatch(owner) or "w" in codes:
        return "conv"
    if _names.HEAD_MODULES.fullmatch(owner) or (known is not None and full in known.heads):
        return "head"
    return "linear"


def is_embedding(path: KeyPath, leaf: Any, known: Known | None = None) -> bool:
    """An embedding table by its leaf name (``embedding``), its module's name or a known ``e`` layout."""
    return kernel_kind(path, leaf, known) == "embed"


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
        return self.select(path, leaf, None)

    def select(self, path: KeyPath, leaf: Any, known: Known | None) -> bool:
        """Whether the preset takes this leaf, with ``known`` kernels counted as kernels."""
        module = kernel_module(path, leaf, known)
        return (
            module is not None
            and kernel_kind(path, leaf, known) != "embed"
            and self._regex.fullmatch(module) is not None
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
        self._wheres = wheres
        for w in wheres:
            compile_where(w)  # reject a bad spec when the union is built

    def select(self, path: KeyPath, leaf: Any, known: Known | None) -> bool:
        return any(compile_where(w, known)(path, leaf) for w in self._wheres)

    def __repr__(self) -> str:
        return self.name


class _AllLinear(Preset):
    def select(self, path: KeyPath, leaf: Any, known: Known | None) -> bool:
        # The output head and convolutions are not adapted (PEFT's 'all-linear' skips the head too).
        module = kernel_module(path, leaf, known)
        return bool(module) and kernel_kind(path, leaf, known) == "linear"


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


class _Mlp(Preset):
    def select(self, path: KeyPath, leaf: Any, known: Known | None) -> bool:
        # A mixture of experts' router lives in the MLP block but is no feed-forward projection: all_linear takes it.
        module = kernel_module(path, leaf, known)
        return super().select(path, leaf, known) and not _names.is_router(module or "")


mlp = _Mlp(
    "mlp",
    [_names.MLP],
    "Feed-forward (MLP) projections, expert banks of a mixture of experts included, its router left plain.",
)
all_linear = _AllLinear(
    "all_linear",
    [],
    "Every linear kernel except embeddings, convolutions and the output head (PEFT's 'all-linear'); expert banks "
    "and routers of a mixture of experts included.",
)

PRESETS = {p.name: p for p in (attn_qv, attn_qkv, attn_all, mlp, all_linear)}


def compile_where(where: Any, known: Known | None = None) -> Callable[[KeyPath, Any], bool]:
    """Turn any accepted ``where`` into a predicate ``(path, leaf) -> bool``.

    Accepted: a :class:`Preset`, a callable ``(path, leaf) -> bool``, a regex
    string (full match on the '/'-joined path, leaf name included), or a list
    of module names (a module matches a name it equals or ends with, after a
    '/', as in PEFT's ``target_modules``; only kernel leaves are taken).
    Presets and module lists count the ``known`` kernels as kernels.
    """
    if isinstance(where, str):
        try:
            regex = re.compile(where)
        except re.error as e:
            raise ValueError(f"where={where!r} is not a valid regular expression: {e}") from None
        return lambda path, leaf: regex.fullmatch(path_str(path)) is not None
    if isinstance(where, Preset):
        return lambda path, leaf: where.select(path, leaf, known)
    if callable(where):
        return where
    if isinstance(where, Sequence) and where and all(isinstance(n, str) for n in where):
        names = [n.replace(".", "/") for n in where]

        def listed(path: KeyPath, leaf: Any) -> bool:
            module = kernel_module(path, leaf, known)
            return module is not None and module_matches(module, names)

        return listed
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


def match_pattern(pattern: dict[str, Any] | None, path: KeyPath, default: Any = None) -> Any:
    """The value of the first key of ``pattern`` that names this parameter, or ``default`` where none does.

    A matched value is returned as it is, falsy or not (``{"query": 0}`` gives 0): pass a ``default``
    that no value can be to tell "no key names it" from a matched value.

    PEFT's rule (:func:`pattern_key`) on the module path, with '/' written as '.'
    (so ``"layers_0/q"`` and ``"layers_0.q"`` are the same key); failing that, a key
    that fully matches the '/'-joined parameter path as a regex (leaf name included,
    e.g. ``r".*/query/kernel"``).
    """
    if not pattern:
        return default
    dotted = {key.replace("/", r"\."): key for key in pattern}
    hit = pattern_key(list(dotted), module_path(path).replace("/", "."))
    if hit is not None:
        return pattern[dotted[hit]]
    full = path_str(path)
    for key, value in pattern.items():
        if re.fullmatch(key, full):
            return value
    return default
