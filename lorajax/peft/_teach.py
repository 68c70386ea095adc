"""The error of a name map that matches no kernel to any module of an adapter: what to pass instead."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lorajax._node import is_lora
from lorajax._paths import KeyPath, path_str
from lorajax._targets import is_kernel
from lorajax.peft._conventions import CONVENTIONS, ModuleName, convention_namer
from lorajax.peft._experts import bank_ref
from lorajax.peft._names import NameMap, Namer, is_template, module_namer, template_regex

_SHOW = 4


def _matches(names: list[ModuleName], modules: Sequence[str]) -> int:
    """How many of ``modules`` the kernels' ``names`` (plain, templates, tuples) account for."""
    plain: set[str] = set()
    templates = []
    for name in names:
        for one in name if isinstance(name, tuple) else (name,):
            if one is None:
                continue
            if (ref := bank_ref(one, True)) is not None:  # an expert bank: a target_parameters entry
                plain.add(ref.param)
            if is_template(one):
                templates.append(template_regex(one))
            else:
                plain.add(one)
    return sum(1 for m in modules if m in plain or any(rx.fullmatch(m) for rx in templates))


def names_any(leaves: Sequence[tuple[KeyPath, Any]], modules: Sequence[str], namer: Namer) -> bool:
    """Whether ``namer`` names any module of ``modules`` after some kernel of ``leaves`` (even ambiguously)."""
    paths = [path_str(kp) for kp, leaf in leaves if is_lora(leaf) or is_kernel(kp, leaf)]
    return _matches([namer(p, True) for p in paths], modules) > 0


def _describe(name_map: NameMap) -> str:
    if name_map is None:
        return "name_map=None (a kernel's path less its leaf name, '/' as '.')"
    if isinstance(name_map, str):
        return f"name_map={name_map!r}"
    return "the name_map given"


def no_match_message(
    leaves: Sequence[tuple[KeyPath, Any]], modules: Sequence[str], name_map: NameMap, caller: str
) -> str:
    """``caller``'s error when ``name_map`` maps no kernel of ``leaves`` to any of the adapter's ``modules``.

    >>> import numpy as np
    >>> from jax.tree_util import DictKey
    >>> leaves = [((DictKey("layers"), DictKey("0"), DictKey("attn"), DictKey("q_proj"), DictKey("w")),
    ...            np.zeros((4, 2, 2)))]
    >>> print(no_match_message(leaves, ["model.layers.0.self_attn.q_proj"], None, "load_peft"))  # doctest: +ELLIPSIS
    load_peft: name_map=None (...) matches no kernel to any module of the adapter. ...name_map='tunix' matches 1...
    """
    paths = [path_str(kp) for kp, leaf in leaves if is_lora(leaf) or is_kernel(kp, leaf)]
    mods = sorted(modules)
    found = []
    for convention in sorted(CONVENTIONS):
        namer: Callable[[str], ModuleName] = convention_namer(convention, caller)
        hits = _matches([namer(p) for p in paths], mods)
        if hits:
            found.append(f"name_map={convention!r} matches {hits} of the {len(mods)} modules")
    try:
        ours = module_namer(name_map, caller)
        given = [f"{p} -> {ours(p, True)!r}" for p in paths[:_SHOW]]
    except (TypeError, ValueError):
        given = paths[:_SHOW]
    advice = (
        "Built-in conventions that would match: " + "; ".join(found) + "."
        if found
        else f"None of the built-in conventions ({', '.join(map(repr, sorted(CONVENTIONS)))}) matches either."
    )
    return (
        f"{caller}: {_describe(name_map)} matches no kernel to any module of the adapter. "
        f"Kernels ({len(paths)}), as named: {', '.join(given) or 'none'}{', ...' if len(paths) > _SHOW else ''}. "
        f"The adapter's modules ({len(mods)}): {', '.join(mods[:_SHOW])}{', ...' if len(mods) > _SHOW else ''}. "
        f"{advice} Otherwise pass name_map= a dict {{parameter path: module name}} (a tuple of names for a fused "
        "kernel, '{}' for a stacked layer index) or a callable path -> module name."
    )
