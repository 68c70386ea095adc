"""Read and write Hugging Face PEFT LoRA adapters (no PyTorch needed).

A PEFT LoRA adapter is a directory with ``adapter_config.json`` and
``adapter_model.safetensors``. Its tensors are named after the PyTorch module
they adapt, relative to the base model:

- Linear and GPT-2 ``Conv1D``: ``base_model.model.<module>.lora_A.weight`` ``(r, in)`` and
  ``.lora_B.weight`` ``(out, r)``.
- ``ConvNd``: ``lora_A.weight`` ``(r, in, *window)`` (a conv with the base's kernel size, stride and
  padding) and ``lora_B.weight`` ``(out, r, 1, ...)`` (a 1x1 conv).
- ``Embedding``: ``lora_embedding_A`` ``(r, num)`` and ``lora_embedding_B`` ``(dim, r)``, no ``.weight``.

The update is ``scaling * B @ A`` (for convs: over the flattened window) with
``scaling = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), which is exactly
lorajax's ``scale * a @ b`` once ``a`` and ``b`` are transposed into the
kernel's layout. GPT-2's ``Conv1D`` (``fan_in_fan_out``) stores the same
``(r, in)``/``(out, r)`` factors; only its base weight is transposed.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorajax import _boxes, _layout, _targets
from lorajax._files import publish
from lorajax._layout import Layout
from lorajax._node import LoRA, LoRASpec, is_lora, lora_scale

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_SUFFIXES = {
    ".lora_A.weight": ("A", "dense"),
    ".lora_B.weight": ("B", "dense"),
    ".lora_embedding_A": ("A", "embed"),
    ".lora_embedding_B": ("B", "embed"),
}
# Tensor-name fragments of PEFT features lorajax does not implement, for a precise error.
_UNSUPPORTED_KEYS = (
    ("lora_magnitude_vector", "DoRA (use_dora=True) magnitude vectors"),
    ("modules_to_save", "modules_to_save (fully trained copies of modules)"),
    ("trainable_tokens", "trainable_token_indices"),
    ("lora_B.bias", "lora_bias=True (a bias on lora_B)"),
)

NameMap = Mapping[str, str] | Callable[[str], "str | None"] | None


# --------------------------------------------------------------------------------------------------------------------
# Names: our parameter paths <-> PyTorch module names.


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
    return key[len("params/") :] if key.startswith("params/") else key


def _resolver(name_map: NameMap, what: str) -> Callable[[str, bool], str | None]:
    """``(path, is_candidate) -> module name or None`` for a ``name_map`` argument."""
    if name_map is None:
        return lambda path, candidate: default_module_name(path) if candidate else None
    if isinstance(name_map, Mapping):
        table = {}
        for key, value in name_map.items():
            if not isinstance(key, str) or not isinstance(value, str) or not value:
                raise TypeError(f"{what}: name_map must map parameter paths to module names; got {key!r}: {value!r}.")
            table[_norm(key)] = value

        def lookup(path: str, candidate: bool) -> str | None:
            full = _norm(path)
            if full in table:
                return table[full]
            module = full.rsplit("/", 1)[0] if "/" in full else ""
            return table.get(module) if candidate else None

        return lookup
    if callable(name_map):

        def call(path: str, candidate: bool) -> str | None:
            if not candidate:  # the callable names kernels only (not their biases)
                return None
            name = name_map(path)
            if name is not None and (not isinstance(name, str) or not name):
                raise TypeError(f"{what}: name_map({path!r}) returned {name!r}; return a module name string or None.")
            return name

        return call
    raise TypeError(
        f"{what}: name_map must be None, a dict {{parameter path: module name}} or a callable path -> name; "
        f"got {name_map!r}."
    )


def _pattern_key(pattern: Mapping[str, Any], module: str) -> str | None:
    """PEFT's rank_pattern/alpha_pattern rule: the first key that equals the name or ends it after a '.' (regex)."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


# --------------------------------------------------------------------------------------------------------------------
# Layout conversion of one module's factors.


def _conv_perm(layout: Layout) -> list[int]:
    """Positions in PEFT's ``(in, *window)`` order of our fan-in axes (kernel order)."""
    perm, w = [], 0
    for k in layout.fan_in:
        if layout.axes[k] == "i":
            perm.append(0)
        else:
            w += 1
            perm.append(w)
    return perm


