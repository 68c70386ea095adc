"""The quantized kernel: a pytree node holding codes and scales, and its (de)quantization.

Codes and scales are stored in PyTorch's weight order, one row per stacked
slice: a kernel of layout ``"io"`` is quantized as its transpose ``(out, in)``
flattened row-major, a conv ``"wwio"`` as ``(out, in, kh, kw)``, an embedding
``"eo"`` as ``(rows, dim)``, and a stacked ``"sio"`` kernel as one ``(out, in)``
weight per layer. So the blocks run along the fan-in axes exactly where
bitsandbytes puts them for the same PyTorch weight, and a layer quantized by
either dequantizes to the same values.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorajax._layout import Layout
from lorajax.quant import _blockwise

KINDS = ("nf4", "int8", "fp8")
#: The block sizes bitsandbytes' 4-bit kernels accept.
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKernel:
    """A frozen kernel stored quantized: ``codes`` and ``scales`` (children) plus static metadata.

    ``kind`` is ``"nf4"`` (4-bit NormalFloat, two codes per byte, one absmax per
    ``block_size`` values), ``"int8"`` (one absmax per output channel) or
    ``"fp8"`` (float8 e4m3 with one scale per output channel). With double
    quantization (NF4 only) ``scales`` are uint8 codes of the absmaxes, and
    ``nested`` / ``offset`` hold their float32 scales and mean. ``shape``,
    ``dtype`` and ``layout`` describe the dense kernel it stands for, so a
    :class:`lorajax.LoRA` node can use it as its base. Make one with
    :func:`lorajax.quantize` or :func:`lorajax.load_bnb_4bit`.

    >>> import jax.numpy as jnp, lorajax
    >>> q = lorajax.quantize({"fc": {"kernel": jnp.ones((64, 8))}}, where=["fc"])["fc"]["kernel"]
    >>> q.kind, q.shape, q.codes.shape, q.bits_per_param > 4
    ('nf4', (64, 8), (1, 256), True)
    """

    codes: Any
    scales: Any
    nested: Any = None
    offset: Any = None
    shape: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    dtype: Any = dataclasses.field(default=np.dtype("float32"), metadata=dict(static=True))
    layout: Layout = dataclasses.field(default=Layout("io"), metadata=dict(static=True))
    kind: str = dataclasses.field(default="nf4", metadata=dict(static=True))
    block_size: int = dataclasses.field(default=64, metadata=dict(static=True))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        """Number of weights of the dense kernel."""
        return math.prod(self.shape)

    @property
    def double_quant(self) -> bool:
        """Whether the NF4 absmaxes are themselves quantized (QLoRA's double quantization)."""
        return self.nested is not None

    @property
    def nbytes(self) -> int:
        """Bytes of codes and scales together (what the kernel occupies in memory)."""
        leaves = jax.tree.leaves((self.codes, self.scales, self.nested, self.offset))
        return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)

    @property
    def bits_per_param(self) -> float:
        """Storage bits per weight, scales included."""
        return 8 * self.nbytes / self.size


def is_quantized(x: Any) -> bool:
    """True for a :class:`QuantizedKernel`; handy as ``is_leaf``.

    >>> is_quantized(1.0)
    False
    """
    return isinstance(x, QuantizedKernel)


def torch_axes(layout: Layout) -> tuple[int, ...]:
    """Kernel axes in PyTorch's weight order: stacked, then ``(out, in, *window)`` (embeddings ``(rows, dim)``)."""
    axes = layout.axes
    pick = lambda codes: tuple(k for k, c in enumerate(axes) if c in codes)
    if layout.kind == "embed":
        return pick("s") + pick("e") + pick("o")
    return pick("s") + pick("o") + pick("i") + pick("w")


def _torch_view(x: jax.Array, layout: Layout) -> tuple[jax.Array, tuple[int, ...]]:
    """``x`` in PyTorch order as ``(slices, rows, cols)`` and that order's shape."""
    perm = torch_axes(layout)
    t = jnp.transpose(x, perm)
    stacked = len(layout.stack)
    rows = t.shape[stacked]
    return t.reshape(math.prod(t.shape[:stacked]), rows, -1), t.shape


