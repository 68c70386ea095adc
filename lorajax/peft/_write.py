"""save_peft: the LoRA nodes of a parameter pytree as a PEFT adapter folder."""

from __future__ import annotations

import collections
import json
import math
import os
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np

from lorajax import _boxes
from lorajax._files import atomic_folder
from lorajax._layout import Layout
from lorajax._multihost import gathered_trained, write_once
from lorajax._node import LoRA, is_lora
from lorajax._paths import path_str, tree_paths
from lorajax._problems import Problems
from lorajax.inits import is_residual, weight_conversion
from lorajax.peft._convert import to_torch, unstack
from lorajax.peft._experts import bank_tensors, take_banks
from lorajax.peft._fused import fused_slices
from lorajax.peft._layers import model_modules, target_fields
from lorajax.peft._modules_to_save import saved_modules
from lorajax.peft._names import (
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    NameMap,
    Namer,
    exact_key,
    is_template,
    layer_name,
    module_namer,
)
from lorajax.peft._tokens import saved_tokens

CALLER = "save_peft"


class _Factors(NamedTuple):
    """One LoRA node's factors as NumPy arrays, with its parameter path."""

    path: str
    node: LoRA
    a: np.ndarray
    b: np.ndarray
    magnitude: np.ndarray | None = None  # DoRA
    bias: np.ndarray | None = None  # lora_bias


class _Module(NamedTuple):
    """One PEFT module: an unstacked kernel (a layer of a stacked one) and its factors."""

    path: str
    node: LoRA
    layout: Layout
    shape: tuple[int, ...]
    a: np.ndarray
    b: np.ndarray
    magnitude: np.ndarray | None = None  # DoRA
    bias: np.ndarray | None = None  # lora_bias, shaped like the layer's fan-out


def _nonfinite(factors: Iterable[_Factors], problems: Problems) -> None:
    for f in factors:
        found = [
            f"{name} has {count} {what}"
            for name, x in (("a", f.a), ("b", f.b), ("magnitude", f.magnitude), ("bias", f.bias))
            if x is not None
            for what, count in (("NaN", int(np.isnan(x).sum())), ("Inf", int(np.isinf(x).sum())))
            if count
        ]
        if found:
            problems.add(f"{f.path}: {', '.join(found)}")


def _split(f: _Factors, name: str | tuple[str, ...]) -> list[tuple[str, _Module]]:
    """The PEFT modules of one node: itself, one per layer of a stacked kernel (``name`` has ``{}``), or one per
    slice of a fused kernel (``name`` is a tuple)."""
    node = f.node
    if isinstance(name, tuple):
        if f.bias is not None:
            raise ValueError(f"{f.path}: a fused kernel with a LoRA bias (lora_bias); PEFT has one bias per module")
        parts = fused_slices(f.path, node.layout, node.shape, f.a, f.b, f.magnitude, name)
        return [(n, _Module(f.path, node, *part)) for n, part in parts]
    if not node.layout.stack:
        return [(name, _Module(f.path, node, node.layout, node.shape, f.a, f.b, f.magnitude, f.bias))]
    if not is_template(name):
        raise ValueError(
            f"{f.path}: stacked layout {node.layout.axes!r} but one module name {name!r}; PEFT has one module "
            "per layer: give name_map a name with '{}' for the layer index, e.g. 'model.layers.{}.mlp.fc1'; an expert "
            "bank is written as PEFT's target_parameters when named after its transformers 5 parameter, e.g. "
            "'model.layers.0.mlp.experts.down_proj'"
        )
    inner, inner_shape, count = unstack(node.layout, node.shape, f.path)
    m, bias = f.magnitude, f.bias
    return [
        (
            layer_name(name, k),
            _Module(
                f.path,
                node,
                inner,
                inner_shape,
                f.a[k],
                f.b[k],
                None if m is None else m[k],
                None if bias is None else bias[k],
            ),
        )
        for k in range(count)
    ]


def _modules(factors: Iterable[_Factors], namer: Namer, problems: Problems) -> dict[str, _Module]:
    """``{module name: module}`` for every node, or problems (unnamed, per-example, clashing names)."""
    modules: dict[str, _Module] = {}
    for f in factors:
        name = namer(f.path, True)
        if name is None:
            problems.add(f"{f.path}: name_map gives no module name")
            continue
        if f.node.per_example:
            problems.add(f"{f.path}: holds per-example factors (lorajax.select); save the adapters before selecting")
            continue
        try:
            parts = _split(f, name)
        except ValueError as e:
            problems.add(str(e))
            continue
        for module, part in parts:
            if module in modules:
                problems.add(f"{f.path}: module name {module!r} is also used by {modules[module].path}; pass name_map")
            else:
                modules[module] = part
    return modules


