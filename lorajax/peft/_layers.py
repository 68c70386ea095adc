"""PEFT's target selection fields: ``target_modules`` (list or regex), ``layers_to_transform``/``layers_pattern``
and ``exclude_modules``; checked against an adapter's tensors on load, written truthfully on save."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import numpy as np

from lorajax import _boxes
from lorajax._node import is_lora
from lorajax._paths import path_str, tree_paths
from lorajax._problems import Problems
from lorajax._targets import is_kernel
from lorajax.peft._names import Namer, is_template, layer_name

#: PEFT's shorthand for every linear layer; the saved config lists them, a hand-written one may not.
ALL_LINEAR = "all-linear"
#: A module name's first numbered segment and the segment before it: ``(prefix.)(pattern).(index).(rest)``.
_LAYERED = re.compile(r"^(?:(.*?)\.)?([^.]+)\.(\d+)\.(.+)$")


def _as_list(value: Any) -> list[Any]:
    return [value] if isinstance(value, (str, int)) else list(value)


def _layer_index(config: dict[str, Any], module: str) -> int | None:
    """The layer index PEFT reads from ``module`` (``_get_layer_index`` in ``check_target_module_exists``)."""
    patterns = config.get("layers_pattern")
    if not patterns:  # PEFT: any segment followed by a number, the first one (lazy), after at least one dot
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        match = next(
            (m for p in _as_list(patterns) if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module))), None
        )
    return None if match is None else int(match.group("idx"))


def why_untargeted(config: dict[str, Any], module: str) -> str | None:
    """Why PEFT, given ``config``, would not adapt ``module`` (its ``check_target_module_exists``); None if it would.

    An absent ``target_modules`` (or ``"all-linear"``) is taken to select the module by suffix.

    >>> cfg = {"target_modules": ["q"], "layers_to_transform": [0, 2], "layers_pattern": "layers"}
    >>> why_untargeted(cfg, "layers.2.q") is None, why_untargeted(cfg, "layers.1.q")
    (True, "its layer index 1 is not in layers_to_transform=[0, 2] (layers_pattern='layers')")
    """
    exclude = config.get("exclude_modules")
    if exclude and (
        re.fullmatch(exclude, module)
        if isinstance(exclude, str)
        else any(module == e or module.endswith("." + e) for e in exclude)
    ):
        return f"exclude_modules={exclude!r} excludes it"
    if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in config.get("modules_to_save") or ()):
        return f"modules_to_save={config['modules_to_save']!r} holds it (PEFT saves such a module whole)"
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets.lower() != ALL_LINEAR:
        return None if re.fullmatch(targets, module) else f"target_modules={targets!r} does not full-match it"
    if isinstance(targets, (list, tuple)) and module in targets:
        return None
    if isinstance(targets, (list, tuple)) and not any(module.endswith("." + t) for t in targets):
        return f"target_modules={sorted(targets)!r} does not name it or a '.'-suffix of it"
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return None
    index = _layer_index(config, module)
    pattern = f" (layers_pattern={config.get('layers_pattern')!r})"
    if index is None:
        return f"layers_to_transform={layers!r} is set but it has no layer index{pattern}"
    if index not in _as_list(layers):
        return f"its layer index {index} is not in layers_to_transform={layers!r}{pattern}"
    return None


def _field_problems(config: dict[str, Any]) -> list[str]:
    """Values of the four fields PEFT's ``LoraConfig`` would refuse."""
    out = []
    targets, layers, patterns = (config.get(k) for k in ("target_modules", "layers_to_transform", "layers_pattern"))
    for key in ("target_modules", "exclude_modules", "layers_pattern"):
        value = config.get(key)
        if value is not None and not (
            isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        ):
            out.append(f"{key}={value!r}: expected a string (a regex) or a list of module names")
    for key in ("target_modules", "exclude_modules"):
        if isinstance(value := config.get(key), str):
            try:
                re.compile(value)
            except re.error as e:
                out.append(f"{key}={value!r} is not a valid regex: {e}")
    if layers is not None and not (
        (isinstance(layers, int) and not isinstance(layers, bool))
        or (isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers))
    ):
        out.append(f"layers_to_transform={layers!r}: expected a layer index or a list of them")
    if isinstance(targets, str) and (layers is not None or patterns is not None):
        out.append("layers_to_transform/layers_pattern cannot be used when target_modules is a regex string (PEFT)")
    if patterns and layers is None:
        out.append(f"layers_pattern={patterns!r} is set without layers_to_transform (PEFT refuses this config)")
    return out


