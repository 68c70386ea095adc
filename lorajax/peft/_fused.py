"""Fused kernels: one kernel whose leading axis holds several Hugging Face modules (a tuple name).

Gemma's ``kv_einsum`` ``(2, K, D, H)`` is HF's ``k_proj`` and ``v_proj``; its ``gating_einsum`` ``(2, D, F)`` is
``gate_proj`` and ``up_proj``. A name map gives such a kernel a tuple of module names, one per slice of the leading
(fused) axis. Both ways are exact:

- a node *stacked* over the fused axis (layout ``"s..."``, what :func:`lorajax.load_peft` makes on a plain
  kernel) holds one ``(a, b)`` per slice: each slice is one PEFT module, as it is;
- a node whose fused axis is *fan-out* (layout ``"o..."``, what :func:`lorajax.infer_layouts` reads off
  ``'BSD,CKDH->CBSKH'``) shares one ``a`` across the slices: written, each module gets that shared ``A`` and its
  slice of ``b``; loaded, the modules' factors form a rank ``r_1 + r_2 + ...`` block (``a`` their ``A``'s side by
  side, ``b`` block-diagonal over the slices, each module's scale folded into its block, ``alpha = rank``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from lorajax._layout import Layout


class Slice(NamedTuple):
    """One module's part of a fused node: the slice's layout and shape, its factors (and DoRA magnitude)."""

    layout: Layout
    shape: tuple[int, ...]
    a: np.ndarray
    b: np.ndarray
    magnitude: np.ndarray | None


def _check(where: str, layout: Layout, shape: tuple[int, ...], names: tuple[str, ...]) -> Layout:
    if len(shape) < 3 or shape[0] != len(names):
        raise ValueError(
            f"{where}: name_map gives {len(names)} modules {names} (one per slice of the leading axis) but the "
            f"kernel has shape {shape}; a fused kernel's leading axis holds one slice per module"
        )
    inner = layout.axes[1:]
    if layout.axes[0] not in "so" or "s" in inner:
        raise ValueError(
            f"{where}: layout {layout.axes!r} does not keep the fused leading axis apart (a stacked 's' axis: one "
            f"(a, b) per slice, or a fan-out 'o' axis: one shared a); cannot split it into the modules {names}"
        )
    return Layout(inner)


def fused_slices(
    where: str,
    layout: Layout,
    shape: tuple[int, ...],
    a: np.ndarray,
    b: np.ndarray,
    magnitude: np.ndarray | None,
    names: tuple[str, ...],
) -> list[tuple[str, Slice]]:
    """The PEFT modules of a fused node: per slice of a stacked node, or the shared ``a`` of a fan-out one.

    >>> parts = fused_slices("kv", Layout("soio"), (2, 1, 4, 3), np.ones((2, 4, 2)), np.ones((2, 2, 1, 3)), None,
    ...                      ("k_proj", "v_proj"))
    >>> [(n, s.layout, s.a.shape, s.b.shape) for n, s in parts]
    [('k_proj', Layout('oio'), (4, 2), (2, 1, 3)), ('v_proj', Layout('oio'), (4, 2), (2, 1, 3))]
    """
    inner = _check(where, layout, shape, names)
    out = []
    for j, name in enumerate(names):
        m = None if magnitude is None else magnitude[j]  # the fused axis leads the magnitude too
        if layout.axes[0] == "s":
            out.append((name, Slice(inner, shape[1:], a[j], b[j], m)))
        else:  # b is (r, C, ...): slice j of the fan-out, with the one shared a
            out.append((name, Slice(inner, shape[1:], a, b[:, j], m)))
    return out


class Block(NamedTuple):
    """One fan-out-fused node's factors in block form (scale 1: ``alpha == rank``)."""

    a: np.ndarray
    b: np.ndarray
    rank: int
    magnitude: np.ndarray | None


def block_factors(
    where: str, layout: Layout, shape: tuple[int, ...], slices: dict[int, tuple[Any, Any, float, Any]]
) -> Block:
    """A fan-out-fused node (layout ``"o..."``) from its modules' ``{slice: (a, b, scale, magnitude)}``.

    ``a`` is the modules' ``a`` side by side (rank ``r_1 + r_2 + ...``); ``b`` is block-diagonal over the slices,
    each block times its module's scale, so ``a @ b`` at scale 1 is every module's update in its slice. Slices the
    adapter leaves out are zero (DoRA needs every slice: its magnitude is the whole kernel's).

    >>> blk = block_factors("kv", Layout("ooio"), (2, 1, 4, 3),
    ...                     {0: (np.ones((4, 2)), np.ones((2, 1, 3)), 0.5, None)})
    >>> blk.a.shape, blk.b.shape, blk.rank, float(blk.b[:, 1].sum()), float(blk.b[:, 0].sum())
    ((4, 2), (2, 2, 1, 3), 2, 0.0, 3.0)
    """
    count = shape[0]
    _check(where, layout, shape, tuple(str(j) for j in range(count)))
    bad = sorted(j for j in slices if j >= count)
    if bad:
        raise ValueError(f"{where}: slices {bad} are out of range for a fused axis of {count}")
    order = sorted(slices)
    dtype = np.result_type(*[np.asarray(slices[j][0]).dtype for j in order])
    ranks = [int(np.shape(slices[j][0])[-1]) for j in order]
    rank = sum(ranks)
    a = np.concatenate([np.asarray(slices[j][0], dtype) for j in order], axis=-1)
    inner_b = np.shape(slices[order[0]][1])[1:]
    b = np.zeros((rank, count, *inner_b), dtype)
    offset = 0
    for j, r in zip(order, ranks, strict=True):
        scaled = np.asarray(slices[j][1], np.float32) * np.float32(slices[j][2])
        b[offset : offset + r, j] = scaled.astype(dtype)
        offset += r
    mags = [slices[j][3] for j in order]
    if all(m is None for m in mags):
        return Block(a, b, rank, None)
    if any(m is None for m in mags) or order != list(range(count)):
        missing = sorted(set(range(count)) - set(order))
        raise ValueError(
            f"{where}: a DoRA adapter must name every slice of a fused kernel (its magnitude covers the whole "
            f"kernel); slices {missing} are missing"
        )
    return Block(a, b, rank, np.stack([np.asarray(m) for m in mags]))
