"""PEFT's ``target_parameters``: LoRA on raw ``nn.Parameter``s, chiefly the fused expert banks of transformers 5.

transformers 5 keeps a mixture-of-experts block's experts as 3-D parameters of one module, ``mlp.experts.gate_up_proj``
``(E, 2f, d)`` and ``mlp.experts.down_proj`` ``(E, d, f)`` (``(E, out, in)``: expert ``e`` is ``F.linear(x, W[e])``),
and its router as a bare ``mlp.gate.weight`` ``(E, d)``. PEFT adapts them with ``target_parameters`` (its
``lora.ParamWrapper``): one LoRA per expert, stored as

- PEFT >= 0.19.1: ``A`` ``(E*r, in)``, ``B`` ``(out, E*r)``; expert ``e``'s update is ``B[:, :, e] @ A[e]`` with
  ``A`` read as ``(E, r, in)`` and ``B`` as ``(out, r, E)`` (experts major in ``A``, minor in ``B``);
- PEFT < 0.19.1 (0.17, 0.18, 0.19.0): for a parameter ``(E, d1, d2)``, ``A`` ``(E*r, d1)`` and ``B``
  ``(d2, E*r)``, the update ``(A[e].T @ B[:, :, e].T)`` in the parameter's own order: on transformers 5's
  ``(E, out, in)`` banks the roles of ``A`` and ``B`` are the other way round. Only the config's ``peft_version``
  tells the two apart; where sizes do not settle it (a square bank), the older files are read in transformers 5's
  ``(E, out, in)`` order (wrong for a square ``(E, in, out)`` bank, gpt-oss's ``is_transposed`` experts, written by
  PEFT 0.17/0.18).

A 2-D parameter (the router) is stored as a Linear's ``A (r, in)``, ``B (out, r)``. Several parameters of one module
nest as ``base_layer`` wrappers in the module's parameter order (``gate_up_proj`` inside, so its tensors are
``experts.base_layer.lora_A.weight``; ``down_proj`` outside, ``experts.lora_A.weight``).

On the JAX side an expert bank is a kernel ``(E, d_in, d_out)`` of layout ``"sio"`` with per-expert factors ``a``
``(E, d_in, r)``, ``b`` ``(E, r, d_out)``. A name map names it either by the parameter itself (a plain name such as
``model.layers.0.mlp.experts.down_proj`` for a stacked kernel) or by the checkpoint's per-expert modules
(``model.layers.0.mlp.experts.{}.gate_proj``, what ``name_map="tunix"`` gives), which transformers 5 fuses as
:data:`FUSED` says: separate gate and up banks are the two halves of ``gate_up_proj``'s output. Loading gives each
half the shared ``A`` and its half of ``B`` (only the rank rows its half uses, so a block-diagonal file gives back
each LoRA's own rank); writing two LoRAs into one fused parameter is exact at rank ``r1 + r2``
(``A`` stacked, ``B`` block-diagonal), as PEFT's own v4 -> v5 conversion does.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import numpy as np

from lorajax._layout import Layout
from lorajax._problems import Problems
from lorajax._targets import pattern_key

#: transformers 4's per-expert module (a name map's ``experts.{}.<name>``) -> (transformers 5 parameter, slice,
#: slices): Qwen2/3-MoE's gate/up/down and Mixtral's w1/w3/w2, as transformers' own conversion mapping fuses them.
FUSED = {
    "gate_proj": ("gate_up_proj", 0, 2),
    "up_proj": ("gate_up_proj", 1, 2),
    "down_proj": ("down_proj", 0, 1),
    "w1": ("gate_up_proj", 0, 2),
    "w3": ("gate_up_proj", 1, 2),
    "w2": ("down_proj", 0, 1),
}
#: The order transformers 5's expert modules register their parameters in (PEFT nests its wrappers in this order).
ORDER = ("gate_up_proj", "down_proj")
#: The first PEFT version that stores A ``(E*r, in)`` and B ``(out, E*r)``.
NEW_FORMAT = (0, 19, 1)
_WRAP = ".base_layer"
_BANK = re.compile(r"^(?P<module>.+\.experts)\.\{\}\.(?P<leaf>[^.{}]+)$")
_PARAM = re.compile(r"^.+\.experts\.[^.{}]+$")  # transformers 5: every fused MoE keeps its banks in `...experts`


class Ref(NamedTuple):
    """Which part of a PEFT parameter one JAX kernel is: the parameter's full name, the slice, how many slices."""

    param: str
    slice: int
    slices: int


