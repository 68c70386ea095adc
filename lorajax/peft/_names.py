"""Our parameter paths <-> PyTorch module names, and the file names of a PEFT adapter folder."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TypeAlias

from lorajax._targets import pattern_key
from lorajax.peft._conventions import CONVENTIONS, ModuleName, convention_namer

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: PEFT prefixes every tensor name with the wrapper's path to the base model.
PREFIX = "base_model.model."
#: In a module name, the placeholder for the layer index of a stacked kernel.
LAYER = "{}"

NameMap: TypeAlias = "str | Mapping[str, str | tuple[str, ...]] | Callable[[str], ModuleName] | None"
#: ``(parameter path, is a kernel or LoRA node) -> module name, a tuple of them (a fused kernel), or None``.
Namer: TypeAlias = Callable[[str, bool], ModuleName]


def _valid(name: object) -> bool:
    """A module name, or a tuple of two or more (one per slice of a fused kernel's leading axis)."""
    if isinstance(name, tuple):
        return len(name) > 1 and all(isinstance(n, str) and n for n in name)
    return isinstance(name, str) and bool(name)


def default_module_name(path: str) -> str:
    """PyTorch module name for a '/'-joined parameter path: drop the leaf name and a leading ``params``.

    >>> default_module_name("params/encoder/layers_0/fc1/kernel")
    'encoder.layers_0.fc1'
    """
    parts = path.split("/")[:-1]
    if parts and parts[0] == "params":
        parts = parts[1:]
    return ".".join(parts)


def _norm(key: str) -> str:
    key = key.replace(".", "/").strip("/")
    return key.removeprefix("params/")


def _table_namer(name_map: Mapping[str, str | tuple[str, ...]], caller: str) -> Namer:
    table = {}
    for key, value in name_map.items():
        if not isinstance(key, str) or not _valid(value):
            raise TypeError(
                f"{caller}: name_map must map parameter paths to module names (a tuple of names for a fused "
                f"kernel); got {key!r}: {value!r}."
            )
        table[_norm(key)] = value

    def lookup(path: str, candidate: bool) -> ModuleName:
        full = _norm(path)
        if full in table:  # a parameter path names even a non-kernel
            return table[full]
        return table.get(full.rpartition("/")[0]) if candidate else None

    return lookup


def _callable_namer(name_map: Callable[[str], ModuleName], caller: str) -> Namer:
    def call(path: str, candidate: bool) -> ModuleName:
        if not candidate:  # the callable names kernels only (not their biases)
            return None
        name = name_map(path)
        if name is not None and not _valid(name):
            raise TypeError(
                f"{caller}: name_map({path!r}) returned {name!r}; return a module name string, a tuple of two or "
                "more (a fused kernel, one per slice of its leading axis) or None."
            )
        return name

    return call


def module_namer(name_map: NameMap, caller: str) -> Namer:
    """The ``(path, is_candidate) -> module name or None`` function a ``name_map`` argument stands for.

    >>> namer = module_namer({"params/enc/fc": "encoder.fc"}, "load_peft")
    >>> namer("params/enc/fc/kernel", True), namer("params/enc/fc/bias", False)
    ('encoder.fc', None)
    >>> module_namer("tunix", "save_peft")("layers/0/attn/q_proj/w", True)
    'model.layers.0.self_attn.q_proj'
    """
    if isinstance(name_map, str):
        return _callable_namer(convention_namer(name_map, caller), caller)
    if name_map is None:
        return lambda path, candidate: default_module_name(path) if candidate else None
    if isinstance(name_map, Mapping):
        return _table_namer(name_map, caller)
    if callable(name_map):
        return _callable_namer(name_map, caller)
    raise TypeError(
        f"{caller}: name_map must be None, a dict {{parameter path: module name}}, a callable path -> name or a "
        f"built-in naming convention ({', '.join(map(repr, sorted(CONVENTIONS)))}); got {name_map!r}."
    )


def is_template(name: ModuleName) -> bool:
    """Whether a module name stands for one module per layer of a stacked kernel."""
    return isinstance(name, str) and LAYER in name


def layer_name(template: str, index: int) -> str:
    """The module name of layer ``index`` of a stacked kernel.

    >>> layer_name("model.layers.{}.mlp.fc1", 3)
    'model.layers.3.mlp.fc1'
    """
    return template.replace(LAYER, str(index), 1)


def template_regex(template: str) -> re.Pattern[str]:
    r"""A regex whose one group is the layer index of a module name ``template`` gives.

    >>> template_regex("h.{}.c_attn").fullmatch("h.12.c_attn").group(1)
    '12'
    """
    return re.compile(re.escape(template).replace(re.escape(LAYER), r"(\d+)", 1))


def exact_key(name: str, others: list[str]) -> str:
    """A ``rank_pattern``/``alpha_pattern`` key that PEFT's rule matches to ``name`` and to none of ``others``.

    >>> exact_key("fc", ["out"]), exact_key("fc", ["block.fc"])
    ('fc', '^fc')
    """
    plain = re.escape(name).replace(r"\.", ".") == name  # no regex syntax but '.', which also matches itself
    if plain and all(pattern_key([name], other) is None for other in others):
        return name
    # '^' inside PEFT's "(.*\.)?(key)$" only matches at the start: an exact, anchored name.
    return "^" + re.escape(name)


def fused_slot(fused: list[tuple[int, tuple[str, ...]]], name: str) -> tuple[int, int] | None:
    """``(leaf index, slice)`` of the fused kernel whose tuple name holds module ``name``, or None.

    >>> fused_slot([(4, ("attn.k_proj", "attn.v_proj"))], "attn.v_proj")
    (4, 1)
    """
    return next(((n, names.index(name)) for n, names in fused if name in names), None)