def quantize_kernel(
    x: jax.Array, layout: Layout, kind: str, block_size: int, double_quant: bool, rows: bool = False
) -> QuantizedKernel:
    """Quantize one dense kernel (arguments already checked by :func:`lorajax.quantize`).

    With ``rows`` (NF4 whose blocks divide each row, see :func:`is_row_form`) the codes are kept as
    ``(slices, rows, cols / 2)`` and the absmaxes as ``(slices, rows, cols / block_size)``: the same bits, reshaped so
    that a fan-in sharding of the kernel can carry over to them.
    """
    view, _ = _torch_view(x, layout)
    slices = view.shape[0]
    nested = offset = None
    if kind == "nf4":
        codes, scales = _blockwise.nf4_quantize(view.reshape(slices, -1), block_size)
        if double_quant:
            scales, nested, offset = _blockwise.dq_quantize(scales)
    elif kind == "int8":
        codes, scales = _blockwise.int8_quantize(view)
    else:
        codes, scales = _blockwise.fp8_quantize(view)
    if rows and kind == "nf4":
        codes = codes.reshape(slices, view.shape[1], -1)
        scales = scales.reshape(slices, view.shape[1], -1)
    return QuantizedKernel(
        codes,
        scales,
        nested,
        offset,
        shape=tuple(int(d) for d in x.shape),
        dtype=np.dtype(x.dtype),
        layout=layout,
        kind=kind,
        block_size=block_size if kind == "nf4" else 0,
    )


def is_row_form(q: QuantizedKernel) -> bool:
    """Whether NF4 codes are kept per row, ``(slices, rows, cols / 2)``, rather than flat ``(slices, size / 2)``.

    The row form holds the same bits (every block lies inside one row); :func:`lorajax.quantize` picks it for a
    kernel sharded along its fan-in axes, so that each device's columns are a contiguous slice of each code row.
    """
    return q.kind == "nf4" and len(q.codes.shape) == 3


def absmax(q: QuantizedKernel) -> jax.Array:
    """The float32 NF4 absmaxes, shaped like ``q.scales``, undoing double quantization."""
    if q.nested is None:
        return jnp.asarray(q.scales, jnp.float32)
    if is_row_form(q):
        return _blockwise.dq_dequantize_rows(q.scales, q.nested, q.offset)
    return _blockwise.dq_dequantize(q.scales, q.nested, q.offset)


def dense(q: QuantizedKernel, dtype: Any = None) -> jax.Array:
    """The dense kernel in its layout: float32 values rounded once to ``dtype`` (default: the kernel's own)."""
    perm = torch_axes(q.layout)
    torch_shape = tuple(q.shape[k] for k in perm)
    if q.kind == "nf4":
        k = len(q.layout.stack) + is_row_form(q)  # the row form dequantizes each row on its own
        values = _blockwise.nf4_dequantize(q.codes, absmax(q), math.prod(torch_shape[k:]), q.block_size)
    elif q.kind == "int8":
        values = _blockwise.int8_dequantize(q.codes, q.scales)
    else:
        values = _blockwise.fp8_dequantize(q.codes, q.scales)
    t = values.astype(q.dtype if dtype is None else dtype).reshape(torch_shape)
    return jnp.transpose(t, tuple(int(k) for k in np.argsort(perm)))


def layer_slices(q: QuantizedKernel) -> tuple[Any, Any]:
    """``(leaves, one_layer)`` to scan a kernel whose first axis is stacked, one layer at a time.

    ``leaves`` are the codes and scales with that axis leading (slicing one gives one layer's);
    ``one_layer(sliced_leaves)`` is the :class:`QuantizedKernel` of one layer. Every per-layer array
    already has one row per stacked slice (:func:`quantize_kernel`), so no layer's blocks straddle
    another's and the slices dequantize exactly as the whole does.
    """
    if not q.layout.axes.startswith("s"):
        raise ValueError(f"layer_slices: the kernel's layout {q.layout.axes!r} does not start with a stacked axis.")
    n = q.shape[0]
    leaves = jax.tree.leaves(q)
    split = [x.reshape((n, x.shape[0] // n) + tuple(x.shape[1:])) for x in leaves]
    one = dataclasses.replace(q, shape=q.shape[1:], layout=Layout(q.layout.axes[1:]))
    one_def = jax.tree.structure(one)
    return split, lambda sliced: jax.tree.unflatten(one_def, sliced)
