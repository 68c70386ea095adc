"""PEFT's ``modules_to_save``: leaves trained beside LoRA (``lorafy(..., also=...)``) as whole PyTorch modules.

PEFT trains a module named in ``modules_to_save`` as a full copy and writes every entry of its
``state_dict()`` as ``base_model.model.<module>.<param>`` (``head.weight``, ``head.bias``), next to the
LoRA factors; ``PeftModel.from_pretrained`` puts them back into a copy of the module. It can say
nothing finer: a module is saved whole or not at all, and a module that has LoRA cannot also be one.
So :func:`saved_modules` writes a module only where every leaf of it is a :class:`lorajax.Trainable`
leaf and refuses the rest, and :func:`loaded_leaves` reads such modules back as ``Trainable`` leaves.

Parameter names and layouts follow PyTorch: a Flax ``kernel`` is ``weight`` in PyTorch's axis
order (Linear ``(out, in)``, ConvNd ``(out, in, *window)``), an ``embedding`` table and a norm's
``scale`` are ``weight`` as they are, and ``bias`` and ``weight`` (Equinox, PyTorch-style trees) keep
their name and axes.
"""

from __future__ import annotations

import collections
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from jax.tree_util import GetAttrKey

from lorajax import _boxes
from lorajax._layout import Layout, infer_layout
from lorajax._node import is_lora
from lorajax._paths import KeyPath, path_parts, path_str, tree_paths
from lorajax._problems import Problems
from lorajax._trainable import Trainable, is_node, is_trainable
from lorajax.adapters._attach import place_like
from lorajax.peft._names import PREFIX, Namer, is_template, layer_name, template_regex

#: ``read_peft``'s entry kind for a module of ``modules_to_save``: ``{"kind": SAVED, "params": {name: array}}``.
SAVED = "saved"
_TORCH_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight"}


class Saved(NamedTuple):
    """What :func:`saved_modules` writes: ``modules_to_save`` (module names) and their tensors."""

    names: list[str]
    tensors: dict[str, np.ndarray]


def _torch_order(layout: Layout) -> list[int] | None:
    """Our axes in PyTorch's weight order (Linear ``(out, in)``, ConvNd ``(out, in, *window)``, Embedding
    ``(num, dim)``), or None where no single PyTorch module has such a weight (multi-axis, stacked kernels)."""
    ax = layout.axes
    if ax.count("o") != 1 or "s" in ax:
        return None
    if ax.count("e") == 1 and len(ax) == 2:
        return [ax.index("e"), ax.index("o")]
    if ax.count("i") != 1:
        return None
    return [ax.index("o"), ax.index("i")] + [k for k, c in enumerate(ax) if c == "w"]


def _torch_param(path: KeyPath, shape: tuple[int, ...], caller: str) -> tuple[str, list[int] | None]:
    """PyTorch's name for one leaf of a module and the axis order that turns ours into PyTorch's.

    Raises ValueError for a weight no PyTorch module holds (a multi-head DenseGeneral kernel).
    """
    leaf = path_parts(path)[-1]
    if leaf not in ("kernel", "embedding", "weight") or len(shape) < 2:
        return _TORCH_NAMES.get(leaf, leaf), None
    try:
        order = _torch_order(infer_layout(path, shape, caller))
    except ValueError as e:
        order, why = None, str(e).removeprefix(f"{caller}: ")
    else:
        why = f"a {len(shape)}-axis kernel {shape}"
    if order is None:
        raise ValueError(
            f"{path_str(path)}: {why}: no PyTorch module (Linear, ConvNd, Embedding) holds such a weight, so PEFT's "
            "modules_to_save cannot carry it; save with lorajax.save_adapter, which does"
        )
    return "weight", order


def _lora_suffix_overlap(names: list[str], lora_modules: set[str]) -> list[str]:
    # PEFT wraps every module whose name ends with a modules_to_save entry (str.endswith, no dot needed).
    return [
        f"modules_to_save entry {n!r} also matches the LoRA module {m!r} (PEFT wraps every module whose name ends "
        "with an entry); rename the module with name_map"
        for n in names
        for m in sorted(lora_modules)
        if m != n and m.endswith(n)
    ]


