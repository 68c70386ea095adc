"""Flax boxes (``nn.Partitioned``, ``nnx.Variable``) that wrap one array.

lorajax never requires Flax: if it was never imported, nothing can be a box.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

_NNX_NAME_KEYS = ("sharding_names", "sharding", "out_sharding")


def _flax_types() -> tuple[type, ...]:
    if "flax" not in sys.modules:
        return ()
    from flax import nnx
    from flax.core import meta

    return (meta.AxisMetadata, nnx.Variable)


def is_box(x: Any) -> bool:
    """True for a Flax metadata box or NNX Variable."""
    types = _flax_types()
    return bool(types) and isinstance(x, types)


def unbox(x: Any) -> Any:
    """The array inside a box (or ``x`` itself)."""
    if not is_box(x):
        return x
    from flax import nnx

    return x.get_value() if isinstance(x, nnx.Variable) else x.unbox()


def names(x: Any) -> tuple[Any, ...] | None:
    """Per-axis sharding names of a box, if it has them."""
    if not is_box(x):
        return None
    from flax import nnx

    if isinstance(x, nnx.Variable):
        meta = x.get_metadata()
        for key in _NNX_NAME_KEYS:
            if isinstance(meta.get(key), tuple):
                return meta[key]
        return None
    value = getattr(x, "names", None)
    return tuple(value) if value is not None else None


def rebox(box: Any, value: Any, axis_names: tuple[Any, ...] | None = None) -> Any:
    """``value`` in a box like ``box`` (or bare if ``box`` is no box), with all of the box's metadata.

    An NNX Variable comes back of the same type with every metadata entry of ``box`` (sharding names, mesh, any
    custom key); a linen box keeps its fields. ``axis_names`` replaces the box's per-axis sharding names, for a
    value whose rank differs from the box's (the LoRA factors); ``None`` keeps them, for a value of the box's
    shape (a merged or quantized kernel).
    """
    if not is_box(box):
        return value
    from flax import nnx

    if isinstance(box, nnx.Variable):
        meta = box.get_metadata()
        updates = {}
        if axis_names is not None:
            updates = {key: axis_names for key in _NNX_NAME_KEYS if isinstance(meta.get(key), tuple)}
        return box.replace(value, **updates)
    if axis_names is not None and hasattr(box, "names"):
        return dataclasses.replace(box, value=value, names=axis_names)
    return box.replace_boxed(value)