def _torch_to_ours(kind: str, A: np.ndarray, B: np.ndarray, layout: Layout, shape: tuple[int, ...]) -> tuple[Any, Any]:
    r = A.shape[0]
    a_shape, b_shape = layout.a_shape(shape, r), layout.b_shape(shape, r)
    if kind == "conv":
        a = np.transpose(A, [1 + p for p in _conv_perm(layout)] + [0])
    else:
        a = A.T
    b = B.reshape(B.shape[0], r).T
    return a.reshape(a_shape), b.reshape(b_shape)


def _ours_to_torch(kind: str, a: np.ndarray, b: np.ndarray, layout: Layout, shape: tuple[int, ...]) -> tuple[Any, Any]:
    r = a.shape[-1]
    fan_in, fan_out = layout.sizes(shape)
    B = b.reshape(r, fan_out).T
    if kind == "conv":
        perm = _conv_perm(layout)
        # PEFT's order (in, *window): axis j of A (after r) is our fan-in axis perm.index(j).
        A = np.transpose(a, [len(perm)] + [perm.index(j) for j in range(len(perm))])
        B = B.reshape(B.shape + (1,) * (A.ndim - 2))
    else:
        A = a.reshape(fan_in, r).T
    return np.ascontiguousarray(A), np.ascontiguousarray(B)


def _guess_layout(
    kind: str, path: _targets.KeyPath, shape: tuple[int, ...], A: Any, B: Any, fan_in_fan_out: bool
) -> Layout:
    """The layout of a base kernel that a PEFT module of ``kind`` with factors ``A``, ``B`` adapts."""
    leaf = _targets.path_parts(path)[-1]
    torch_style = leaf == "weight"
    n = len(shape)
    if kind == "embed":
        return Layout("eo")
    if kind == "conv":
        w = "w" * (n - 2)
        return Layout("oi" + w) if torch_style else Layout(w + "io")
    if n == 2:
        if not torch_style:
            return Layout("io")
        # A PyTorch-style weight: Linear (out, in) or GPT-2 Conv1D (in, out). The shape decides; a square one
        # follows fan_in_fan_out (PEFT sets it for the whole config once any Conv1D is targeted).
        n_in, n_out = A.shape[1], B.shape[0]
        if shape == (n_out, n_in) and shape != (n_in, n_out):
            return Layout("oi")
        if shape == (n_in, n_out) and shape != (n_out, n_in):
            return Layout("io")
        return Layout("io") if fan_in_fan_out else Layout("oi")
    # Multi-axis kernels (DenseGeneral): the split of the axes that PEFT's (in, out) sizes allow.
    n_in, n_out = A.shape[1], B.shape[0]
    for k in range(1, n):
        left, right = math.prod(shape[:k]), math.prod(shape[k:])
        if torch_style and (left, right) == (n_out, n_in):
            return Layout("o" * k + "i" * (n - k))
        if not torch_style and (left, right) == (n_in, n_out):
            return Layout("i" * k + "o" * (n - k))
    return _layout.infer_layout(path, shape, "load_peft")


# --------------------------------------------------------------------------------------------------------------------
# Reading.


def _check_config(config: Any, where: str) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise ValueError(f"load_peft: {where} does not hold a JSON object.")
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise ValueError(f"load_peft: {where} is a {peft_type} adapter; lorajax reads LoRA adapters only.")
    unsupported = []
    if config.get("use_dora"):
        unsupported.append("use_dora=True (DoRA magnitude vectors)")
    if config.get("modules_to_save"):
        unsupported.append(f"modules_to_save={config['modules_to_save']!r} (fully trained module copies)")
    if config.get("lora_bias"):
        unsupported.append("lora_bias=True (a trained bias on lora_B)")
    if config.get("target_parameters"):
        unsupported.append(f"target_parameters={config['target_parameters']!r} (LoRA on raw nn.Parameters)")
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r} (trained base biases)")
    for key in ("trainable_token_indices", "layer_replication", "alora_invocation_tokens", "arrow_config"):
        if config.get(key):
            unsupported.append(f"{key}={config[key]!r}")
    for key in ("use_qalora", "use_bdlora"):
        if config.get(key):
            unsupported.append(f"{key}=True")
    if unsupported:
        raise ValueError(
            f"load_peft: {where} uses PEFT features lorajax does not support: {'; '.join(unsupported)}. "
            "Only plain LoRA (with rsLoRA, rank_pattern, alpha_pattern) on Linear, Conv1D, ConvNd and Embedding loads."
        )
    r = config.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"load_peft: {where} has r={r!r}; expected a positive integer.")
    return config


