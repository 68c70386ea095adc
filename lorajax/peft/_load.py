"""load_peft: a PEFT adapter's factors onto the kernels of a parameter pytree."""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from lorajax import _boxes
from lorajax._dora import magnitude_entries, magnitude_shape
from lorajax._layout import (
    AttentionShapes,
    Layout,
    LayoutArg,
    attention_shapes,
    factor_names,
    layout_spec,
    parse_layout,
)
from lorajax._lora_bias import lora_bias_names
from lorajax._node import LoRA, LoRASpec, fold_scale, is_lora, lora_scale
from lorajax._paths import KeyPath, path_str, rebuild, tree_paths
from lorajax._problems import Problems
from lorajax._sharding import place_factors
from lorajax._targets import is_kernel, pattern_key
from lorajax.peft._convert import guess_layout, peft_shapes, to_ours, unstack
from lorajax.peft._experts import Ref, assign_banks, bank_factors
from lorajax.peft._fused import block_factors
from lorajax.peft._modules_to_save import loaded_leaves, split_saved
from lorajax.peft._names import NameMap, Namer, fused_slot, is_template, module_namer, template_regex
from lorajax.peft._read import read_files
from lorajax.peft._teach import names_any, no_match_message
from lorajax.peft._tokens import loaded_tokens, split_tokens