def _dora_all_or_none(factors: list[_Factors], problems: Problems) -> None:
    """PEFT's ``use_dora`` holds for a whole adapter: DoRA and plain nodes cannot share a file."""
    dora = [f.path for f in factors if f.node.spec.variant == "dora"]
    if dora and len(dora) != len(factors):
        plain = [f.path for f in factors if f.node.spec.variant != "dora"]
        problems.add(
            f"DoRA nodes ({', '.join(dora)}) and plain LoRA nodes ({', '.join(plain)}) in one adapter: PEFT's "
            "use_dora is one setting per adapter; save them as two adapters (filter the params) or lorafy all with dora"
        )
    for f in factors:
        if f.node.spec.variant == "dora" and f.magnitude is None:
            problems.add(f"{f.path}: a DoRA node without its magnitude (from lorajax.partition?); combine it back")


def _json_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _most_common(values: Iterable[Any]) -> Any:
    common = collections.Counter(values).most_common(1)
    return common[0][0] if common else None  # None: no modules, only target_parameters


def _tensors(modules: dict[str, _Module]) -> dict[str, np.ndarray]:
    tensors = {}
    lora_bias = any(m.bias is not None for m in modules.values())  # PEFT's lora_bias holds for a whole adapter
    for name, m in modules.items():
        A, B = to_torch(m.layout.kind, m.a, m.b, m.layout, m.shape)
        if m.layout.kind == "embed":
            tensors[f"{PREFIX}{name}.lora_embedding_A"], tensors[f"{PREFIX}{name}.lora_embedding_B"] = A, B
        else:
            tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"] = A, B
        if m.magnitude is not None:  # PEFT's shapes: (out,), or (1, out, 1, ...) for a ConvNd
            lead = (1,) if m.layout.kind == "conv" else ()
            shape = lead + (B.shape[0],) + (1,) * (A.ndim - 2 if m.layout.kind == "conv" else 0)
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = np.ascontiguousarray(m.magnitude.reshape(shape))
        if lora_bias:  # (out,); a node without one gets PEFT's zero init
            bias = np.zeros(B.shape[0], B.dtype) if m.bias is None else m.bias.reshape(-1)
            tensors[f"{PREFIX}{name}.lora_B.bias"] = np.ascontiguousarray(bias)
    return tensors


