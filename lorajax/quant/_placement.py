"""Where a quantized kernel's codes and scales live on a mesh: derived from the dense kernel's sharding, and back.

The codes hold the kernel in PyTorch's ``(out, in, ...)`` order, one row per stacked slice, flattened (NF4) or as
``(slices, rows, cols)`` (int8, fp8). A mesh axis that shards the kernel carries over to the codes wherever the
flattening keeps each device's share contiguous:

* the slices axis is sharded like the kernel's first stacked axis (the other stacked axes unsharded);
* NF4: the flat codes and their absmaxes are sharded like the first axis in PyTorch order (the first fan-out
  axis; an embedding's rows) when the axes after it are unsharded and each device's share is whole bytes and whole
  blocks (whole 256-absmax blocks for the double-quantization scales, which are replicated otherwise);
* int8 and fp8: the rows like that first axis, the columns like the next one when the later ones are unsharded.

* NF4 of a kernel sharded on its fan-in axes (which PyTorch's order puts second, so each device's columns are
  strided through the flat codes): :func:`lorajax.quantize` keeps the codes per row, ``(slices, rows, cols / 2)``
  with absmaxes ``(slices, rows, cols / block)`` (:func:`wants_rows`), laid out like int8's, the columns sharded
  like the fan-in axes where each device's share of a row is whole blocks; the double-quantization scales, whose
  256-absmax blocks run across rows, stay replicated.

Anything else is replicated along that axis of the codes. Quantizing and dequantizing give the same bits however the
codes are placed; placement decides only what each device stores and whether dequantizing moves data.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from lorajax.quant._blockwise import NESTED_BLOCK
from lorajax.quant._kernel import BLOCK_SIZES, QuantizedKernel, is_row_form, torch_axes


def _axis_size(entry: Any, mesh: Mesh | AbstractMesh | None) -> int | None:
    """How many devices a spec entry splits an axis over (None: unknown without a mesh)."""
    if entry is None:
        return 1
    if mesh is None:
        return None
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[n] for n in names)


def _group(entries: list[Any], sizes: list[int], mesh: Mesh | AbstractMesh | None, unit: int = 1) -> Any:
    """The entry of a flattened group of axes: its first axis's, if the rest are unsharded and each share aligns.

    ``unit`` is what each device's share of the flat axis must be a multiple of (2 for packed NF4 codes, the block
    size for absmaxes). Without a mesh the share is ``(first / devices) * rest``, a multiple of ``unit`` for any
    number of devices dividing ``first`` exactly when ``rest`` is.
    """
    if not entries or entries[0] is None or any(e is not None for e in entries[1:]):
        return None
    rest = math.prod(sizes[1:])
    devices = _axis_size(entries[0], mesh)
    if devices is None:
        return entries[0] if rest % unit == 0 else None
    if sizes[0] % devices or (sizes[0] // devices * rest) % unit:
        return None
    return entries[0]


def _entries(spec: PartitionSpec | None, ndim: int) -> tuple[Any, ...]:
    entries = tuple(spec) if spec is not None else ()
    return entries + (None,) * (ndim - len(entries))


def wants_rows(
    spec: PartitionSpec | None,
    shape: tuple[int, ...],
    layout: Any,
    block_size: int,
    mesh: Mesh | AbstractMesh | None,
    name: str = "kernel",
) -> bool:
    """Whether NF4 codes of a kernel sharded by ``spec`` on ``mesh`` take the row form (see ``is_row_form``).

    They do when the fan-in axes (those after the first in PyTorch's order) are sharded and each device's share of
    a row is whole blocks. When it is not, but another of bitsandbytes' block sizes would make it so, the codes
    could not be sharded as the kernel is: a ``ValueError`` names that block size. Otherwise (no block size fits,
    or no mesh to check against) the flat form is kept and those axes of the codes are replicated.
    """
    if mesh is None:
        return False
    perm = torch_axes(layout)
    entries = [None if _axis_size(e, mesh) == 1 else e for e in _entries(spec, len(shape))]  # one device: unsharded
    te = [entries[k] for k in perm]
    ts = [shape[k] for k in perm]
    k = len(layout.stack)
    if all(e is None for e in te[k + 1 :]):
        return False
    if _group(te[k + 1 :], ts[k + 1 :], mesh, block_size) is not None:
        return True
    if _group(te[k + 1 :], ts[k + 1 :], mesh) is None:
        return False  # a later fan-in axis sharded: no contiguous share of a row to align blocks to
    share = ts[k + 1] // (_axis_size(te[k + 1], mesh) or 1) * math.prod(ts[k + 2 :])
    fits = [b for b in BLOCK_SIZES if share % b == 0]
    if not fits:
        return False
    below = [b for b in fits if b < block_size]
    use = max(below) if below else min(fits)  # the nearest size that aligns, finer blocks first
    raise ValueError(
        f"quantize: {name} with shape {tuple(shape)} is sharded {spec} along its fan-in axes, {share} weights of "
        f"each row a device, which is not a whole number of blocks of block_size={block_size}; its NF4 codes "
        f"would be replicated on every device. Use block_size={use} (any of {fits} aligns), or shard that kernel "
        "on its fan-out axis."
    )


def code_specs(
    spec: PartitionSpec | None, q: QuantizedKernel, mesh: Mesh | AbstractMesh | None = None
) -> QuantizedKernel:
    """``q`` with a ``PartitionSpec`` for each of its codes, scales, nested absmaxes and offset.

    ``spec`` is the dense kernel's (padded with ``None``, as JAX does); ``mesh``, when known, lets the alignment of
    each device's share be checked exactly (without it, only what holds for any mesh is sharded).

    >>> import jax, jax.numpy as jnp, lorajax
    >>> q = lorajax.quantize({"fc": jax.ShapeDtypeStruct((128, 512), jnp.float32)}, where=lambda p, x: True)["fc"]
    >>> s = code_specs(PartitionSpec(None, "tp"), q)  # fan-out sharded
    >>> s.codes, s.scales, s.nested, s.offset
    (P(None, 'tp'), P(None, 'tp'), P(None, None), P(None,))
    """
    entries = _entries(spec, len(q.shape))
    perm = torch_axes(q.layout)
    te = [entries[k] for k in perm]
    ts = [q.shape[k] for k in perm]
    k = len(q.layout.stack)
    lead = _group(te[:k], ts[:k], mesh)
    if is_row_form(q):  # (slices, rows, cols / 2): rows like the first axis, cols like the fan-in axes, whole blocks
        rows = _group(te[k : k + 1], ts[k : k + 1], mesh)
        if mesh is None:  # the row form itself says the blocks align with the fan-in shards (see wants_rows)
            cols = te[k + 1] if all(e is None for e in te[k + 2 :]) else None
        else:
            cols = _group(te[k + 1 :], ts[k + 1 :], mesh, q.block_size)
        out = dataclasses.replace(q, codes=PartitionSpec(lead, rows, cols), scales=PartitionSpec(lead, rows, cols))
        if q.nested is None:
            return out
        return dataclasses.replace(out, nested=PartitionSpec(lead, None), offset=PartitionSpec(lead))
    if q.kind == "nf4":
        codes = _group(te[k:], ts[k:], mesh, 2)
        scales = _group(te[k:], ts[k:], mesh, q.block_size)
        out = dataclasses.replace(q, codes=PartitionSpec(lead, codes), scales=PartitionSpec(lead, scales))
        if q.nested is None:
            return out
        nested = _group(te[k:], ts[k:], mesh, q.block_size * NESTED_BLOCK)
        return dataclasses.replace(out, nested=PartitionSpec(lead, nested), offset=PartitionSpec(lead))
    rows = _group(te[k : k + 1], ts[k : k + 1], mesh)
    cols = _group(te[k + 1 :], ts[k + 1 :], mesh)
    return dataclasses.replace(q, codes=PartitionSpec(lead, rows, cols), scales=PartitionSpec(lead, rows))


def code_shardings(sharding: Any, q: QuantizedKernel) -> QuantizedKernel | None:
    """``q`` with a sharding for each of its arrays, derived from the dense kernel's ``sharding``.

    A ``NamedSharding`` gives ``NamedSharding`` s on its mesh (see :func:`code_specs`); a fully replicated sharding
    (one device, or every device holding the whole kernel) is used for every array; anything else gives None
    (placement left to JAX).
    """
    if isinstance(sharding, NamedSharding):
        specs = code_specs(sharding.spec, q, sharding.mesh)
        named = lambda s: None if s is None else NamedSharding(sharding.mesh, s)
        return dataclasses.replace(
            specs,
            codes=named(specs.codes),
            scales=named(specs.scales),
            nested=named(specs.nested),
            offset=named(specs.offset),
        )
    if sharding is not None and getattr(sharding, "is_fully_replicated", False):
        on = lambda x: None if x is None else sharding
        return dataclasses.replace(q, codes=sharding, scales=sharding, nested=on(q.nested), offset=on(q.offset))
    return None


def dense_spec(codes_spec: PartitionSpec | None, q: QuantizedKernel) -> PartitionSpec:
    """The dense kernel's ``PartitionSpec`` that :func:`code_specs` maps onto ``codes_spec`` (its inverse).

    >>> import jax, jax.numpy as jnp, lorajax
    >>> q = lorajax.quantize({"fc": jax.ShapeDtypeStruct((128, 512), jnp.float32)}, where=lambda p, x: True)["fc"]
    >>> dense_spec(PartitionSpec(None, "tp"), q)
    P(None, 'tp')
    """
    codes = tuple(codes_spec) if codes_spec is not None else ()
    flat = q.kind == "nf4" and not is_row_form(q)
    codes = codes + (None,) * ((2 if flat else 3) - len(codes))
    perm = torch_axes(q.layout)
    k = len(q.layout.stack)
    entries: list[Any] = [None] * len(q.shape)
    if k:
        entries[perm[0]] = codes[0]
    entries[perm[k]] = codes[1]
    if not flat and len(perm) > k + 1:
        entries[perm[k + 1]] = codes[2]
    return PartitionSpec(*entries)


def dense_sharding(q: QuantizedKernel) -> Any:
    """The sharding of the dense kernel ``q`` stands for, read from its codes' (None when they have none).

    Concrete codes and ``ShapeDtypeStruct`` codes with a sharding both work; a ``NamedSharding`` maps back through
    :func:`dense_spec`, a fully replicated one is returned as it is.
    """
    sharding = getattr(q.codes, "sharding", None)
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, dense_spec(sharding.spec, q))
    if sharding is not None and getattr(sharding, "is_fully_replicated", False):
        return sharding
    return None
