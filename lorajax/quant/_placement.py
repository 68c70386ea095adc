"""Where a quantized kernel's codes and scales live on a mesh: derived from the dense kernel's sharding, and back.

The codes hold the kernel in PyTorch's ``(out, in, ...)`` order, one row per stacked slice, flattened (NF4) or as
``(slices, rows, cols)`` (int8, fp8). A mesh axis that shards the kernel carries over to the codes wherever the
flattening keeps each device's share contiguous:

* the slices axis is sharded like the kernel's first stacked axis (the other stacked axes unsharded);
* NF4: the flat codes and their absmaxes are sharded like the first axis in PyTorch order (the first fan-out
  axis; an embedding's rows) when the axes after it are unsharded and each device's share is whole bytes and whole
  blocks (whole 256-absmax blocks for the double-quantization scales, which are replicated otherwise);
* int8 and fp8: the rows like that first axis, the columns like the next one when the later ones are unsharded.

Anything else is replicated along that axis of the codes: a Dense kernel sharded on its fan-in axis (which
PyTorch's order puts second, so each device's columns are strided through the flat codes) keeps its NF4 codes
replicated, and its int8/fp8 codes sharded by columns. Quantizing and dequantizing give the same bits however the
codes are placed; placement decides only what each device stores and whether dequantizing moves data.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from lorajax.quant._blockwise import NESTED_BLOCK
from lorajax.quant._kernel import QuantizedKernel, torch_axes


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
    entries = tuple(spec) if spec is not None else ()
    entries = entries + (None,) * (len(q.shape) - len(entries))
    perm = torch_axes(q.layout)
    te = [entries[k] for k in perm]
    ts = [q.shape[k] for k in perm]
    k = len(q.layout.stack)
    lead = _group(te[:k], ts[:k], mesh)
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
    codes = codes + (None,) * ((2 if q.kind == "nf4" else 3) - len(codes))
    perm = torch_axes(q.layout)
    k = len(q.layout.stack)
    entries: list[Any] = [None] * len(q.shape)
    if k:
        entries[perm[0]] = codes[0]
    entries[perm[k]] = codes[1]
    if q.kind != "nf4" and len(perm) > k + 1:
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
