"""One module's factors between PEFT's PyTorch layout and a kernel's :class:`lorajax.Layout`.

PEFT stores ``A`` as ``(r, in)`` (convs: ``(r, in, *window)``) and ``B`` as ``(out, r)``
(convs: ``(out, r, 1, ...)``); its update is ``scaling * B @ A``, which is lorajax's
``scale * a @ b`` once ``a`` and ``b`` are transposed into the kernel's layout.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from lorajax._layout import AmbiguousLayout, AttentionShapes, Layout, infer_layout
from lorajax._paths import KeyPath, path_parts, path_str


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


def peft_shapes(kind: str, layout: Layout, shape: tuple[int, ...], rank: int) -> tuple[tuple[int, ...], ...]:
    """The shapes of PEFT's ``(A, B)`` for an (unstacked) kernel of ``shape``.

    >>> peft_shapes("conv", Layout("wwio"), (3, 3, 2, 4), 2)
    ((2, 2, 3, 3), (4, 2, 1, 1))
    """
    fan_in, fan_out = layout.sizes(shape)
    if kind != "conv":
        return (rank, fan_in), (fan_out, rank)
    window = tuple(shape[k] for k in layout.fan_in if layout.axes[k] == "w")
    return (rank, shape[layout.axes.index("i")], *window), (fan_out, rank) + (1,) * len(window)


def to_ours(kind: str, A: np.ndarray, B: np.ndarray, layout: Layout, shape: tuple[int, ...]) -> tuple[Any, Any]:
    """PEFT's ``(A, B)`` as ``(a, b)`` in the layout of a kernel of ``shape`` (unstacked).

    >>> a, b = to_ours("dense", np.ones((2, 4)), np.ones((3, 2)), Layout("oi"), (3, 4))
    >>> a.shape, b.shape
    ((4, 2), (2, 3))
    """
    r = A.shape[0]
    if kind == "conv":
        a = np.transpose(A, [1 + p for p in _conv_perm(layout)] + [0])
    else:
        a = A.T
    b = B.reshape(B.shape[0], r).T
    return a.reshape(layout.a_shape(shape, r)), b.reshape(layout.b_shape(shape, r))


def to_torch(kind: str, a: np.ndarray, b: np.ndarray, layout: Layout, shape: tuple[int, ...]) -> tuple[Any, Any]:
    """Our ``(a, b)`` of an (unstacked) kernel of ``shape`` as PEFT's contiguous ``(A, B)``.

    >>> A, B = to_torch("dense", np.ones((4, 2)), np.ones((2, 3)), Layout("io"), (4, 3))
    >>> A.shape, B.shape
    ((2, 4), (3, 2))
    """
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


def unstack(layout: Layout, shape: tuple[int, ...], where: str) -> tuple[Layout, tuple[int, ...], int]:
    """``(layout, shape, count)`` of one layer of a kernel with exactly one stacked axis.

    >>> unstack(Layout("sio"), (2, 4, 3), "h/kernel")
    (Layout('io'), (4, 3), 2)
    """
    if len(layout.stack) != 1:
        raise ValueError(f"{where}: layout {layout.axes!r} needs exactly one stacked axis to map to PEFT layers")
    k = layout.stack[0]
    return Layout(layout.axes.replace("s", "")), shape[:k] + shape[k + 1 :], shape[k]


def _dense_layout(torch_style: bool, shape: tuple[int, ...], n_in: int, n_out: int, fan_in_fan_out: bool) -> Layout:
    # A PyTorch-style weight: Linear (out, in) or GPT-2 Conv1D (in, out). The shape decides; a square one
    # follows fan_in_fan_out (PEFT sets it for the whole config once any Conv1D is targeted).
    if not torch_style:
        return Layout("io")
    if shape == (n_out, n_in) and shape != (n_in, n_out):
        return Layout("oi")
    if shape == (n_in, n_out) and shape != (n_out, n_in):
        return Layout("io")
    return Layout("io") if fan_in_fan_out else Layout("oi")


def file_readings(shape: tuple[int, ...], n_in: int, n_out: int) -> list[str]:
    """Every fan-in/fan-out reading of a multi-axis kernel whose sizes are PEFT's ``(in, out)``, in kernel order.

    >>> file_readings((8, 32, 2), 32, 16)  # gemma's q_einsum (heads, d_model, head_dim), d_model != heads * head_dim
    ['oio']
    >>> file_readings((8, 32, 4), 32, 32)  # d_model == heads * head_dim: the file alone does not tell
    ['ioi', 'oio']
    """
    out = []
    for codes in itertools.product("io", repeat=len(shape)):
        if "i" in codes and "o" in codes:
            fan_in = math.prod(d for d, c in zip(shape, codes) if c == "i")
            fan_out = math.prod(d for d, c in zip(shape, codes) if c == "o")
            if (fan_in, fan_out) == (n_in, n_out):
                out.append("".join(codes))
    return out


def _settle(
    path: KeyPath,
    shape: tuple[int, ...],
    readings: list[str],
    torch_style: bool,
    caller: str,
    attention: AttentionShapes | None,
) -> Layout:
    """One of the readings the file allows: the one names and sibling kernels give, else the contiguous split."""
    try:
        named = infer_layout(path, shape, caller, attention).axes
    except ValueError:
        named = None
    if named in readings:
        return Layout(named)
    n = len(shape)
    split = [
        r
        for r in readings
        if r in {("o" * k + "i" * (n - k)) if torch_style else ("i" * k + "o" * (n - k)) for k in range(1, n)}
    ]
    if len(split) == 1:  # the DenseGeneral convention: (*fan_in, *fan_out), PyTorch's (*fan_out, *fan_in)
        return Layout(split[0])
    where = path_str(path)
    raise AmbiguousLayout(
        f"the adapter's factors fit kernel {where} with shape {shape} in more than one way: readings "
        f"{' and '.join(map(repr, readings))} give the same (in, out) sizes and the names do not pick one; state it "
        f"with layout={{{where!r}: ...}}",
        caller,
    )


def guess_layout(
    kind: str,
    path: KeyPath,
    shape: tuple[int, ...],
    A: Any,
    B: Any,
    fan_in_fan_out: bool,
    caller: str,
    attention: AttentionShapes | None = None,
) -> Layout:
    """The layout of a base kernel that a PEFT module of ``kind`` with factors ``A``, ``B`` adapts.

    A multi-axis kernel takes the one reading whose fan-in and fan-out sizes are the adapter's ``A (r, in)`` and
    ``B (out, r)``; where several fit, the names and the sibling kernels (``attention``, from
    :func:`lorajax._layout.attention_shapes`) pick one, else the contiguous split; else it raises, naming the
    kernel and the readings.

    >>> from jax.tree_util import DictKey
    >>> guess_layout("dense", (DictKey("fc"), DictKey("weight")), (3, 4), np.ones((2, 4)), np.ones((3, 2)),
    ...              False, "load_peft")
    Layout('oi')
    >>> guess_layout("dense", (DictKey("q_einsum"), DictKey("w")), (8, 32, 4), np.ones((2, 32)), np.ones((32, 2)),
    ...              False, "load_peft")
    Layout('oio')
    """
    torch_style = path_parts(path)[-1] == "weight"
    n = len(shape)
    if kind == "embed":
        return Layout("eo")
    if kind == "conv":
        w = "w" * (n - 2)
        return Layout("oi" + w) if torch_style else Layout(w + "io")
    n_in, n_out = A.shape[1], B.shape[0]
    if n == 2:
        return _dense_layout(torch_style, shape, n_in, n_out, fan_in_fan_out)
    # Multi-axis kernels (DenseGeneral, einsums): the readings PEFT's (in, out) sizes allow.
    readings = file_readings(shape, n_in, n_out)
    if len(readings) == 1:
        return Layout(readings[0])
    if readings:
        return _settle(path, shape, readings, torch_style, caller, attention)
    return infer_layout(path, shape, caller, attention)  # no reading fits: the shape check names the mismatch
