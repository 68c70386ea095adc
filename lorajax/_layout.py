"""Kernel layouts: which axes are fan-in, fan-out and stacked, and how they map onto the factors.

Everything that must agree on a kernel's axes (``lorafy``'s factor shapes, the
factors' Flax axis names and shardings, PEFT and adapter files) goes through
:class:`Layout` and its :meth:`Layout.project`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias, TypeVar

from lorajax import _boxes, _names, _targets
from lorajax._paths import KeyPath, path_parts, path_str

T = TypeVar("T")

_AXIS_CODES = {
    "s": "stacked (a leading layer axis from nn.scan / nnx.scan / vmap)",
    "i": "fan-in",
    "o": "fan-out",
    "w": "convolution window (fan-in)",
    "e": "embedding rows (fan-in, looked up by index)",
}


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which axes of a kernel are fan-in, fan-out and stacked.

    A layout is a string with one code per kernel axis:

    ====  ==========================================================
    code  meaning
    ====  ==========================================================
    ``s`` stacked axis (layers from ``nn.scan``); every slice gets its own A, B
    ``i`` fan-in
    ``o`` fan-out
    ``w`` convolution window, counted as fan-in (PEFT's conv construction)
    ``e`` embedding rows: fan-in, but the kernel is looked up, not multiplied
    ====  ==========================================================

    Examples: a Flax ``Dense`` kernel is ``"io"``, an Equinox/PyTorch ``weight``
    is ``"oi"``, a DenseGeneral query kernel (d_model, heads, head_dim) is
    ``"ioo"``, the attention output kernel is ``"iio"``, a 2-D Flax conv is
    ``"wwio"``, an ``Embed`` table is ``"eo"`` and a Dense kernel stacked by
    ``nn.scan`` is ``"sio"``.

    The factor shapes follow the layout: ``a`` is ``(*stacked, *fan_in, rank)``
    and ``b`` is ``(*stacked, rank, *fan_out)``, each group in kernel order.

    >>> Layout("iio").fan_in, Layout("iio").fan_out
    ((0, 1), (2,))
    """

    axes: str

    def __post_init__(self) -> None:
        bad = sorted(set(self.axes) - set(_AXIS_CODES))
        if bad:
            codes = ", ".join(f"{k!r} ({v})" for k, v in _AXIS_CODES.items())
            raise ValueError(f"Layout {self.axes!r}: unknown axis codes {bad}; use {codes}.")
        if not any(c in "iwe" for c in self.axes) or "o" not in self.axes:
            raise ValueError(
                f"Layout {self.axes!r} needs at least one fan-in ('i', 'w' or 'e') and one fan-out ('o') axis."
            )
        if "e" in self.axes and (self.axes.count("e") > 1 or "i" in self.axes or "w" in self.axes):
            raise ValueError(f"Layout {self.axes!r}: an embedding has exactly one 'e' axis and no other fan-in axes.")
        if "w" in self.axes and "i" not in self.axes:
            raise ValueError(
                f"Layout {self.axes!r}: a convolution needs an input-channel axis 'i' beside its window 'w'."
            )

    @property
    def ndim(self) -> int:
        return len(self.axes)

    @property
    def stack(self) -> tuple[int, ...]:
        """Positions of the stacked (layer) axes."""
        return tuple(k for k, c in enumerate(self.axes) if c == "s")

    @property
    def fan_in(self) -> tuple[int, ...]:
        """Positions of the fan-in axes (input channels, window, embedding rows)."""
        return tuple(k for k, c in enumerate(self.axes) if c in "iwe")

    @property
    def fan_out(self) -> tuple[int, ...]:
        """Positions of the fan-out axes."""
        return tuple(k for k, c in enumerate(self.axes) if c == "o")

    @property
    def kind(self) -> str:
        """``"embed"``, ``"conv"`` or ``"dense"``."""
        if "e" in self.axes:
            return "embed"
        return "conv" if "w" in self.axes else "dense"

    def project(self, per_axis: Sequence[T], rank_entry: T) -> tuple[tuple[T, ...], tuple[T, ...]]:
        """Map one value per kernel axis onto the axes of ``(a, b)``.

        The one projection of a kernel's axes onto its factors, used for their
        shapes, their Flax axis names and their shardings: ``a`` takes the stacked
        and fan-in entries plus ``rank_entry``, ``b`` the stacked entries,
        ``rank_entry`` and the fan-out entries.

        >>> Layout("sio").project(("layers", "embed", "mlp"), None)
        (('layers', 'embed', None), ('layers', None, 'mlp'))
        """
        if len(per_axis) != self.ndim:
            raise ValueError(f"Layout {self.axes!r} has {self.ndim} axes; got {len(per_axis)} entries {per_axis!r}.")
        pick = lambda axes: tuple(per_axis[k] for k in axes)
        return pick(self.stack) + pick(self.fan_in) + (rank_entry,), pick(self.stack) + (rank_entry,) + pick(
            self.fan_out
        )

    def a_shape(self, shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
        """Shape of the ``a`` factor for a kernel of ``shape``."""
        return tuple(int(d) for d in self.project(tuple(shape), rank)[0])

    def b_shape(self, shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
        """Shape of the ``b`` factor for a kernel of ``shape``."""
        return tuple(int(d) for d in self.project(tuple(shape), rank)[1])

    def sizes(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """``(fan_in, fan_out)`` sizes of one (unstacked) kernel."""
        return math.prod(shape[k] for k in self.fan_in), math.prod(shape[k] for k in self.fan_out)

    def einsum_subscripts(self) -> str:
        """Subscripts that contract ``a`` and ``b`` back into the kernel layout."""
        letters = "abcdefghijklmnopq"[: self.ndim]
        r = "r"
        a = "".join(letters[k] for k in self.stack + self.fan_in) + r
        b = "".join(letters[k] for k in self.stack) + r + "".join(letters[k] for k in self.fan_out)
        return f"{a},{b}->{letters}"

    def __repr__(self) -> str:
        return f"Layout({self.axes!r})"


LayoutSpec: TypeAlias = "str | Layout"
LayoutArg: TypeAlias = "Mapping[str, LayoutSpec] | Callable[[KeyPath, Any], LayoutSpec | None] | None"

_QKV = _names.suffix_regex(_names.QUERY, _names.KEY, _names.VALUE, _names.FUSED_QKV)
_OUT = _names.suffix_regex(_names.ATTN_OUT)


LAYOUT_HINT = (
    "State each layout with layout={path or regex: spec}, one code per axis: 's' stacked layer axis, 'i' fan-in, "
    "'o' fan-out, 'w' conv window, 'e' embedding rows (e.g. 'sio' for a Dense kernel stacked by nn.scan, 'ioo' for "
    "a (d_model, heads, head_dim) query kernel, 's...' for one leading stacked axis and the rest inferred), or let "
    "the model say it: layout=lorajax.infer_layouts(apply_fn, params, *inputs) reads every layout from the "
    "computation."
)


class AmbiguousLayout(ValueError):
    """Names and shape do not settle a kernel's layout; ``item`` is its one-line description."""

    def __init__(self, item: str, caller: str) -> None:
        super().__init__(f"{caller}: {item}. {LAYOUT_HINT}")
        self.item = item


def _ambiguous(path: KeyPath, shape: tuple[int, ...], why: str, caller: str) -> AmbiguousLayout:
    name = path_str(path)
    return AmbiguousLayout(
        f"cannot tell the layout of {name} with shape {shape}: {why}; state it with layout={{{name!r}: ...}}", caller
    )


# A 3-D projection kernel has one fan-in axis (q/k/v: d_model) or one fan-out axis (output: d_model), and
# heads * head_dim is the size of the other two in the common case. Flax stores a query kernel as
# (d_model, heads, head_dim), keras-hub's and gemma's Gemma as (heads, d_model, head_dim): only the sizes tell.
_ONE_IN = ("ioo", "oio", "ooi")
_ONE_OUT = ("oii", "ioi", "iio")


#: ``{attention module path: (heads, head_dim, d_model)}``, read off each module's 3-D output kernel.
AttentionShapes: TypeAlias = "Mapping[str, tuple[int, int, int]]"


def _module_parts(path: KeyPath) -> tuple[str, ...]:
    return _names.module_parts(path_parts(path))


def attention_shapes(leaves: Sequence[tuple[KeyPath, Any]]) -> dict[str, tuple[int, int, int]]:
    """The geometry of every attention module that has a 3-D output kernel, keyed by the module's path.

    Every library stores the output projection heads first, ``(heads, head_dim, d_model)``; where the
    query kernels do not say which axis is ``d_model`` by their sizes (``d_model != heads * head_dim``),
    their sibling output kernel does.
    """
    outs: dict[str, tuple[int, int, int]] = {}
    projections: dict[str, list[tuple[int, ...]]] = {}
    for path, leaf in leaves:
        shape = tuple(int(d) for d in getattr(_boxes.unbox(getattr(leaf, "base", leaf)), "shape", ()))
        module = _module_parts(path)
        if len(shape) != 3 or not module:
            continue
        parent = "/".join(module[:-1])
        if _OUT.fullmatch("/".join(module)):
            outs[parent] = (shape[0], shape[1], shape[2])
        elif _QKV.fullmatch("/".join(module)):
            projections.setdefault(parent, []).append(shape)
    # Trust an output kernel's reading only where a query/key/value kernel beside it fits it exactly one way.
    return {
        m: g
        for m, g in outs.items()
        if any(sum(_fits(q, axes, g) for axes in _ONE_IN) == 1 for q in projections.get(m, ()))
    }


def _fits(shape: tuple[int, ...], axes: str, geometry: tuple[int, int, int] | None) -> bool:
    single = "i" if axes.count("i") == 1 else "o"
    k = axes.index(single)
    if geometry is None:
        return shape[k] == math.prod(d for j, d in enumerate(shape) if j != k)
    _, head_dim, d_model = geometry
    if axes in _ONE_OUT:
        return axes == "iio" and shape[2] == d_model and shape[1] == head_dim
    last = shape[-1] if k != 2 else shape[1]  # head_dim: the last axis that is not d_model
    return shape[k] == d_model and last == head_dim


def _by_sizes(
    path: KeyPath,
    shape: tuple[int, ...],
    readings: tuple[str, ...],
    what: str,
    caller: str,
    geometry: tuple[int, int, int] | None = None,
) -> Layout:
    fits = [axes for axes in readings if _fits(shape, axes, None)]
    if len(fits) != 1 and geometry is not None:
        fits = [axes for axes in readings if _fits(shape, axes, geometry)]
    if len(fits) == 1:
        return Layout(fits[0])
    single = "i" if readings is _ONE_IN else "o"
    role = "d_model (fan-in)" if single == "i" else "d_model (fan-out)"
    found = "no axis" if not fits else "more than one axis"
    options = " or ".join(f"{a!r}" for a in readings)
    example = (
        "Flax's (d_model, heads, head_dim) 'ioo' vs gemma's (heads, d_model, head_dim) 'oio'"
        if single == "i"
        else "(heads, head_dim, d_model) 'iio' vs (d_model, heads, head_dim) 'oii'"
    )
    sibling = f" (nor does the output kernel beside it, (heads, head_dim, d_model) = {geometry})" if geometry else ""
    raise _ambiguous(
        path,
        shape,
        f"a 3-D {what} kernel has one {role} axis whose size is the product of the other two (heads x head_dim), "
        f"and {found} of {shape} is{sibling}; the readings {options} (e.g. {example}) cannot be told apart by name",
        caller,
    )


def infer_layout(
    path: KeyPath, shape: tuple[int, ...], caller: str = "lorafy", attention: AttentionShapes | None = None
) -> Layout:
    """The layout that names and shape settle, or a ValueError asking the user to state it.

    Where names and shape admit two layouts (a 3-D query kernel could be Flax's
    ``(d_model, heads, head_dim)`` or gemma's ``(heads, d_model, head_dim)``) the
    sizes decide: ``d_model = heads * head_dim``, or, failing that, the sizes of the
    output kernel of the same attention module (``attention``, from
    :func:`attention_shapes`). Where nothing settles it, it raises rather than
    guess; :func:`lorajax.infer_layouts` reads the layouts from the model's
    computation instead. A bank of experts (tunix's bare ``mlp/gate_proj``, MaxText's
    ``MoeBlock_0/wi_0``, any kernel in an ``experts`` module) gets one LoRA per expert:
    its leading axes are stacked (``"sio"``, ``"ssio"`` under a layer scan).

    >>> from jax.tree_util import DictKey
    >>> infer_layout((DictKey("Dense_0"), DictKey("kernel")), (8, 4))
    Layout('io')
    >>> infer_layout((DictKey("query"), DictKey("kernel")), (64, 4, 16))  # Flax: d_model = heads * head_dim
    Layout('ioo')
    >>> infer_layout((DictKey("query"), DictKey("kernel")), (4, 64, 16))  # keras-hub Gemma
    Layout('oio')
    >>> infer_layout((DictKey("mlp"), DictKey("gate_proj")), (8, 64, 96))  # tunix's expert bank: one LoRA per expert
    Layout('sio')
    """
    parts = path_parts(path)
    leaf = parts[-1] if parts else ""
    owner_parts = _names.module_parts(parts)
    module = "/".join(owner_parts)
    owner = owner_parts[-1] if owner_parts else ""
    n = len(shape)
    if n < 2:
        raise ValueError(f"{caller}: {path_str(path)} with shape {shape} is not a matrix; LoRA needs 2+ axes.")
    if leaf == "embedding" or _names.EMBED_MODULES.fullmatch(owner):
        if n == 2:
            return Layout("eo")
        raise _ambiguous(path, shape, "an embedding table has 2 axes; more suggests stacked tables", caller)
    conv = _names.CONV_MODULES.fullmatch(owner) is not None
    bank = _names.expert_bank(parts) if n >= 3 else None
    if bank == "torch":
        raise _ambiguous(path, shape, _TORCH_BANK, caller)
    if bank is not None:  # one LoRA per expert (per layer too where a scan stacked them): the leading axes
        return Layout("s" * (n - 2) + ("oi" if leaf == "weight" else "io"))
    if leaf == "weight":  # PyTorch / Equinox convention: (out, in, *window)
        if n == 2:
            return Layout("oi")
        if conv and n in (3, 4):
            return Layout("oi" + "w" * (n - 2))
        raise _ambiguous(
            path, shape, f"a {n}-D 'weight' is neither a linear (out, in) nor a named 1-D/2-D conv", caller
        )
    # Flax convention: (*fan_in, *fan_out).
    if n == 2:
        return Layout("io")
    if conv and n in (3, 4):
        return Layout("w" * (n - 2) + "io")
    geometry = (attention or {}).get("/".join(owner_parts[:-1]))
    if n == 3 and _QKV.fullmatch(module):
        return _by_sizes(path, shape, _ONE_IN, "query/key/value", caller, geometry)
    if n == 3 and _OUT.fullmatch(module):
        return _by_sizes(path, shape, _ONE_OUT, "attention output", caller, geometry)
    raise _ambiguous(path, shape, f"a {n}-D kernel could be stacked layers, multi-head or a convolution", caller)


_TORCH_BANK = (
    "a bank of experts stored as transformers 5 does (bare 'gate_up_proj'/'down_proj' in 'experts') is "
    "(experts, out, in) 'soi' in Qwen3-MoE, Mixtral and DeepSeek but (experts, in, out) 'sio' in Llama 4 and gpt-oss"
)


def parse_layout(spec: LayoutSpec, path: KeyPath, shape: tuple[int, ...], caller: str = "lorafy") -> Layout:
    """The :class:`Layout` a user's spec gives a kernel of ``shape`` (``"s..."`` infers the rest)."""
    if isinstance(spec, Layout):
        layout = spec
    elif isinstance(spec, str) and spec.endswith("..."):
        prefix = spec[:-3]
        if len(prefix) >= len(shape):
            raise ValueError(f"{caller}: layout {spec!r} for {path_str(path)} leaves no axes of {shape} to infer.")
        rest = infer_layout(path, shape[len(prefix) :], caller)
        layout = Layout(prefix + rest.axes)
    elif isinstance(spec, str):
        layout = Layout(spec)
    else:
        raise TypeError(f"{caller}: layout for {path_str(path)} must be a string or lorajax.Layout, got {spec!r}.")
    if layout.ndim != len(shape):
        raise ValueError(
            f"{caller}: layout {layout.axes!r} has {layout.ndim} axes but {path_str(path)} has shape {shape}."
        )
    return layout


def layout_spec(layout: Any, path: KeyPath, leaf: Any, caller: str = "lorafy") -> LayoutSpec | None:
    """The spec the user's ``layout=`` argument gives this parameter, or None where it says nothing."""
    if callable(layout):
        return layout(path, leaf)
    if isinstance(layout, Mapping):
        # An exact path (as lorajax.infer_layouts returns) is looked up, never read as a regex.
        exact = layout.get(path_str(path))
        return exact if exact is not None else _targets.match_pattern(dict(layout), path)
    if layout is not None:
        raise TypeError(
            f"{caller}: layout must be a dict {{regex: spec}} or a callable (path, leaf) -> spec; got {layout!r}."
        )
    return None


def resolve_layout(
    layout: Any, path: KeyPath, leaf: Any, caller: str = "lorafy", attention: AttentionShapes | None = None
) -> Layout:
    """The layout of one kernel: the user's ``layout=`` spec for it, else inferred from names and shape."""
    shape = tuple(leaf.shape)
    spec = layout_spec(layout, path, leaf, caller)
    return infer_layout(path, shape, caller, attention) if spec is None else parse_layout(spec, path, shape, caller)


def known_kernels(layout: Any, leaves: Sequence[tuple[KeyPath, Any]]) -> _targets.Known | None:
    """The kernels ``layout=`` names by exact path (all of them for :func:`lorajax.infer_layouts`), or None."""
    if not isinstance(layout, Mapping):
        return None
    names = {path_str(p) for p, _ in leaves}
    exact = {k: v for k, v in layout.items() if k in names}
    heads = frozenset(getattr(layout, "heads", ()))
    return _targets.Known(exact, heads) if exact or heads else None


def factor_names(base_box: Any, layout: Layout) -> tuple[tuple[Any, ...] | None, tuple[Any, ...] | None]:
    """Flax per-axis sharding names of ``(a, b)`` for a boxed base (``None, None`` where it has none)."""
    names = _boxes.names(base_box)
    if names is None:
        return None, None
    return layout.project(names, None)