def check_targets(config: dict[str, Any], modules: Iterable[str], problems: Problems) -> None:
    """Add a problem for each module of the tensors the config's target fields would not let PEFT adapt."""
    bad = _field_problems(config)
    problems.extend([f"adapter_config.json: {p}" for p in bad])
    if bad:
        return
    for module in sorted(modules):
        if (why := why_untargeted(config, module)) is not None:
            problems.add(f"{module}: the tensors adapt it but {why}; fix the config or drop its tensors")


# --------------------------------------------------------------------------------------------------------------------
# Saving: which config fields make PEFT, on the whole model, adapt exactly the adapter's modules.


def model_modules(params: Any, namer: Namer) -> set[str]:
    """The module names of every kernel of ``params`` (adapted or not) that ``namer`` names, one per layer or slice."""
    out: set[str] = set()
    for kpath, leaf in tree_paths(params, is_leaf=is_lora):
        if not (is_lora(leaf) or is_kernel(kpath, leaf)):
            continue
        try:
            name = namer(path_str(kpath), True)
        except (LookupError, TypeError, ValueError):
            if is_lora(leaf):
                raise
            continue  # a name_map callable written for the adapted kernels only: what it cannot name stays out
        if isinstance(name, tuple):
            out.update(name)
        elif is_template(name):
            shape = np.shape(_boxes.unbox(leaf.base if is_lora(leaf) else leaf))
            out.update(layer_name(str(name), i) for i in range(shape[0] if shape else 0))
        elif name is not None:
            out.add(name)
    return out


def _adapted(config: dict[str, Any], model: set[str]) -> set[str]:
    return {m for m in model if why_untargeted(config, m) is None}


def _exclusions(config: dict[str, Any], wanted: set[str], model: set[str]) -> dict[str, Any] | None:
    """``config`` with the ``exclude_modules`` (a list, else an exact regex) that leave PEFT ``wanted`` exactly."""
    extra = _adapted(config, model) - wanted
    if not wanted <= _adapted(config, model):
        return None
    if not extra:
        return config
    for exclude in (sorted(extra), "|".join(re.escape(m) for m in sorted(extra))):
        if _adapted(new := {**config, "exclude_modules": exclude}, model) == wanted:
            return new
    return None


def _layered(names: list[str], model: set[str]) -> dict[str, Any] | None:
    """``target_modules`` of short names with ``layers_to_transform``/``layers_pattern``, when ``names`` are some
    layers (by index) of the model's layer stacks; None where they are not."""
    parts = [_LAYERED.match(n) for n in names]
    if not all(parts):
        return None
    patterns = sorted({p.group(2) for p in parts if p})
    layers = sorted({int(p.group(3)) for p in parts if p})
    every = {int(m.group(3)) for n in model if (m := _LAYERED.match(n)) and m.group(2) in patterns}
    if set(layers) == every:  # every layer adapted: the plain list of names says it as well
        return None
    return {
        "target_modules": sorted({p.group(4) for p in parts if p}),
        "layers_to_transform": layers,
        "layers_pattern": patterns[0] if len(patterns) == 1 else patterns,
    }


def target_fields(names: list[str], model: set[str], modules_to_save: list[str] | None) -> dict[str, Any]:
    """The config's ``target_modules``, ``layers_to_transform``, ``layers_pattern`` and ``exclude_modules`` for an
    adapter of module ``names`` on a model whose module names (as far as the params tell) are ``model``.

    Where the adapter covers some layers of the model's layer stacks only, short names and the layer indices;
    otherwise the full names. ``exclude_modules`` lists what those would also catch (PEFT matches a name by suffix).

    >>> model = {f"layers.{i}.{m}" for i in range(3) for m in "qvo"}
    >>> target_fields(["layers.0.q", "layers.0.v", "layers.2.q", "layers.2.v"], model, None)
    {'target_modules': ['q', 'v'], 'layers_to_transform': [0, 2], 'layers_pattern': 'layers', 'exclude_modules': None}
    >>> target_fields(["fc"], {"fc", "enc.fc"}, None)["exclude_modules"]
    ['enc.fc']
    """
    model = model | set(names)
    base = {"modules_to_save": modules_to_save, "exclude_modules": None, "layers_to_transform": None}
    plain = {"target_modules": list(names), "layers_to_transform": None, "layers_pattern": None}
    layered = _layered(names, model)
    if layered is not None and _adapted({**base, **layered}, model) == set(names):
        return {**layered, "exclude_modules": None}
    fixed = _exclusions({**base, **plain}, set(names), model)
    exclude = None if fixed is None else fixed["exclude_modules"]
    return {**plain, "exclude_modules": exclude}
