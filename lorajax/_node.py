"""The LoRA node: a frozen base kernel plus its low-rank factors."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from lorajax import _boxes

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

    def a_shape(self, shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
        """Shape of the ``a`` factor for a kernel of ``shape``."""
        return tuple(shape[k] for k in self.stack) + tuple(shape[k] for k in self.fan_in) + (rank,)

    def b_shape(self, shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
        """Shape of the ``b`` factor for a kernel of ``shape``."""
        return tuple(shape[k] for k in self.stack) + (rank,) + tuple(shape[k] for k in self.fan_out)

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


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA (Kalajdzievski 2023), as PEFT scales."""
    return alpha / (math.sqrt(rank) if rslora else rank)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRA:
    """A targeted kernel: frozen ``base`` plus trainable factors ``a`` and ``b``.

    The effective kernel is ``base + scale * a @ b``, contracted back into the
    base's layout (see :class:`Layout`). ``base`` is the caller's very array (or
    its Flax box), never a copy. ``rank``, ``alpha``, ``layout`` and ``rslora``
    are static pytree metadata, so they are never trained and changing them
    retraces.

    With ``per_example=True`` (made by :func:`lorajax.select` for mixed-adapter
    batches) ``a`` and ``b`` carry one extra leading axis that indexes the
    examples of the batch, and only the factored path can run the node.

    Children may be Flax boxes (``nn.Partitioned``, ``nnx.Variable``); ``a`` and
    ``b`` then carry boxes of the same type whose axis names follow the base's.

    >>> import jax.numpy as jnp
    >>> node = LoRA(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)), rank=2, alpha=4.0, layout=Layout("io"))
    >>> node.scale
    2.0
    """

    base: Any
    a: Any
    b: Any
    rank: int = dataclasses.field(metadata=dict(static=True))
    alpha: float = dataclasses.field(metadata=dict(static=True))
    layout: Layout = dataclasses.field(metadata=dict(static=True))
    rslora: bool = dataclasses.field(default=False, metadata=dict(static=True))
    per_example: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def scale(self) -> float:
        """``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA."""
        return lora_scale(self.alpha, self.rank, self.rslora)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the (merged) kernel."""
        return tuple(_boxes.unbox(self.base).shape)

    @property
    def dtype(self) -> Any:
        """Dtype of the (merged) kernel."""
        return _boxes.unbox(self.base).dtype


def is_lora(x: Any) -> bool:
    """True for a :class:`LoRA` node; handy as ``is_leaf`` in tree maps.

    >>> jax.tree.map(lambda x: is_lora(x), {"w": 1})
    {'w': False}
    """
    return isinstance(x, LoRA)