def saved_modules(params: Any, namer: Namer, lora_modules: set[str], allow_nonfinite: bool, caller: str) -> Saved:
    """``modules_to_save`` and their tensors for every :class:`lorajax.Trainable` leaf of ``params``.

    Raises:
        ValueError: listing every trained leaf PEFT cannot express (a module whose other leaves stay
            frozen or hold LoRA, a weight no PyTorch module holds, no module name) with the closest
            PEFT form, and (unless ``allow_nonfinite``) every trained leaf holding NaN/Inf.
    """
    by_module: dict[str, list[tuple[KeyPath, Any]]] = collections.defaultdict(list)
    for kpath, leaf in tree_paths(params, is_leaf=is_node):
        by_module["/".join(path_parts(kpath)[:-1])].append((kpath, leaf))
    problems, names = Problems(caller), []
    tensors: dict[str, np.ndarray] = {}
    for module, members in sorted(by_module.items()):
        trained = [(p, x) for p, x in members if is_trainable(x)]
        if not trained:
            continue
        shown = ", ".join(path_str(p) for p, _ in trained)
        lora = [path_str(p) for p, x in members if is_lora(x)]
        frozen = [path_str(p) for p, x in members if not is_node(x) and hasattr(_boxes.unbox(x), "shape")]
        if lora:
            problems.add(
                f"{shown}: trained beside the LoRA node {', '.join(lora)} of the same module: a PEFT module is either "
                "a LoRA target or in modules_to_save, not both. The closest PEFT form, bias='lora_only' (the biases "
                "of every LoRA module, one switch for the whole model), lorajax neither writes nor reads: drop it "
                "from also=, or save with lorajax.save_adapter, which carries it"
            )
            continue
        if frozen:
            todo = f"lorafy(..., also=[{module.rpartition('/')[2]!r}])" if module else "lorafy(..., also=...)"
            bias = " (PEFT's bias='all' trains every bias of the model instead)" if "bias" in shown else ""
            problems.add(
                f"{shown}: trained while {', '.join(frozen)} of the same module stay frozen: PEFT saves whole "
                f"modules only (modules_to_save){bias}. The closest PEFT form trains the whole module: declare all "
                f"its leaves trainable ({todo}), or save with lorajax.save_adapter, which carries single leaves"
            )
            continue
        name = namer(path_str(trained[0][0]), True)
        if name is None:
            problems.add(f"{shown}: name_map gives no module name for {module or 'the root module'}")
            continue
        if isinstance(name, tuple):  # a fused kernel's slices are LoRA modules; a module saved whole has one name
            problems.add(f"{shown}: name_map gives several module names {name}; a module saved whole needs one")
            continue
        try:
            written = _module_tensors(name, trained, caller)
        except ValueError as e:
            problems.add(str(e))
            continue
        clash = sorted(set(written) & set(tensors))
        if clash:
            problems.add(f"{shown}: PEFT tensor {clash[0]} is also written for another module; pass name_map")
        tensors.update(written)
        names += sorted({key.removeprefix(PREFIX).rpartition(".")[0] for key in written})
    problems.extend(_lora_suffix_overlap(names, lora_modules))
    problems.raise_if_any(
        "cannot write every trained (also=) leaf as a PEFT module to save",
        "Nothing was written: a PEFT adapter without them would run the untrained leaves.",
    )
    if not allow_nonfinite:
        bad = Problems(caller)
        for key, x in sorted(tensors.items()):
            if np.issubdtype(x.dtype, np.inexact) and (count := int(x.size - np.count_nonzero(np.isfinite(x)))):
                bad.add(f"{key.removeprefix(PREFIX)}: {count} NaN/Inf of {x.size} entries")
        bad.raise_if_any(
            "trained (also=) leaves hold NaN/Inf",
            "Nothing was written; pass allow_nonfinite=True to write them anyway.",
        )
    return Saved(names, tensors)


def _module_tensors(name: str, trained: list[tuple[KeyPath, Any]], caller: str) -> dict[str, np.ndarray]:
    """PEFT's tensors of one module (one per layer of a stacked one, ``name`` with ``{}``)."""
    out = {}
    for kpath, leaf in trained:
        x = np.asarray(_boxes.unbox(leaf.value))
        layers = [(name, x)] if not is_template(name) else [(layer_name(name, k), x[k]) for k in range(x.shape[0])]
        for module, value in layers:
            param, order = _torch_param(kpath, tuple(value.shape), caller)
            out[f"{PREFIX}{module}.{param}"] = np.ascontiguousarray(value if order is None else value.transpose(order))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Reading them back.


def take_saved(config: dict[str, Any], tensors: dict[str, Any], problems: Problems) -> dict[str, dict[str, Any]]:
    """Move the tensors of ``config["modules_to_save"]`` out of ``tensors``: ``{module: {"kind": SAVED, "params":
    {param: array}}}``, keyed by the module that holds each parameter (PEFT's rule: a module is saved when its
    name ends with an entry)."""
    keys = config.get("modules_to_save") or []
    if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
        problems.add(f"modules_to_save={keys!r}: expected a list of module names")
        return {}
    out: dict[str, dict[str, Any]] = {}
    for key in list(tensors):
        name = key.removeprefix(PREFIX)
        parts = name.split(".")
        if "lora_" in key or "modules_to_save" in parts:  # LoRA factors, or wrapper keys the caller reports
            continue
        if any(".".join(parts[:i]).endswith(k) for i in range(1, len(parts)) for k in keys):
            module, _, param = name.rpartition(".")
            out.setdefault(module, {"kind": SAVED, "params": {}})["params"][param] = tensors.pop(key)
    return out