def _config(modules: dict[str, _Module], base_model_name_or_path: str | None, fan_in_fan_out: bool) -> dict[str, Any]:
    """PEFT's config: the most common rank and alpha, patterns for the rest, one rsLoRA rule for all."""
    rslora = _most_common(m.node.rslora for m in modules.values())
    ranks, alphas = {}, {}
    for name, m in modules.items():
        # Same scale under the file's rslora rule: alpha/r == alpha'/sqrt(r) or the reverse.
        alpha = m.node.alpha
        if m.node.rslora != rslora:
            alpha = alpha / math.sqrt(m.node.rank) if rslora else alpha * math.sqrt(m.node.rank)
        ranks[name], alphas[name] = m.node.rank, _json_number(alpha)
    r, lora_alpha = _most_common(ranks.values()), _most_common(alphas.values())
    names = sorted(modules)
    others = {n: [o for o in names if o != n] for n in names}
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": names,
        "rank_pattern": {exact_key(n, others[n]): ranks[n] for n in names if ranks[n] != r},
        "alpha_pattern": {exact_key(n, others[n]): alphas[n] for n in names if alphas[n] != lora_alpha},
        "use_rslora": rslora,
        "fan_in_fan_out": fan_in_fan_out,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": any(m.magnitude is not None for m in modules.values()),
        "lora_bias": any(m.bias is not None for m in modules.values()),
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def to_peft_dict(
    params: Any,
    *,
    name_map: NameMap = None,
    base_model_name_or_path: str | None = None,
    fan_in_fan_out: bool = False,
    allow_nonfinite: bool = False,
    initial: Any = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The PEFT adapter :func:`save_peft` would write, in memory: ``(config, tensors)``.

    ``config`` is the ``adapter_config.json`` object and ``tensors`` maps each
    safetensors name (``base_model.model.<module>.lora_A.weight``...) to a NumPy
    array in PyTorch's layout and the factor's own dtype: bit for bit what
    :func:`save_peft` writes, for pushing an adapter to an inference engine
    (vLLM's ``LoRARequest`` from tensors, SGLang...) without files. Arguments,
    checks and errors are those of :func:`save_peft`.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> p = lorajax.lorafy({"params": {"fc1": {"kernel": jnp.ones((4, 3))}}}, rank=2, where=["fc1"],
        ...                    key=jax.random.key(0))
        >>> config, tensors = lorajax.to_peft_dict(p)
        >>> config["r"], {k: v.shape for k, v in tensors.items()}
        (2, {'base_model.model.fc1.lora_A.weight': (2, 4), 'base_model.model.fc1.lora_B.weight': (3, 2)})
    """
    return _peft_dict(
        params, "to_peft_dict", name_map, base_model_name_or_path, fan_in_fan_out, allow_nonfinite, initial
    )


def _peft_dict(
    params: Any,
    caller: str,
    name_map: NameMap,
    base_model_name_or_path: str | None,
    fan_in_fan_out: bool,
    allow_nonfinite: bool,
    initial: Any,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    namer = module_namer(name_map, caller)
    params = gathered_trained(params)  # whole factors in every process of a multi-process job
    if initial is not None:
        params = weight_conversion(params, initial, caller=caller)
    factors = [
        _Factors(
            path_str(kpath),
            x,
            np.asarray(_boxes.unbox(x.a)),
            np.asarray(_boxes.unbox(x.b)),
            None if x.magnitude is None else np.asarray(_boxes.unbox(x.magnitude)),
            np.asarray(_boxes.unbox(x.bias)) if x.spec.bias else None,
        )
        for kpath, x in tree_paths(params, is_leaf=is_lora)
        if is_lora(x)
    ]
    if not factors:
        raise ValueError(f"{caller}: params hold no LoRA nodes; lorafy or load_peft them first.")
    residual = Problems(caller)
    for f in factors:
        if is_residual(f.node.spec.init):
            residual.add(f"{f.path}: made by init={f.node.spec.init!r}, it works only on its residual base")
    residual.raise_if_any(
        "PiSSA/OLoRA nodes need initial= to be written",
        "Pass initial= (the params lorafy returned, before training): they are written as plain LoRA of rank 2r "
        "for the original base (lorajax.to_plain_lora).",
    )
    problems = Problems(caller)
    _dora_all_or_none(factors, problems)
    banks, plain = take_banks(factors, namer, problems)  # expert banks: PEFT's target_parameters (_experts.py)
    modules = _modules(plain, namer, problems)
    problems.raise_if_any("cannot name every LoRA node as a PEFT module")
    if not allow_nonfinite:
        _nonfinite(factors, nonfinite := Problems(caller))
        nonfinite.raise_if_any(
            "factors hold NaN/Inf",
            "Nothing was written. Find where training diverged, or pass allow_nonfinite=True to write them anyway.",
        )
    saved = saved_modules(params, namer, set(modules), allow_nonfinite, caller)  # also= leaves: modules_to_save
    config = _config(modules, base_model_name_or_path, fan_in_fan_out)
    config["modules_to_save"] = saved.names or None
    token_indices, token_tensors = saved_tokens(params, namer, tokens := Problems(caller))  # peft/_tokens.py
    tokens.raise_if_any("cannot name every table with trainable tokens as a PEFT module")
    config["trainable_token_indices"] = token_indices or None
    config.update(target_fields(sorted(modules), model_modules(params, namer), config["modules_to_save"]))
    config, bank = bank_tensors(banks, config, PREFIX, caller)
    return config, {**_tensors(modules), **bank, **saved.tensors, **token_tensors}


def peft_files(config: dict[str, Any], tensors: dict[str, np.ndarray]) -> dict[str, bytes]:
    """``{file name: bytes}`` of the adapter folder for :func:`to_peft_dict`'s ``(config, tensors)``."""
    from safetensors.numpy import save

    return {  # safetensors' NumPy writer ignores strides: a transposed view would be written untransposed
        WEIGHTS_NAME: save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata={"format": "pt"}),
        CONFIG_NAME: (json.dumps(config, indent=2) + "\n").encode(),
    }


def save_peft(
    path: str | os.PathLike,
    params: Any,
    *,
    name_map: NameMap = None,
    base_model_name_or_path: str | None = None,
    fan_in_fan_out: bool = False,
    allow_nonfinite: bool = False,
    initial: Any = None,
) -> dict[str, Any]:
    """Write the LoRA nodes of ``params`` as a PEFT adapter that ``PeftModel.from_pretrained`` loads.

    Writes ``adapter_config.json`` (``target_modules``, with ``layers_to_transform``/``layers_pattern``
    where the adapter covers some layers only, ``exclude_modules`` where PEFT would catch more; ``r`` and ``lora_alpha``
    set to the most common values, ``rank_pattern``/``alpha_pattern`` for the
    modules that differ, ``use_rslora``, ``fan_in_fan_out``) and
    ``adapter_model.safetensors`` (factors transposed into PyTorch's layout, in
    their own dtype): :func:`to_peft_dict` and one crash-safe write. The folder's
    files are replaced as one unit: a reader sees the old pair or the new one
    whatever the point the save is killed at, other files in the folder (a README)
    stay, and the next save or load removes what a killed save left. A node whose ``rslora`` differs from the
    majority is saved with the ``alpha`` that gives the same scale under the
    majority rule, so outputs are unchanged. DoRA nodes (all of the adapter's, as
    PEFT's ``use_dora`` is one setting) write ``use_dora: true`` and each
    magnitude as ``<module>.lora_magnitude_vector`` in PEFT's shape. Leaves trained beside the factors
    (:class:`lorajax.Trainable`, ``lorafy(..., also=...)``) are written as PEFT writes ``modules_to_save``:
    each module whose leaves all train is listed there and its parameters stored whole as
    ``base_model.model.<module>.<param>`` in PyTorch's names and axis order (``kernel`` -> ``weight``,
    transposed; a norm's ``scale`` -> ``weight``). Expert banks named after a transformers 5 parameter
    (``...mlp.experts.down_proj``) or the checkpoint's per-expert modules (``...experts.{}.gate_proj``, as
    ``name_map="tunix"`` gives) are written as PEFT's ``target_parameters``, gate and up fused into ``gate_up_proj``.

    Args:
        path: output directory (created; files in an existing one are replaced).
        params: lorafied params (only the LoRA nodes are written).
        name_map: parameter path -> PyTorch module name, as in :func:`lorajax.load_peft`; a name with
            ``{}`` writes a stacked kernel as one module per layer index.
        base_model_name_or_path: recorded in the config (PEFT uses it to find the base model).
        fan_in_fan_out: set for GPT-2-style ``Conv1D`` bases (PEFT would otherwise fix it with a warning).
        allow_nonfinite: write factors holding NaN or Inf. By default they are refused: a diverged
            run must not be exported as if it were a model.
        initial: the same adapter at its start (what ``lorafy``, or ``load_peft`` of PEFT's initial
            adapter folder, returned before training, on the same base). Every node, whatever its
            init, is then written as the update since ``initial``: plain LoRA of rank ``2r`` with
            ``a' = [a, a0]``, ``b' = [b; -b0]`` (:func:`lorajax.to_plain_lora`; PEFT's
            ``path_initial_model_for_weight_conversion``), so the config's ``r`` and ``lora_alpha``
            double (alpha times sqrt(2) with rsLoRA). This is how PiSSA/OLoRA adapters (which work
            only on their residual base) are written for the original base; without it PiSSA/OLoRA
            nodes made by ``lorafy`` are refused.

    Returns:
        The config that was written.

    Raises:
        ValueError: no LoRA nodes; one message listing every node without a module name, every
            clash of names and every stacked node without a ``{}`` name; one listing every trained
            leaf PEFT cannot hold as a whole module (a bias whose kernel stays frozen or has LoRA),
            with the closest PEFT form; or (unless ``allow_nonfinite``) one listing every node whose
            factors (or trained leaves) hold NaN/Inf; or one listing every node where ``initial`` is
            not this adapter's start (another path, spec, shape or base). Nothing is written then.
        OSError: the folder cannot be written (the message names ``path``); the folder is unchanged.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax, tempfile
        >>> p = lorajax.lorafy({"params": {"fc1": {"kernel": jnp.ones((4, 3))}}}, rank=2, where=["fc1"],
        ...                    key=jax.random.key(0))
        >>> cfg = lorajax.save_peft(tempfile.mkdtemp() + "/adapter", p)
        >>> cfg["target_modules"], cfg["r"]
        (['fc1'], 2)
    """
    config, tensors = _peft_dict(
        params, CALLER, name_map, base_model_name_or_path, fan_in_fan_out, allow_nonfinite, initial
    )
    write_once(CALLER, os.fspath(path), lambda: atomic_folder(path, peft_files(config, tensors), caller=CALLER))
    return config
