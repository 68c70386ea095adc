"""summary: trainable and total parameter counts, per target."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from lorajax import _boxes, _targets
from lorajax._node import is_lora
from lorajax._train import mask


@dataclasses.dataclass(frozen=True)
class TargetRow:
    """One LoRA target of a :class:`Summary`."""

    path: str
    shape: tuple[int, ...]
    layout: str
    rank: int
    alpha: float
    scale: float
    params: int


@dataclasses.dataclass(frozen=True)
class Summary:
    """Parameter counts of a lorafied tree; ``print()`` it for a per-target table.

    Attributes:
        trainable: trainable parameters (LoRA factors plus any ``also`` leaves).
        total: all parameters, frozen base included.
        trainable_bytes: bytes of the trainable parameters.
        total_bytes: bytes of all parameters.
        targets: one :class:`TargetRow` per LoRA node.
    """

    trainable: int
    total: int
    trainable_bytes: int
    total_bytes: int
    targets: tuple[TargetRow, ...]

    @property
    def trainable_fraction(self) -> float:
        """``trainable / total``."""
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        head = ("target", "shape", "layout", "rank", "alpha", "scale", "params")
        rows = [
            (
                t.path,
                "x".join(map(str, t.shape)),
                t.layout,
                str(t.rank),
                f"{t.alpha:g}",
                f"{t.scale:g}",
                f"{t.params:,}",
            )
            for t in self.targets
        ]
        widths = [max(len(r[k]) for r in [head, *rows]) for k in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) if k < 3 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths)))
        lines = [fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)]
        lines.append(
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {100 * self.trainable_fraction:.4f}"
        )
        return "\n".join(lines)


def _size(x: Any) -> tuple[int, int]:
    x = _boxes.unbox(x)
    if not hasattr(x, "shape"):
        return 0, 0
    n = math.prod(x.shape)
    return n, n * np.dtype(x.dtype).itemsize


def summary(params: Any, also: Any = None) -> Summary:
    """Count trainable and total parameters, per LoRA target.

    Works on concrete arrays and on abstract trees (``jax.eval_shape`` output,
    ``ShapeDtypeStruct``), so a 70B plan costs no memory.

    Args:
        params: a pytree with :class:`LoRA` nodes.
        also: extra trainable leaves, as in :func:`lorajax.mask`.

    Returns:
        A :class:`Summary`.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> p = lorajax.lorafy({"q": {"kernel": jnp.ones((64, 64))}}, rank=4, where=["q"], key=jax.random.key(0))
        >>> s = lorajax.summary(p)
        >>> s.trainable, s.total
        (512, 4608)
    """
    flags = jax.tree.leaves(mask(params, also))
    sizes = [_size(x) for x in jax.tree.leaves(params)]
    rows = []
    for path, node in _targets.tree_paths(params, is_leaf=is_lora):
        if is_lora(node):
            n = _size(node.a)[0] + _size(node.b)[0]
            rows.append(
                TargetRow(_targets.path_str(path), node.shape, node.layout.axes, node.rank, node.alpha, node.scale, n)
            )
    return Summary(
        trainable=sum(s[0] for s, f in zip(sizes, flags) if f),
        total=sum(s[0] for s in sizes),
        trainable_bytes=sum(s[1] for s, f in zip(sizes, flags) if f),
        total_bytes=sum(s[1] for s in sizes),
        targets=tuple(rows),
    )
