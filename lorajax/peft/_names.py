"""Our parameter paths <-> PyTorch module names, and the file names of a PEFT adapter folder."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TypeAlias

from lorajax._targets import pattern_key

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: PEFT prefixes every tensor name with the wrapper's path to the base model.
PREFIX = "base_model.model."
#: In a module name, the placeholder for the layer index of a stacked kernel.
LAYER = "{}"

NameMap: TypeAlias = "Mapping[str, str] | Callable[[str], str | None] | None"
#: ``(parameter path, is a kernel or LoRA node) -> module name or None``.
Namer: TypeAlias = Callable[[str, bool], "str | None"]


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


def _table_namer(name_map: Mapping[str, str], caller: str) -> Namer:
    table = {}
    for key, value in name_map.items():
        if not isinstance(key, str) or not isinstance(value, str) or not value:
            raise TypeError(f"{caller}: name_map must map parameter paths to module names; got {key!r}: {value!r}.")
        table[_norm(key)] = value

    def lookup(path: str, candidate: bool) -> str | None:
        full = _norm(path)
        if full in table:  # a parameter path names even a non-kernel
            return table[full]
        return table.get(full.rpartition("/")[0]) if candidate else None

    return lookup


def _callable_namer(name_map: Callable[[str], str | None], caller: str) -> Namer:
    def call(path: str, candidate: bool) -> str | None:
        if not candidate:  # the callable names kernels only (not their biases)
            return None
        name = name_map(path)
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"{caller}: name_map({path!r}) returned {name!r}; return a module name string or None.")
        return name

    return call


def module_namer(name_map: NameMap, caller: str) -> Namer:
    """The ``(path, is_candidate) -> module name or None`` function a ``name_map`` argument stands for.

    >>> namer = module_namer({"params/enc/fc": "encoder.fc"}, "load_peft")
    >>> namer("params/enc/fc/kernel", True), namer("params/enc/fc/bias", False)
    ('encoder.fc', None)
    """
    if name_map is None:
        return lambda path, candidate: default_module_name(path) if candidate else None
    if isinstance(name_map, Mapping):
        return _table_namer(name_map, caller)
    if callable(name_map):
        return _callable_namer(name_map, caller)
    raise TypeError(
        f"{caller}: name_map must be None, a dict {{parameter path: module name}} or a callable path -> name; "
        f"got {name_map!r}."
    )


def is_template(name: str) -> bool:
    """Whether a module name stands for one module per layer of a stacked kernel."""
    return LAYER in name


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