def split_saved(modules: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """``(saved, lora)``: the modules of ``modules_to_save`` apart from the LoRA modules."""
    saved = {k: v for k, v in modules.items() if v.get("kind") == SAVED}
    return saved, {k: v for k, v in modules.items() if k not in saved}


def _as_ours(kpath: KeyPath, shape: tuple[int, ...], tensor: np.ndarray, caller: str) -> np.ndarray | str:
    """PyTorch's ``tensor`` for our leaf of ``shape`` in our axis order, or a problem line."""
    _, order = _torch_param(kpath, shape, caller)
    want = tuple(shape[k] for k in order) if order is not None else shape
    if tuple(tensor.shape) != want:
        return f"the base leaf {path_str(kpath)} has shape {shape}, which needs {want} in PyTorch's order"
    return tensor if order is None else np.transpose(tensor, np.argsort(order))


def loaded_leaves(
    saved: dict[str, dict[str, Any]],
    params: Any,
    leaves: list[tuple[KeyPath, Any]],
    namer: Namer,
    problems: Problems,
    caller: str,
) -> dict[int, Any]:
    """``{leaf number: replacement}`` putting every saved module's tensors into ``leaves`` (of
    ``tree_paths(params, is_leaf=is_lora)``) as :class:`lorajax.Trainable` leaves, boxed and placed like the
    base leaf; problems for tensors without a leaf, shapes that differ, and ``Trainable`` leaves of ``params``
    (declared trainable, so expected) that the file does not carry."""
    by_module: dict[str, list[int]] = collections.defaultdict(list)
    templates = []
    for n, (kpath, leaf) in enumerate(leaves):
        name = None if is_lora(leaf) else namer(path_str(kpath), True)
        if isinstance(name, tuple):  # fused LoRA kernels only; a saved module has one name
            name = None
        if name is not None and is_template(name):
            templates.append((n, template_regex(name)))
        elif name is not None:
            by_module[name].append(n)
    values: dict[int, np.ndarray] = {}
    for module, entry in sorted(saved.items()):
        owners, layer = by_module.get(module, []), None
        if not owners:
            hits = [(n, int(m.group(1))) for n, rx in templates if (m := rx.fullmatch(module))]
            owners, layer = [n for n, _ in hits], (hits[0][1] if hits else None)
        mine: dict[str, int] = {}
        for n in owners:
            leaf_name = path_parts(leaves[n][0])[-1]
            mine[_TORCH_NAMES.get(leaf_name, leaf_name)] = n
        for param, tensor in sorted(entry["params"].items()):
            if param not in mine:
                problems.add(f"module to save {module!r}: no parameter maps to its {param} {tuple(tensor.shape)}")
                continue
            n = mine.pop(param)
            kpath, leaf = leaves[n]
            base = _boxes.unbox(leaf)
            shape = tuple(int(d) for d in (base.shape if layer is None else base.shape[1:]))
            try:
                got = _as_ours(kpath, shape, tensor, caller)
            except ValueError as e:  # a weight no PyTorch module holds
                got = str(e)
            if isinstance(got, str):
                problems.add(f"module to save {module!r}: {param} has shape {tuple(tensor.shape)}; {got}")
            elif layer is None:
                values[n] = got
            else:  # one layer of a stacked leaf: the other layers keep their values until theirs come
                if n not in values:
                    values[n] = np.array(base, dtype=np.result_type(base.dtype, got.dtype))
                values[n][layer] = got
        problems.extend(
            [f"module to save {module!r}: the file has no tensor for {path_str(leaves[n][0])}" for n in mine.values()]
        )
    # Leaves already inside a Trainable node (params lorafied with also=) get the value alone.
    inside = {tuple(kp) + (GetAttrKey("value"),) for kp, x in tree_paths(params, is_leaf=is_node) if is_trainable(x)}
    out = {}
    for n, (kpath, leaf) in enumerate(leaves):
        if n in values:
            value = _boxes.rebox(leaf, place_like(leaf, jnp.asarray(values[n])))
            out[n] = value if tuple(kpath) in inside else Trainable(value)
        elif tuple(kpath) in inside:
            problems.add(
                f"trainable: {path_str(kpath)}: the params declare it trainable (a Trainable node, lorafy(..., "
                "also=...)) but the adapter's modules_to_save does not carry it; load onto lorajax.unlorafy(params)"
            )
    return out