def bank_ref(name: Any, stacked: bool) -> Ref | None:
    """The parameter a kernel's module ``name`` stands for, if it is one: a per-expert template of :data:`FUSED`, or a
    parameter of an ``experts`` module (``<block>.experts.<parameter>``) on a ``stacked`` kernel.

    >>> bank_ref("model.layers.0.mlp.experts.{}.up_proj", True)
    Ref(param='model.layers.0.mlp.experts.gate_up_proj', slice=1, slices=2)
    >>> bank_ref("model.layers.0.mlp.experts.down_proj", True)
    Ref(param='model.layers.0.mlp.experts.down_proj', slice=0, slices=1)
    """
    if not isinstance(name, str):
        return None
    match = _BANK.fullmatch(name)
    if match is not None and match.group("leaf") in FUSED:
        param, j, count = FUSED[match.group("leaf")]
        return Ref(f"{match.group('module')}.{param}", j, count)
    return Ref(name, 0, 1) if stacked and _PARAM.fullmatch(name) else None


def new_format(config: dict[str, Any]) -> bool:
    """Whether the config's ``peft_version`` (absent before 0.18) stores A ``(E*r, in)`` and B ``(out, E*r)``.

    >>> new_format({"peft_version": "0.21.2"}), new_format({"peft_version": "0.18.0@abc"}), new_format({})
    (True, False, False)
    """
    version = str(config.get("peft_version") or "0").partition("@")[0]
    parts = [int(p) for p in re.findall(r"\d+", version)[:3]]
    return tuple(parts + [0] * (3 - len(parts))) >= NEW_FORMAT


# --------------------------------------------------------------------------------------------------------------------
# Reading: the file's nested wrappers as one entry per parameter.


def _split(target: str) -> tuple[str, str]:
    module, _, param = target.rpartition(".")
    return module, param


def _fits(module: str, part: str) -> bool:
    return module == part or module.endswith("." + part)


def _params_of(targets: list[str], module: str, count: int) -> list[str] | None:
    """The ``count`` parameters of ``module`` the targets name, in nesting order; None where that is not one set."""
    specific = sorted({p for m, p in map(_split, targets) if m and _fits(module, m)})
    generic = sorted({p for m, p in map(_split, targets) if not m})
    for names in (specific, sorted(set(specific) | set(generic))):
        if len(names) == count and (count == 1 or all(n in ORDER for n in names)):
            return sorted(names, key=ORDER.index) if count > 1 else names
    return None


def parameter_entries(
    config: dict[str, Any], modules: dict[str, dict[str, Any]], untargeted: Callable[[str], bool], problems: Problems
) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """``modules`` with PEFT's nested ``target_parameters`` wrappers as one entry per parameter, and their names.

    A 3-D parameter's entry is ``{"kind": "param", "A": (E*r, .), "B": (., E*r)}`` under the parameter's full name
    (``...mlp.experts.gate_up_proj``); a ``weight`` alone on its module (the router) stays the module's Linear-format
    entry. ``untargeted(module)``: whether ``target_modules`` leaves the module alone (a wrapper can only be such).
    """
    targets = [str(t) for t in config.get("target_parameters") or []]
    if not targets:
        return modules, set()
    groups: dict[str, dict[int, str]] = collections.defaultdict(dict)
    for name in modules:
        module, depth = name, 0
        while module.endswith(_WRAP):
            module, depth = module[: -len(_WRAP)], depth + 1
        if depth or (untargeted(module) and any(not m or _fits(module, m) for m, _ in map(_split, targets))):
            groups[module][depth] = name
    out, names = dict(modules), set()
    for module, depths in sorted(groups.items()):
        count = len(depths)
        params = _params_of(targets, module, count) if sorted(depths) == list(range(count)) else None
        if params is None:
            problems.add(
                f"{module}: {count} nested target_parameters wrappers, but target_parameters={targets} does not name "
                f"{count} parameters of it in an order lorajax knows ({', '.join(ORDER)})"
            )
            continue
        for j, param in enumerate(params):  # the first parameter is the innermost wrapper
            entry = out.pop(depths[count - 1 - j])
            key = module if (count == 1 and param == "weight") else f"{module}.{param}"
            out[key] = entry if key == module else {**entry, "kind": "param"}
            names.add(key)
    return out, names


# --------------------------------------------------------------------------------------------------------------------
# Loading.


class BankFactors(NamedTuple):
    """One expert bank's factors in lorajax's stacked layout, with the spec fields they come with."""

    layout: Layout
    a: np.ndarray
    b: np.ndarray
    rank: int
    alpha: float
    rslora: bool