CALLER = "load_peft"
Modules = dict[str, dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class _Scaling:
    """What the config says of each module's rank and alpha (PEFT's pattern rule) and of rsLoRA."""

    r: int
    alpha: float
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    rslora: bool

    @classmethod
    def of(cls, config: dict[str, Any]) -> _Scaling:
        return cls(
            r=config.get("r", 8),
            alpha=config.get("lora_alpha", 8),
            rank_pattern=dict(config.get("rank_pattern") or {}),
            alpha_pattern=dict(config.get("alpha_pattern") or {}),
            rslora=bool(config.get("use_rslora", False)),
        )

    def rank_of(self, module: str) -> int:
        key = pattern_key(self.rank_pattern, module)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_of(self, module: str) -> float:
        key = pattern_key(self.alpha_pattern, module)
        return float(self.alpha_pattern[key] if key is not None else self.alpha)


class _Factors(NamedTuple):
    """One kernel's factors in our layout, with the spec fields they come with."""

    a: np.ndarray
    b: np.ndarray
    rank: int
    alpha: float
    rslora: bool
    magnitude: np.ndarray | None = None  # DoRA: one entry per output feature, magnitude_shape(layout, shape)
    bias: np.ndarray | None = None  # lora_bias: lora_B's bias, shaped like the kernel's fan-out axes


# --------------------------------------------------------------------------------------------------------------------
# Which kernel each PEFT module goes to.


def _assign(
    leaves: list[tuple[KeyPath, Any]], modules: Modules, namer: Namer, problems: Problems, *, partial: bool = False
) -> tuple[dict[int, str], dict[int, dict[int, str]]]:
    """``(direct, stacked)``: leaf index -> its module, and leaf index -> {layer index: module}.

    A module no parameter maps to is a problem, unless ``partial``.
    """
    owners: dict[str, list[int]] = collections.defaultdict(list)
    templates, fused = [], []
    for n, (kpath, leaf) in enumerate(leaves):
        candidate = is_lora(leaf) or is_kernel(kpath, leaf)
        name = namer(path_str(kpath), candidate)
        if isinstance(name, tuple):  # a fused kernel: one module per slice of its leading axis
            fused.append((n, name))
        elif name is not None and is_template(name):  # a stacked kernel: one module per layer index
            templates.append((n, template_regex(name)))
        elif name is not None and name in modules:
            owners[name].append(n)
    direct: dict[int, str] = {}
    stacked: dict[int, dict[int, str]] = collections.defaultdict(dict)
    for name, entry in modules.items():
        hits = owners.get(name, [])
        if len(hits) > 1:
            paths = ", ".join(path_str(leaves[n][0]) for n in hits)
            problems.add(f"module {name!r}: several parameters map to it ({paths}); pass name_map to pick one")
        elif hits:
            direct[hits[0]] = name
        elif (slot := fused_slot(fused, name)) is not None:
            stacked[slot[0]][slot[1]] = name
        elif found := next(((n, m) for n, rx in templates if (m := rx.fullmatch(name))), None):
            if (twin := stacked[found[0]].get(int(found[1].group(1)))) is not None:
                problems.add(f"modules {twin!r} and {name!r} are both layer {int(found[1].group(1))} of one kernel")
            stacked[found[0]][int(found[1].group(1))] = name
        elif not partial:
            problems.add(f"module {name!r}: no parameter maps to it (A {entry['A'].shape}, B {entry['B'].shape})")
    return direct, stacked


# --------------------------------------------------------------------------------------------------------------------
# One kernel.


def _kernel_layout(
    kpath: KeyPath,
    leaf: Any,
    entry: dict[str, Any],
    is_stacked: bool,
    layout: LayoutArg,
    fan_in_fan_out: bool,
    attention: AttentionShapes | None = None,
) -> Layout:
    """A LoRA node's own layout, else the user's ``layout=`` spec, else a guess from names and PEFT's shapes."""
    if is_lora(leaf):
        return leaf.layout
    array = _boxes.unbox(leaf)
    shape = tuple(array.shape)
    spec = layout_spec(layout, kpath, array, caller=CALLER)
    if spec is not None:
        return parse_layout(spec, kpath, shape, caller=CALLER)
    kind, A, B = entry["kind"], entry["A"], entry["B"]
    if is_stacked:  # a name template means one leading layer axis
        return Layout("s" + guess_layout(kind, kpath, shape[1:], A, B, fan_in_fan_out, CALLER, attention).axes)
    return guess_layout(kind, kpath, shape, A, B, fan_in_fan_out, CALLER, attention)


def _module_factors(
    name: str, modules: Modules, scaling: _Scaling, lay: Layout, shape: tuple[int, ...], where: str
) -> _Factors:
    """Module ``name``'s factors in our layout for one (unstacked) kernel."""
    kind, A, B = modules[name]["kind"], modules[name]["A"], modules[name]["B"]
    if lay.kind != kind:
        raise ValueError(f"{where}: a {lay.kind} kernel (layout {lay.axes!r}) but PEFT module {name!r} is {kind}")
    r = int(A.shape[0])
    want_a, want_b = peft_shapes(kind, lay, shape, r)
    if tuple(A.shape) != want_a or tuple(B.shape) != want_b:
        raise ValueError(
            f"{where}: kernel {shape} (layout {lay.axes!r}) needs PEFT factors A {want_a}, B {want_b}; "
            f"module {name!r} has A {tuple(A.shape)}, B {tuple(B.shape)}"
        )
    if scaling.rank_of(name) != r:
        raise ValueError(f"module {name!r}: config gives rank {scaling.rank_of(name)} but its factors have rank {r}")
    a, b = to_ours(kind, A, B, lay, shape)
    M = modules[name].get("M")
    m = None if M is None else np.reshape(M, magnitude_shape(lay, shape))  # PEFT flattens fan-out like B
    bias = modules[name].get("bias")  # lora_bias: (out,) as PEFT flattens fan-out
    bias = None if bias is None else np.reshape(bias, tuple(shape[k] for k in lay.fan_out))
    return _Factors(a, b, r, scaling.alpha_of(name), scaling.rslora, m, bias)


def _stacked_factors(
    layers: dict[int, str], modules: Modules, scaling: _Scaling, lay: Layout, shape: tuple[int, ...], where: str
) -> _Factors:
    """One stacked node from per-layer PEFT modules.

    Equal ranks and alphas on every layer stack as they are. Otherwise (or with
    layers the adapter leaves out, as with ``layers_to_transform``) each layer's
    own scale is folded into its ``b``, ranks are zero-padded to the largest and
    absent layers get zero factors: exact, with ``alpha = rank`` (scale 1).
    """
    inner, inner_shape, count = unstack(lay, shape, where)
    bad = sorted(i for i in layers if i >= count)
    if bad:
        raise ValueError(
            f"{where}: layers {bad} are out of range for {count} stacked layers ({[layers[i] for i in bad]})"
        )
    got = {
        i: _module_factors(name, modules, scaling, inner, inner_shape, f"{where}[{i}]") for i, name in layers.items()
    }
    dora = {f.magnitude is not None for f in got.values()}
    if dora == {True} and len(got) != count:
        missing = sorted(set(range(count)) - set(got))
        raise ValueError(
            f"{where}: a DoRA adapter for layers {sorted(got)} of {count}; layers {missing} would need the base's "
            "column norms as magnitude: load onto per-layer (unstacked) kernels instead"
        )
    m = np.stack([np.asarray(got[i].magnitude) for i in range(count)]) if dora == {True} else None
    if len(got) == count and len({(f.rank, f.alpha) for f in got.values()}) == 1:
        first = got[0]  # a and b start with the stacked axis (Layout.a_shape)
        a, b = np.stack([got[i].a for i in range(count)]), np.stack([got[i].b for i in range(count)])
        bias = None if first.bias is None else np.stack([np.asarray(got[i].bias) for i in range(count)])
        return _Factors(a, b, first.rank, first.alpha, first.rslora, m, bias)
    r_max = max(f.rank for f in got.values())
    dtype = np.result_type(*[f.a.dtype for f in got.values()])
    a = np.zeros((count, *inner.a_shape(inner_shape, r_max)), dtype)
    b = np.zeros((count, *inner.b_shape(inner_shape, r_max)), dtype)
    has_bias = any(f.bias is not None for f in got.values())
    bias = np.zeros((count, *(inner_shape[k] for k in inner.fan_out)), dtype) if has_bias else None
    for i, f in got.items():
        a[i, ..., : f.rank] = f.a
        b[i, : f.rank] = fold_scale(f.b, lora_scale(f.alpha, f.rank, f.rslora), dtype, xp=np)
        if bias is not None and f.bias is not None:  # lora_bias: its scale folded like b's
            bias[i] = fold_scale(f.bias, lora_scale(f.alpha, f.rank, f.rslora), dtype, xp=np)
    # folding the scale into b leaves DoRA's W + ΔW as it was
    return _Factors(a, b, r_max, float(r_max), False, m, bias)


def _loaded_node(leaf: Any, lay: Layout, f: _Factors) -> LoRA:
    """``leaf`` (a kernel or a LoRA node, which keeps its base and layout) with factors ``f``."""
    box = leaf.base if is_lora(leaf) else leaf
    names_a, names_b = factor_names(box, lay)
    a, b = _boxes.rebox(box, jnp.asarray(f.a), names_a), _boxes.rebox(box, jnp.asarray(f.b), names_b)
    m, variant = None, "lora"
    if f.magnitude is not None:
        names = _boxes.names(box)
        m = _boxes.rebox(box, jnp.asarray(f.magnitude), None if names is None else magnitude_entries(lay, names))
        variant = "dora"
    bias = None if f.bias is None else _boxes.rebox(box, jnp.asarray(f.bias), lora_bias_names(box, lay))
    if is_lora(leaf):
        spec = leaf.spec.replace(rank=f.rank, alpha=f.alpha, rslora=f.rslora, variant=variant, bias=bias is not None)
        return dataclasses.replace(leaf, a=a, b=b, spec=spec, magnitude=m, bias=bias)
    spec = LoRASpec(rank=f.rank, alpha=f.alpha, layout=lay, rslora=f.rslora, variant=variant, bias=bias is not None)
    return LoRA(base=leaf, a=a, b=b, spec=spec, magnitude=m, bias=bias)


def _load_kernel(
    kpath: KeyPath,
    leaf: Any,
    module: str | None,
    layers: dict[int, str],
    modules: Modules,
    scaling: _Scaling,
    layout: LayoutArg,
    fan_in_fan_out: bool,
    attention: AttentionShapes | None = None,
) -> LoRA:
    """The node for one kernel the adapter names: as one ``module`` or as stacked ``layers``."""
    where = path_str(kpath)
    if is_lora(leaf) and leaf.per_example:
        raise ValueError(f"{where}: holds per-example factors (lorajax.select); load onto the plain params")
    entry = modules[module if module is not None else next(iter(layers.values()))]
    lay = _kernel_layout(kpath, leaf, entry, module is None, layout, fan_in_fan_out, attention)
    shape = tuple(_boxes.unbox(leaf.base if is_lora(leaf) else leaf).shape)
    if module is None and not lay.stack and lay.axes[0] == "o":  # a fused kernel whose node shares a: block form
        inner = Layout(lay.axes[1:])
        got = {j: _module_factors(m, modules, scaling, inner, shape[1:], f"{where}[{j}]") for j, m in layers.items()}
        parts = {j: (f.a, f.b, lora_scale(f.alpha, f.rank, f.rslora), f.magnitude) for j, f in got.items()}
        if any(f.bias is not None for f in got.values()):
            raise ValueError(f"{where}: a fused kernel with LoRA biases (lora_bias); load onto unfused kernels")
        blk = block_factors(where, lay, shape, parts)
        return _loaded_node(leaf, lay, _Factors(blk.a, blk.b, blk.rank, float(blk.rank), False, blk.magnitude))
    if module is None:
        return _loaded_node(leaf, lay, _stacked_factors(layers, modules, scaling, lay, shape, where))
    if lay.stack:
        raise ValueError(
            f"{where}: layout {lay.axes!r} is stacked but maps to the single module {module!r}; give name_map "
            "a name with '{}' for the layer index, e.g. 'model.layers.{}.mlp.fc1'"
        )
    return _loaded_node(leaf, lay, _module_factors(module, modules, scaling, lay, shape, where))


def _load_bank(kpath: KeyPath, leaf: Any, ref: Ref, entries: Modules, config: dict, layout: LayoutArg) -> LoRA:
    """The node for one expert bank (or a slice of one) that a PEFT ``target_parameters`` entry adapts."""
    array = _boxes.unbox(leaf.base if is_lora(leaf) else leaf)
    spec = None if is_lora(leaf) else layout_spec(layout, kpath, array, caller=CALLER)
    shape = tuple(array.shape)
    lay = leaf.layout if is_lora(leaf) else None if spec is None else parse_layout(spec, kpath, shape, caller=CALLER)
    f = bank_factors(path_str(kpath), shape, lay, entries[ref.param], ref, config)
    return _loaded_node(leaf, f.layout, _Factors(f.a, f.b, f.rank, f.alpha, f.rslora))


def load_peft(
    path: str | os.PathLike,
    params: Any,
    *,
    name_map: NameMap = None,
    layout: LayoutArg = None,
    partial: bool = False,
    allow_nonfinite: bool = False,
) -> Any:
    """Load a Hugging Face PEFT LoRA adapter into ``params``: lorafied params with PEFT's factors.

    Reads ``adapter_config.json`` and ``adapter_model.safetensors`` with
    safetensors' NumPy API (no PyTorch). Each PEFT module is matched to the
    kernel whose module name (from ``name_map``) equals it; its factors are
    transposed into the kernel's layout, and rank, ``lora_alpha``,
    ``use_rslora``, ``rank_pattern`` and ``alpha_pattern`` (PEFT's rule: a key
    matches a module equal to it or ending with ``"." + key``, as a regex) set
    each node's ``rank``/``alpha``/``rslora``. Kernels the adapter does not name
    are left as they are; existing LoRA nodes it names keep their base and
    layout and get the new factors. Factors keep the file's dtype. A DoRA adapter
    (``use_dora: true``) gives DoRA nodes whose ``magnitude`` is the file's
    ``lora_magnitude_vector`` (Linear, GPT-2 Conv1D, ConvNd, Embedding).

    Args:
        path: the adapter directory (as written by ``PeftModel.save_pretrained``).
        params: the base parameters (Flax linen params, NNX state, Equinox module, dict), or lorafied ones.
        name_map: how parameter paths map to PyTorch module names. ``None``: the
            '/'-joined path minus its leaf name and a leading ``params``, with ``.``
            for ``/`` (``params/fc1/kernel`` -> ``fc1``). A dict ``{path: module}``
            where ``path`` is a parameter path or its module path, with ``/`` or ``.``,
            with or without ``params`` (only listed kernels take part). A callable
            ``path -> module name | None`` over '/'-joined kernel paths. A name with
            ``{}`` maps a stacked kernel (``nn.scan``, layout ``"s..."``) to one module per
            layer index: ``{"params/layers/fc1": "model.layers.{}.mlp.fc1"}``; layers with
            different ranks/alphas are padded and their scales folded into ``b`` (exact),
            layers the adapter skips get zero factors.
        layout: layouts for kernels the names and shapes do not settle, as in
            :func:`lorajax.lorafy` (``{name or regex: "ioo"}`` or a callable).
        partial: load the modules that match a kernel and skip the others. By default a
            module of the file that no parameter maps to is an error (a wrong ``name_map``
            would otherwise drop it without a word).
        allow_nonfinite: load factors that hold NaN or Inf. By default they are refused,
            naming the tensor (integer factors are always refused).

    Returns:
        ``params`` with a :class:`lorajax.LoRA` node at each adapted kernel.

    ``modules_to_save`` (modules PEFT trained whole, such as a classifier head or a norm) load as
    :class:`lorajax.Trainable` leaves, so they keep training: each PyTorch parameter goes to the leaf of
    the module ``name_map`` names (``weight`` to a Flax ``kernel`` transposed from PyTorch's order, to an
    ``embedding`` or a norm's ``scale`` as it is; ``bias`` to ``bias``), in the file's dtype, placed like
    the leaf it replaces.

    PEFT's ``target_parameters`` (transformers 5's fused expert banks ``mlp.experts.gate_up_proj``/``down_proj``, either
    version's layout) load as per-expert factors onto expert kernels named after the parameter or after the
    checkpoint's per-expert modules (``name_map="tunix"``); a fused ``gate_up_proj`` feeds separate gate and up banks.

    Raises:
        ValueError: an unsupported PEFT feature (``lora_bias``...); one
            listing every tensor that is not a float or (unless ``allow_nonfinite``) holds NaN/Inf;
            or one message listing every module without a kernel (unless ``partial``), every shape
            mismatch, every ambiguous name, every module to save without matching leaves, and every
            ``Trainable`` leaf of ``params`` the adapter does not carry. The caller's ``params`` are
            never changed.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax, tempfile
        >>> base = {"params": {"fc1": {"kernel": jnp.ones((4, 3))}}}
        >>> d = tempfile.mkdtemp() + "/adapter"  # stands in for a folder from PeftModel.save_pretrained
        >>> _ = lorajax.save_peft(d, lorajax.lorafy(base, rank=2, where=["fc1"], key=jax.random.key(0)))
        >>> node = lorajax.load_peft(d, base)["params"]["fc1"]["kernel"]
        >>> node.rank, node.layout, node.a.shape, node.b.shape
        (2, Layout('io'), (4, 2), (2, 3))
    """
    config, modules = read_files(path, CALLER, allow_nonfinite=allow_nonfinite)
    saved, modules = split_saved(modules)  # modules_to_save: Trainable leaves (peft/_modules_to_save.py)
    tokens, modules = split_tokens(modules)  # trainable_token_indices: TrainableTokens nodes (peft/_tokens.py)
    scaling, fan_in_fan_out = _Scaling.of(config), bool(config.get("fan_in_fan_out", False))
    namer = module_namer(name_map, CALLER)
    leaves = tree_paths(params, is_leaf=is_lora)
    problems = Problems(CALLER)
    entries, kernels = modules, [(n, path_str(kp), namer(path_str(kp), True)) for n, (kp, x) in enumerate(leaves)
                                 if is_lora(x) or is_kernel(kp, x)]  # fmt: skip
    banks, modules = assign_banks(kernels, modules, partial, problems)  # target_parameters (peft/_experts.py)
    direct, stacked = _assign(leaves, modules, namer, problems, partial=partial)
    if not direct and not stacked and not banks and not names_any(leaves, list(entries), namer):
        raise ValueError(no_match_message(leaves, list(entries), name_map, CALLER))  # and what would match
    attention = attention_shapes(leaves)  # sibling kernels settle a query kernel's layout where sizes do not
    replaced: dict[int, LoRA] = {}
    for n in sorted(set(direct) | set(stacked) | set(banks)):
        kpath, leaf = leaves[n]
        try:
            if n in banks:
                replaced[n] = _load_bank(kpath, leaf, banks[n], entries, config, layout)
                continue
            replaced[n] = _load_kernel(
                kpath, leaf, direct.get(n), stacked.get(n, {}), modules, scaling, layout, fan_in_fan_out, attention
            )
        except ValueError as e:  # the next kernel still loads: the error lists every problem at once
            message, where = str(e).removeprefix(f"{CALLER}: "), path_str(kpath)
            problems.add(message if where in message else f"{where}: {message}")
    trained = loaded_leaves(saved, params, leaves, namer, problems, CALLER)
    trained.update(loaded_tokens(tokens, leaves, namer, problems, partial))
    unmatched = any("no parameter maps to it" in p for p in problems.items)
    problems.raise_if_any(
        f"cannot load {path}",
        "Fix name_map, or pass partial=True to load only the modules that match a kernel." if unmatched else "",
    )
    return place_factors(rebuild(params, leaves, {**replaced, **trained}, is_lora))  # sharded as the bases say