def read_peft(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The config and per-module factors of a PEFT adapter directory, as NumPy arrays.

    Returns ``(config, modules)`` with ``modules[name] = {"kind": "dense"|"conv"|"embed", "A": ..., "B": ...}``
    in PEFT's own shapes. Checks the same things as :func:`load_peft` (unsupported features, factor pairs).

    Example:
        >>> import jax, jax.numpy as jnp, lorajax, tempfile
        >>> p = lorajax.lorafy({"fc": {"kernel": jnp.ones((4, 3))}}, rank=2, where=["fc"], key=jax.random.key(0))
        >>> d = tempfile.mkdtemp() + "/adapter"
        >>> _ = lorajax.save_peft(d, p)
        >>> config, modules = lorajax.read_peft(d)
        >>> config["r"], modules["fc"]["A"].shape, modules["fc"]["B"].shape
        (2, (2, 4), (3, 2))
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    root = Path(path)
    cfg_file, w_file = root / CONFIG_NAME, root / WEIGHTS_NAME
    if not root.is_dir():
        raise FileNotFoundError(f"load_peft: {root} is not a directory; pass the folder holding {CONFIG_NAME}.")
    if not cfg_file.is_file():
        raise FileNotFoundError(f"load_peft: {cfg_file} is missing; a PEFT adapter folder holds {CONFIG_NAME}.")
    if not w_file.is_file():
        hint = (
            " (adapter_model.bin is a pickle; lorajax never unpickles: re-save it with safetensors)"
            if (root / "adapter_model.bin").is_file()
            else ""
        )
        raise FileNotFoundError(f"load_peft: {w_file} is missing{hint}.")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"load_peft: {cfg_file} is not valid JSON: {e}") from None
    config = _check_config(config, str(cfg_file))
    try:
        tensors = load_file(str(w_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"load_peft: cannot read {w_file} (truncated or not a safetensors file?): {e}") from None

    modules: dict[str, dict[str, Any]] = {}
    problems = []
    for key, value in tensors.items():
        for fragment, feature in _UNSUPPORTED_KEYS:
            if fragment in key:
                problems.append(f"{key}: {feature} is not supported")
                break
        else:
            suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
            if suffix is None:
                problems.append(f"{key}: not a LoRA factor (*.lora_A.weight, *.lora_B.weight, *.lora_embedding_A/B)")
                continue
            name = key[: -len(suffix)]
            name = name[len(_PREFIX) :] if name.startswith(_PREFIX) else name
            which, kind = _SUFFIXES[suffix]
            entry = modules.setdefault(name, {"kind": kind})
            entry[which] = value
    for name, entry in modules.items():
        if "A" not in entry or "B" not in entry:
            problems.append(f"{name}: has only lora_{'A' if 'A' in entry else 'B'}")
            continue
        A, B = entry["A"], entry["B"]
        if entry["kind"] == "dense" and A.ndim > 2:
            entry["kind"] = "conv"
        r = A.shape[0]
        ok = (
            (entry["kind"] == "dense" and A.ndim == 2 and B.shape[1:] == (r,))
            or (entry["kind"] == "embed" and A.ndim == 2 and B.ndim == 2 and B.shape[1] == r)
            or (entry["kind"] == "conv" and B.ndim == A.ndim and B.shape[1] == r and all(s == 1 for s in B.shape[2:]))
        )
        if not ok:
            problems.append(f"{name}: factor shapes A {A.shape}, B {B.shape} do not form a rank-{r} LoRA pair")
    if problems:
        raise ValueError(f"load_peft: {w_file} has entries lorajax cannot load:\n  " + "\n  ".join(problems))
    if not modules:
        raise ValueError(f"load_peft: {w_file} holds no LoRA factors.")
    return config, modules


def load_peft(
    path: str | os.PathLike,
    params: Any,
    *,
    name_map: NameMap = None,
    layout: Mapping[str, Any] | Callable[[_targets.KeyPath, Any], Any] | None = None,
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
    layout and get the new factors. Factors keep the file's dtype.

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

    Returns:
        ``params`` with a :class:`lorajax.LoRA` node at each adapted kernel.

    Raises:
        ValueError: an unsupported PEFT feature (DoRA, ``modules_to_save``, ``lora_bias``,
            ``target_parameters``...), or one message listing every module without a
            kernel, every shape mismatch and every ambiguous name.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax, tempfile
        >>> base = {"params": {"fc1": {"kernel": jnp.ones((4, 3))}}}
        >>> d = tempfile.mkdtemp() + "/adapter"  # stands in for a folder from PeftModel.save_pretrained
        >>> _ = lorajax.save_peft(d, lorajax.lorafy(base, rank=2, where=["fc1"], key=jax.random.key(0)))
        >>> node = lorajax.load_peft(d, base)["params"]["fc1"]["kernel"]
        >>> node.rank, node.layout, node.a.shape, node.b.shape
        (2, Layout('io'), (4, 2), (2, 3))
    """
    config, modules = read_peft(path)
    resolve = _resolver(name_map, "load_peft")
    rank_pattern = dict(config.get("rank_pattern") or {})
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    default_r, default_alpha = config.get("r", 8), config.get("lora_alpha", 8)
    rslora = bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))

    def alpha_of(name: str) -> float:
        key = _pattern_key(alpha_pattern, name)
        return float(alpha_pattern[key] if key is not None else default_alpha)

    def factors(name: str, lay: Layout, shape: tuple[int, ...], where: str) -> tuple[np.ndarray, np.ndarray, int]:
        """Module ``name``'s factors in our layout for one (unstacked) kernel, or a _Problem."""
        entry = modules[name]
        kind, A, B = entry["kind"], entry["A"], entry["B"]
        if lay.kind != kind:
            raise _Problem(f"{where}: a {lay.kind} kernel (layout {lay.axes!r}) but PEFT module {name!r} is {kind}")
        r = int(A.shape[0])
        fan_in, fan_out = lay.sizes(shape)
        if kind == "conv":
            window = tuple(shape[k] for k in lay.fan_in if lay.axes[k] == "w")
            want_a = (r, shape[lay.axes.index("i")], *window)
        else:
            want_a = (r, fan_in)
        want_b = (fan_out, r) + (1,) * (B.ndim - 2 if kind == "conv" else 0)
        if tuple(A.shape) != want_a or tuple(B.shape) != want_b:
            raise _Problem(
                f"{where}: kernel {shape} (layout {lay.axes!r}) needs PEFT factors A {want_a}, B {want_b}; "
                f"module {name!r} has A {tuple(A.shape)}, B {tuple(B.shape)}"
            )
        r_key = _pattern_key(rank_pattern, name)
        want_r = rank_pattern[r_key] if r_key is not None else default_r
        if want_r != r:
            raise _Problem(f"module {name!r}: config gives rank {want_r} but its factors have rank {r}")
        a, b = _torch_to_ours(kind, A, B, lay, shape)
        return a, b, r

    leaves = _targets.tree_paths(params, is_leaf=is_lora)
    owner: dict[str, list[int]] = collections.defaultdict(list)
    templates: list[tuple[int, str, re.Pattern[str]]] = []
    for n, (kpath, leaf) in enumerate(leaves):
        base = leaf.base if is_lora(leaf) else leaf
        candidate = is_lora(leaf) or _targets.is_kernel(kpath, base)
        name = resolve(_targets.path_str(kpath), candidate)
        if name is not None and "{}" in name:  # a stacked kernel: one module per layer index
            regex = re.compile(re.escape(name).replace(re.escape("{}"), r"(\d+)", 1))
            templates.append((n, name, regex))
        elif name is not None and name in modules:
            owner[name].append(n)

    problems: list[str] = []
    direct: dict[int, str] = {}
    stacked: dict[int, dict[int, str]] = collections.defaultdict(dict)
    for name, entry in modules.items():
        hits = owner.get(name, [])
        if len(hits) > 1:
            paths = ", ".join(_targets.path_str(leaves[n][0]) for n in hits)
            problems.append(f"module {name!r}: several parameters map to it ({paths}); pass name_map to pick one")
        elif hits:
            direct[hits[0]] = name
        else:
            match = next(((n, m) for n, _, rx in templates if (m := rx.fullmatch(name))), None)
            if match is None:
                problems.append(
                    f"module {name!r}: no parameter maps to it (A {entry['A'].shape}, B {entry['B'].shape})"
                )
            else:
                stacked[match[0]][int(match[1].group(1))] = name

    replaced: dict[int, LoRA] = {}
    for n in sorted(set(direct) | set(stacked)):
        kpath, leaf = leaves[n]
        pstr = _targets.path_str(kpath)
        node = leaf if is_lora(leaf) else None
        box = node.base if node is not None else leaf
        array = _boxes.unbox(box)
        shape = tuple(getattr(array, "shape", ()))
        try:
            if node is not None and node.per_example:
                raise _Problem(f"{pstr}: holds per-example factors (lorajax.select); load onto the plain params")
            name = direct.get(n) or next(iter(stacked[n].values()))
            entry = modules[name]
            spec = _layout.layout_spec(layout, kpath, array, caller="load_peft")
            if node is not None:
                lay = node.layout
            elif spec is not None:
                lay = _layout.parse_layout(spec, kpath, shape, caller="load_peft")
            elif n in stacked:  # a name template means one leading layer axis
                lay = Layout(
                    "s" + _guess_layout(entry["kind"], kpath, shape[1:], entry["A"], entry["B"], fan_in_fan_out).axes
                )
            else:
                lay = _guess_layout(entry["kind"], kpath, shape, entry["A"], entry["B"], fan_in_fan_out)
            if n in direct:
                if lay.stack:
                    raise _Problem(
                        f"{pstr}: layout {lay.axes!r} is stacked but maps to the single module {name!r}; give name_map "
                        "a name with '{}' for the layer index, e.g. 'model.layers.{}.mlp.fc1'"
                    )
                a, b, r = factors(name, lay, shape, pstr)
                alpha = alpha_of(name)
            else:
                a, b, r, alpha, rs = _stack_factors(stacked[n], lay, shape, pstr, factors, alpha_of, rslora)
        except (_Problem, ValueError) as e:
            problems.append(str(e) if isinstance(e, _Problem) else f"{pstr}: {e}")
            continue
        names_a, names_b = _layout.factor_names(box, lay)
        a = _boxes.rebox(box, jnp.asarray(a), names_a)
        b = _boxes.rebox(box, jnp.asarray(b), names_b)
        rs = rslora if n in direct else rs
        if node is not None:
            replaced[n] = dataclasses.replace(node, a=a, b=b, spec=node.spec.replace(rank=r, alpha=alpha, rslora=rs))
        else:
            replaced[n] = LoRA(base=leaf, a=a, b=b, spec=LoRASpec(rank=r, alpha=alpha, layout=lay, rslora=rs))
    if problems:
        raise ValueError(f"load_peft: {len(problems)} problem(s) loading {path}:\n  " + "\n  ".join(problems))
    treedef = jax.tree_util.tree_structure(params, is_leaf=lambda x: _boxes.is_box(x) or is_lora(x))
    return jax.tree_util.tree_unflatten(treedef, [replaced.get(n, leaf) for n, (_, leaf) in enumerate(leaves)])


class _Problem(Exception):
    """One entry of load_peft's list of problems."""


def _unstacked(lay: Layout, shape: tuple[int, ...], where: str) -> tuple[Layout, tuple[int, ...], int]:
    if len(lay.stack) != 1:
        raise _Problem(f"{where}: layout {lay.axes!r} needs exactly one stacked axis to map to PEFT layers")
    k = lay.stack[0]
    return Layout(lay.axes.replace("s", "")), shape[:k] + shape[k + 1 :], shape[k]


def _stack_factors(
    layers: dict[int, str], lay: Layout, shape: tuple[int, ...], where: str, factors: Any, alpha_of: Any, rslora: bool
) -> tuple[np.ndarray, np.ndarray, int, float, bool]:
    """One stacked node from per-layer PEFT modules.

    Equal ranks and alphas on every layer stack as they are. Otherwise (or with
    layers the adapter leaves out, as with ``layers_to_transform``) each layer's
    own scale is folded into its ``b``, ranks are zero-padded to the largest and
    absent layers get zero factors: exact, with ``alpha = rank`` (scale 1).
    """
    inner, inner_shape, count = _unstacked(lay, shape, where)
    bad = sorted(i for i in layers if i >= count)
    if bad:
        raise _Problem(
            f"{where}: layers {bad} are out of range for {count} stacked layers ({[layers[i] for i in bad]})"
        )
    got = {i: factors(name, inner, inner_shape, f"{where}[{i}]") for i, name in layers.items()}
    ranks = {r for _, _, r in got.values()}
    alphas = {alpha_of(name) for name in layers.values()}
    stack_axis = 0  # a and b start with the stacked axis (Layout.a_shape)
    if len(got) == count and len(ranks) == 1 and len(alphas) == 1:
        a = np.stack([got[i][0] for i in range(count)], stack_axis)
        b = np.stack([got[i][1] for i in range(count)], stack_axis)
        return a, b, ranks.pop(), alphas.pop(), rslora
    r_max = max(ranks)
    a_shape, b_shape = inner.a_shape(inner_shape, r_max), inner.b_shape(inner_shape, r_max)
    dtype = np.result_type(*[g[0].dtype for g in got.values()])
    a, b = np.zeros((count, *a_shape), dtype), np.zeros((count, *b_shape), dtype)
    for i, (ai, bi, r) in got.items():
        scale = lora_scale(alpha_of(layers[i]), r, rslora)
        a[i, ..., :r] = ai
        b[i, :r] = (bi.astype(np.float32) * np.float32(scale)).astype(dtype)
    return a, b, r_max, float(r_max), False


# --------------------------------------------------------------------------------------------------------------------
# Writing.


def _exact_key(name: str, others: list[str]) -> str:
    """A rank_pattern/alpha_pattern key that PEFT's rule matches to ``name`` and to none of ``others``."""
    if re.escape(name).replace("\\.", ".") == name and not any(re.match(rf"(.*\.)?({name})$", o) for o in others):
        return name
    # '^' inside PEFT's "(.*\.)?(key)$" only matches at the start: an exact, anchored name.
    return "^" + re.escape(name)


def _json_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _write_atomic(root: Path, files: dict[str, Callable[[Path], object]]) -> None:
    """Write each file through a temp file and rename; a new directory appears whole or not at all."""
    root = root.absolute()
    root.parent.mkdir(parents=True, exist_ok=True)
    if not root.exists():
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
        try:
            publish(tmp, directory=True)
            for fname, write in files.items():
                write(tmp / fname)
            os.replace(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return
    if not root.is_dir():
        raise FileExistsError(f"save_peft: {root} exists and is not a directory.")
    for fname, write in files.items():  # existing folder: replace each file atomically, keep others (README...)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{fname}.", suffix=".tmp", dir=root)
        os.close(fd)
        try:
            write(Path(tmp_name))
            publish(tmp_name)
            os.replace(tmp_name, root / fname)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise


def save_peft(
    path: str | os.PathLike,
    params: Any,
    *,
    name_map: NameMap = None,
    base_model_name_or_path: str | None = None,
    fan_in_fan_out: bool = False,
) -> dict[str, Any]:
    """Write the LoRA nodes of ``params`` as a PEFT adapter that ``PeftModel.from_pretrained`` loads.

    Writes ``adapter_config.json`` (``target_modules``, ``r`` and ``lora_alpha``
    set to the most common values, ``rank_pattern``/``alpha_pattern`` for the
    modules that differ, ``use_rslora``, ``fan_in_fan_out``) and
    ``adapter_model.safetensors`` (factors transposed into PyTorch's layout, in
    their own dtype). Files are written to temporary names and renamed. A node
    whose ``rslora`` differs from the majority is saved with the ``alpha`` that
    gives the same scale under the majority rule, so outputs are unchanged.

    Args:
        path: output directory (created; files in an existing one are replaced).
        params: lorafied params (only the LoRA nodes are written).
        name_map: parameter path -> PyTorch module name, as in :func:`load_peft`; a name with
            ``{}`` writes a stacked kernel as one module per layer index.
        base_model_name_or_path: recorded in the config (PEFT uses it to find the base model).
        fan_in_fan_out: set for GPT-2-style ``Conv1D`` bases (PEFT would otherwise fix it with a warning).

    Returns:
        The config that was written.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax, tempfile
        >>> p = lorajax.lorafy({"params": {"fc1": {"kernel": jnp.ones((4, 3))}}}, rank=2, where=["fc1"],
        ...                    key=jax.random.key(0))
        >>> cfg = lorajax.save_peft(tempfile.mkdtemp() + "/adapter", p)
        >>> cfg["target_modules"], cfg["r"]
        (['fc1'], 2)
    """
    from safetensors.numpy import save_file

    resolve = _resolver(name_map, "save_peft")
    nodes = [(p, x) for p, x in _targets.tree_paths(params, is_leaf=is_lora) if is_lora(x)]
    if not nodes:
        raise ValueError("save_peft: params hold no LoRA nodes; lorafy or load_peft them first.")
    problems: list[str] = []
    # module name -> (path, node, layout, kernel shape, a, b) of one (unstacked) kernel
    entries: dict[str, tuple[str, LoRA, Layout, tuple[int, ...], np.ndarray, np.ndarray]] = {}
    for kpath, node in nodes:
        pstr = _targets.path_str(kpath)
        name = resolve(pstr, True)
        if name is None:
            problems.append(f"{pstr}: name_map gives no module name")
            continue
        if node.per_example:
            problems.append(f"{pstr}: holds per-example factors (lorajax.select); save the adapters before selecting")
            continue
        a, b = np.asarray(_boxes.unbox(node.a)), np.asarray(_boxes.unbox(node.b))
        if node.layout.stack:
            if "{}" not in name:
                problems.append(
                    f"{pstr}: stacked layout {node.layout.axes!r} but one module name {name!r}; PEFT has one module "
                    "per layer: give name_map a name with '{}' for the layer index, e.g. 'model.layers.{}.mlp.fc1'"
                )
                continue
            try:
                inner, inner_shape, count = _unstacked(node.layout, node.shape, pstr)
            except _Problem as e:
                problems.append(str(e))
                continue
            parts = [(name.replace("{}", str(k), 1), inner, inner_shape, a[k], b[k]) for k in range(count)]
        else:
            parts = [(name, node.layout, node.shape, a, b)]
        for module, lay, shape, ak, bk in parts:
            if module in entries:
                problems.append(f"{pstr}: module name {module!r} is also used by {entries[module][0]}; pass name_map")
            else:
                entries[module] = (pstr, node, lay, shape, ak, bk)
    if problems:
        raise ValueError(f"save_peft: {len(problems)} problem(s):\n  " + "\n  ".join(problems))

    rslora = collections.Counter(e[1].rslora for e in entries.values()).most_common(1)[0][0]
    ranks, alphas, tensors = {}, {}, {}
    for name, (_, node, lay, shape, a, b) in entries.items():
        kind = lay.kind
        A, B = _ours_to_torch(kind, a, b, lay, shape)
        if kind == "embed":
            tensors[f"{_PREFIX}{name}.lora_embedding_A"], tensors[f"{_PREFIX}{name}.lora_embedding_B"] = A, B
        else:
            tensors[f"{_PREFIX}{name}.lora_A.weight"], tensors[f"{_PREFIX}{name}.lora_B.weight"] = A, B
        # Same scale under the file's rslora rule: alpha/r == alpha'/sqrt(r) or the reverse.
        alpha = node.alpha
        if node.rslora != rslora:
            alpha = alpha / math.sqrt(node.rank) if rslora else alpha * math.sqrt(node.rank)
        ranks[name], alphas[name] = node.rank, _json_number(alpha)
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    lora_alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    names = sorted(entries)
    others = {n: [o for o in names if o != n] for n in names}
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": names,
        "rank_pattern": {_exact_key(n, others[n]): ranks[n] for n in names if ranks[n] != r},
        "alpha_pattern": {_exact_key(n, others[n]): alphas[n] for n in names if alphas[n] != lora_alpha},
        "use_rslora": rslora,
        "fan_in_fan_out": fan_in_fan_out,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    _write_atomic(
        Path(path),
        {
            WEIGHTS_NAME: lambda f: save_file(tensors, str(f), metadata={"format": "pt"}),
            CONFIG_NAME: lambda f: f.write_text(json.dumps(config, indent=2) + "\n"),
        },
    )
    return config