def _per_expert(A: Any, B: Any, experts: int, n_in: int, out: int, new: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """``(a (E, in, r), b (E, r, out))`` from the file's A, B, or None where their shapes fit neither reading."""
    A, B = np.asarray(A), np.asarray(B)
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] % experts or A.shape[0] != B.shape[1]:
        return None
    r = A.shape[0] // experts
    as_new = A.shape[1] == n_in and B.shape[0] == out
    swapped = A.shape[1] == out and B.shape[0] == n_in  # PEFT < 0.19.1 on an (E, out, in) parameter
    if as_new and (new or not swapped):
        return A.reshape(experts, r, n_in).transpose(0, 2, 1), B.reshape(out, r, experts).transpose(2, 1, 0)
    if swapped and not new:
        return B.reshape(n_in, r, experts).transpose(2, 0, 1), A.reshape(experts, r, out)
    return None


def bank_factors(
    where: str, shape: tuple[int, ...], layout: Layout | None, entry: dict[str, Any], ref: Ref, config: dict[str, Any]
) -> BankFactors:
    """The per-expert factors one kernel of ``shape`` (slice ``ref.slice`` of parameter ``ref.param``) takes."""
    A, B = entry["A"], entry["B"]
    new = new_format(config)
    readings = [layout] if layout is not None else [Layout("sio"), Layout("soi")]
    for lay in readings:
        if lay.axes[0] != "s" or len(lay.stack) != 1:
            raise ValueError(
                f"{where}: layout {lay.axes!r}; an expert bank for {ref.param} needs its expert axis first"
            )
        n_in, n_out = lay.sizes(shape)
        got = _per_expert(A, B, shape[0], n_in, n_out * ref.slices, new)
        if got is not None:
            break
    else:
        version = config.get("peft_version") or "before 0.18"
        raise ValueError(
            f"{where}: kernel {shape} (experts first, {' or '.join(repr(r.axes) for r in readings)}) does not fit "
            f"PEFT parameter {ref.param!r} (slice {ref.slice + 1} of {ref.slices}) with A {tuple(np.shape(A))}, "
            f"B {tuple(np.shape(B))} as PEFT {version} stores them; state the kernel's layout with layout="
        )
    a, b = got
    rank = a.shape[-1]
    r_key, a_key = (pattern_key(config.get(k) or {}, ref.param) for k in ("rank_pattern", "alpha_pattern"))
    want = (config.get("rank_pattern") or {})[r_key] if r_key is not None else config.get("r", 8)
    if want != rank:
        raise ValueError(f"parameter {ref.param!r}: config gives rank {want} but its factors have rank {rank}")
    alpha = (config.get("alpha_pattern") or {})[a_key] if a_key is not None else config.get("lora_alpha", 8)
    b = b[:, :, ref.slice * n_out : (ref.slice + 1) * n_out]
    rslora = bool(config.get("use_rslora"))
    keep = np.any(b != 0, axis=(0, 2))  # a block-diagonal B (two LoRAs fused): this slice's own rank only, exact
    if ref.slices > 1 and keep.any() and not keep.all():
        scale = float(alpha) / (math.sqrt(rank) if rslora else rank)
        a, b, rank = a[..., keep], b[:, keep], int(keep.sum())
        alpha = scale * (math.sqrt(rank) if rslora else rank)
    return BankFactors(lay, np.ascontiguousarray(a), np.ascontiguousarray(b), rank, float(alpha), rslora)


def assign_banks(
    kernels: Iterable[tuple[int, str, Any]], modules: dict[str, dict[str, Any]], partial: bool, problems: Problems
) -> tuple[dict[int, Ref], dict[str, dict[str, Any]]]:
    """``({leaf index: Ref}, the other modules)``: the kernels whose names (``(index, path, name)``) stand for a
    parameter entry of ``modules``; a parameter no kernel takes is a problem unless ``partial``."""
    params = {k for k, v in modules.items() if v.get("kind") == "param"}
    if not params:
        return {}, modules
    claims: dict[int, Ref] = {}
    taken: dict[Ref, list[str]] = collections.defaultdict(list)
    for n, path, name in kernels:
        ref = Ref(name, 0, 1) if isinstance(name, str) and name in params else bank_ref(name, True)
        if ref is not None and ref.param in params:
            claims[n] = ref
            taken[ref].append(path)
    for ref, paths in taken.items():
        if len(paths) > 1:
            problems.add(f"parameter {ref.param!r} slice {ref.slice}: several kernels map to it ({', '.join(paths)})")
    for param in sorted(params - {r.param for r in claims.values()}):
        if not partial:
            entry = modules[param]
            problems.add(
                f"parameter {param!r}: no kernel maps to it (A {entry['A'].shape}, B {entry['B'].shape}); name the "
                "expert bank after it, or after the checkpoint's per-expert modules ('...experts.{}.gate_proj')"
            )
    return claims, {k: v for k, v in modules.items() if k not in params}


