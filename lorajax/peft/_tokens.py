"""PEFT's ``trainable_token_indices``: the trained rows of embedding tables, read and written in PEFT's format.

PEFT wraps each named table in a ``TrainableTokensWrapper`` and writes only the trained rows, as
``base_model.model.<module>.token_adapter.trainable_tokens_delta`` (``(len(indices), dim)``, the rows' new
values: they replace the table's rows, whatever the name says). The indices are in the config:
``trainable_token_indices`` is a list (the model's input embeddings) or ``{module name: [indices]}`` (PEFT's
rule: a key names the module equal to it or ending with ``"." + key``). An LM head tied to the input
embeddings gets no tensor of its own: it reads the same rows. Here each table becomes a
:class:`lorajax.TrainableTokens` node (``lorajax/_tokens.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lorajax import _boxes
from lorajax._node import is_lora
from lorajax._paths import KeyPath, path_str, tree_paths
from lorajax._problems import Problems
from lorajax._tokens import TrainableTokens, check_indices, is_tokens, rows_like
from lorajax._trainable import is_node
from lorajax.peft._names import PREFIX, Namer

__all__ = ["TOKENS", "loaded_tokens", "saved_tokens", "split_tokens", "take_tokens"]

#: ``read_peft``'s entry kind for a table with trainable tokens: ``{"kind": TOKENS, "values": ..., "indices": [...]}``.
TOKENS = "tokens"
SUFFIX = ".token_adapter.trainable_tokens_delta"


def _indices_for(spec: Any, module: str) -> Any:
    if isinstance(spec, list):
        return spec
    if isinstance(spec, dict):
        for key, value in spec.items():
            if module == key or module.endswith("." + str(key)):
                return value
    return None


def take_tokens(config: dict[str, Any], tensors: dict[str, Any], problems: Problems) -> dict[str, dict[str, Any]]:
    """Move the trainable-token tensors out of ``tensors``: ``{module: {"kind": TOKENS, "values", "indices"}}``."""
    spec = config.get("trainable_token_indices")
    out: dict[str, dict[str, Any]] = {}
    for key in [k for k in tensors if k.endswith(SUFFIX)]:
        values = tensors.pop(key)
        module = key[: -len(SUFFIX)].removeprefix(PREFIX)
        indices = _indices_for(spec, module)
        if indices is None:
            problems.add(f"{key}: trainable token rows, but trainable_token_indices={spec!r} names none for {module!r}")
        elif values.ndim != 2 or values.shape[0] != len(indices):
            problems.add(f"{key}: rows of shape {tuple(values.shape)} for the {len(indices)} indices {indices!r}")
        else:
            out[module] = {"kind": TOKENS, "values": values, "indices": list(indices)}
    if spec and not out:
        problems.add(f"trainable_token_indices={spec!r} but the file holds no *{SUFFIX} tensor")
    return out


def split_tokens(modules: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """``(tokens, others)``: the tables with trainable tokens apart from the other modules."""
    tokens = {k: v for k, v in modules.items() if v.get("kind") == TOKENS}
    return tokens, {k: v for k, v in modules.items() if k not in tokens}


def loaded_tokens(
    tokens: dict[str, dict[str, Any]],
    leaves: list[tuple[KeyPath, Any]],
    namer: Namer,
    problems: Problems,
    partial: bool = False,
) -> dict[int, Any]:
    """``{leaf number: TrainableTokens}`` for every table of ``tokens`` (leaves of ``tree_paths(params,
    is_leaf=is_lora)``), the rows in the file's dtype; problems for tables without a leaf (unless ``partial``),
    bad indices and rows of another width."""
    by_module: dict[str, list[int]] = {}
    for n, (kpath, leaf) in enumerate(leaves):
        array = _boxes.unbox(leaf)
        if is_lora(leaf) or not hasattr(array, "shape") or len(array.shape) != 2:
            continue
        name = namer(path_str(kpath), True)
        if isinstance(name, str):
            by_module.setdefault(name, []).append(n)
    out: dict[int, Any] = {}
    for module, entry in sorted(tokens.items()):
        hits = by_module.get(module, [])
        if len(hits) != 1:
            if hits or not partial:
                shown = ", ".join(path_str(leaves[n][0]) for n in hits) or "no 2-D table maps to it"
                problems.add(f"trainable tokens of module {module!r}: {shown}; pass name_map")
            continue
        (n,) = hits
        kpath, leaf = leaves[n]
        table = _boxes.unbox(leaf)
        values = entry["values"]
        why = check_indices(entry["indices"], int(table.shape[0]), path_str(kpath))
        if why is None and values.shape[1] != table.shape[1]:
            why = f"{path_str(kpath)}: table {tuple(table.shape)} but module {module!r} has rows {values.shape}"
        if why:
            problems.add(why)
            continue
        rows = rows_like(leaf, values)  # placed like the table's columns, one global array in a multi-process job
        out[n] = TrainableTokens(leaf, rows, tuple(int(i) for i in entry["indices"]))
    return out


def saved_tokens(params: Any, namer: Namer, problems: Problems) -> tuple[dict[str, list[int]], dict[str, np.ndarray]]:
    """``(trainable_token_indices, tensors)`` for every :class:`lorajax.TrainableTokens` node of ``params``."""
    indices: dict[str, list[int]] = {}
    tensors: dict[str, np.ndarray] = {}
    for kpath, x in tree_paths(params, is_leaf=is_node):
        if not is_tokens(x):
            continue
        module = namer(path_str(kpath), True)
        if not isinstance(module, str):
            problems.add(f"{path_str(kpath)}: trainable tokens, but name_map gives no single module name")
            continue
        indices[module] = list(x.indices)
        tensors[f"{PREFIX}{module}{SUFFIX}"] = np.ascontiguousarray(np.asarray(_boxes.unbox(x.values)))
    return indices, tensors