# --------------------------------------------------------------------------------------------------------------------
# Writing.


class Part(NamedTuple):
    """One node written into a PEFT parameter: the node's path, slice, factors ``(E, in, r)``/``(E, r, out)``, scale."""

    path: str
    slice: int
    a: np.ndarray
    b: np.ndarray
    scale: float
    rank: int


def take_banks(factors: list[Any], namer: Callable[[str, bool], Any], problems: Problems) -> tuple[dict, list[Any]]:
    """``({parameter: (count, [Part])}, the other factors)`` for :func:`lorajax.save_peft`.

    An expert bank (one stacked axis, first; or the expert axis as a first fan-out axis, one ``a`` shared by the
    experts, written per expert) named by a parameter or a :data:`FUSED` template, and the router
    (``<block>.gate``, a 2-D kernel beside such a bank) go to PEFT's ``target_parameters``. ``factors`` hold
    ``path``, ``node`` (the LoRA node), ``a`` and ``b`` as NumPy arrays.
    """
    banks: dict[str, tuple[int, list[Part]]] = {}
    rest: list[tuple[Any, Any]] = []
    twod: list[tuple[Any, Any]] = []
    for f in factors:
        node, name = f.node, namer(f.path, True)
        lay = node.layout
        shared = lay.ndim == 3 and lay.axes[0] == "o" and isinstance(name, str) and _BANK.fullmatch(name) is not None
        ref = bank_ref(name, True) if lay.stack or shared else None
        if ref is None:
            (twod if lay.ndim == 2 and isinstance(name, str) else rest).append((f, name))
            continue
        if not shared and (len(lay.stack) != 1 or lay.axes[0] != "s" or lay.kind != "dense"):
            problems.add(
                f"{f.path}: layout {lay.axes!r} with the one module name {name!r}: a stacked kernel named by one name "
                "is written as PEFT's target_parameters (an expert bank, expert axis first, plain LoRA); for scanned "
                "layers give name_map a name with '{}' for the layer index, e.g. 'model.layers.{}.mlp.fc1'"
            )
            continue
        if node.spec.variant != "lora":
            problems.add(f"{f.path}: a {node.spec.variant} node; PEFT's target_parameters holds plain LoRA only")
            continue
        E = node.shape[0]
        if shared:  # the expert axis as fan-out: one a for every expert, b (r, E, ...) per expert
            a, b = np.broadcast_to(f.a, (E, *np.shape(f.a))), np.moveaxis(np.asarray(f.b), 1, 0)
        a, b = (
            np.reshape(a if shared else f.a, (E, -1, node.rank)),
            np.reshape(b if shared else f.b, (E, node.rank, -1)),
        )
        count, parts = banks.setdefault(ref.param, (ref.slices, []))
        if count != ref.slices or any(p.slice == ref.slice for p in parts):
            problems.add(f"{f.path}: parameter {ref.param!r} slice {ref.slice} is also written by another kernel")
            continue
        parts.append(Part(f.path, ref.slice, a, b, float(node.scale), node.rank))
    blocks = {p.rpartition(".")[0].rpartition(".")[0] for p in banks}  # "<block>.experts.<param>" -> "<block>"
    for f, name in twod:
        if name.rpartition(".")[2] == "gate" and name.rpartition(".")[0] in blocks and f.node.spec.variant == "lora":
            banks[f"{name}.weight"] = (1, [Part(f.path, 0, f.a[None], f.b[None], float(f.node.scale), f.node.rank)])
        else:
            rest.append((f, name))
    return banks, [f for f, _ in rest]


class Written(NamedTuple):
    """One parameter as PEFT stores it: A, B (PEFT >= 0.19.1's layout), rank and scale."""

    A: np.ndarray
    B: np.ndarray
    rank: int
    scale: float


def fuse(param: str, count: int, parts: list[Part]) -> Written:
    """One PEFT parameter from the nodes that are its slices: ``A`` their ``a`` stacked along the rank, ``B``
    block-diagonal over the slices (each block times its node's scale where the scales differ); exact.

    >>> a, b = np.ones((2, 3, 1)), np.ones((2, 1, 4))
    >>> w = fuse("experts.gate_up_proj", 2, [Part("g", 0, a, b, 0.5, 1), Part("u", 1, a, 2 * b, 0.5, 1)])
    >>> w.A.shape, w.B.shape, w.rank, w.scale, float(w.B[:4].sum()), float(w.B[4:].sum())
    ((4, 3), (8, 4), 2, 0.5, 8.0, 16.0)
    """
    parts = sorted(parts, key=lambda p: p.slice)
    E, n_in, width = parts[0].a.shape[0], parts[0].a.shape[1], parts[0].b.shape[2]
    bad = [p.path for p in parts if p.a.shape[:2] != (E, n_in) or p.b.shape[2] != width]
    if bad:
        raise ValueError(f"{', '.join(bad)}: the slices of parameter {param!r} differ in experts, fan-in or fan-out")
    same = len({p.scale for p in parts}) == 1
    rank = sum(p.rank for p in parts)
    dtype = np.result_type(*[p.a.dtype for p in parts], *[p.b.dtype for p in parts])
    a = np.concatenate([p.a.astype(dtype) for p in parts], axis=-1)  # (E, in, R)
    b = np.zeros((E, rank, width * count), dtype)  # (E, R, out)
    offset = 0
    for p in parts:
        block = p.b if same else (p.b.astype(np.float32) * np.float32(p.scale)).astype(dtype)
        b[:, offset : offset + p.rank, p.slice * width : (p.slice + 1) * width] = block
        offset += p.rank
    A = a.transpose(0, 2, 1).reshape(E * rank, n_in)  # row e*R + k
    B = b.transpose(2, 1, 0).reshape(width * count, rank * E)  # column k*E + e
    return Written(np.ascontiguousarray(A), np.ascontiguousarray(B), rank, parts[0].scale if same else 1.0)


def _json(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def bank_tensors(
    banks: dict[str, tuple[int, list[Part]]], config: dict[str, Any], prefix: str, caller: str
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``config`` with ``target_parameters`` (and the ranks and alphas they need) and the banks' tensors, named as
    PEFT nests its wrappers (``<module>.base_layer....lora_A.weight``)."""
    if not banks:
        return config, {}
    try:
        written = {param: fuse(param, *banks[param]) for param in sorted(banks)}
    except ValueError as e:
        raise ValueError(f"{caller}: {e}") from None
    config = dict(config)
    if config.get("r") is None:  # only parameters: their most common rank and alpha are the config's
        config["r"] = collections.Counter(w.rank for w in written.values()).most_common(1)[0][0]
        config["use_rslora"] = bool(config.get("use_rslora"))
    rslora = bool(config["use_rslora"])
    alpha = {p: _json(w.scale * (math.sqrt(w.rank) if rslora else w.rank)) for p, w in written.items()}
    if config.get("lora_alpha") is None:
        config["lora_alpha"] = collections.Counter(alpha.values()).most_common(1)[0][0]
    tensors: dict[str, np.ndarray] = {}
    by_module: dict[str, list[str]] = collections.defaultdict(list)
    for param in written:
        module, _, name = param.rpartition(".")
        by_module[module].append(name)
    for module, names in by_module.items():
        names.sort(key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
        if len(names) > 1 and any(n not in ORDER for n in names):
            raise ValueError(
                f"{caller}: {module}: parameters {names}; PEFT nests several parameters of one module in the module's "
                f"parameter order, which lorajax knows for {', '.join(ORDER)} only"
            )
        for j, name in enumerate(names):
            w = written[f"{module}.{name}"]
            stem = prefix + module + _WRAP * (len(names) - 1 - j)
            tensors[f"{stem}.lora_A.weight"], tensors[f"{stem}.lora_B.weight"] = w.A, w.B
    for param, w in written.items():
        key = "^" + re.escape(param)  # PEFT matches a pattern key against the parameter's full name
        if w.rank != config["r"]:
            config["rank_pattern"] = {**config.get("rank_pattern", {}), key: w.rank}
        if alpha[param] != config["lora_alpha"]:
            config["alpha_pattern"] = {**config.get("alpha_pattern", {}), key: alpha[param]}
    config["target_parameters"] = sorted(written)
    config["peft_version"] = ".".join(map(str, NEW_FORMAT))  # the format written: PEFT >= 0.19.1's
    return config, tensors
