"""Rules for ``jax.shard_map`` (expert and tensor parallelism written by hand) and its ``pvary`` casts.

A LoRA kernel passed into ``shard_map`` enters the body still symbolic: each device receives its shard of the
base and the matching shards of the factors, and the uses inside are factored by the usual rules. The kernel's
``in_specs`` entry is mapped onto the factors as :func:`lorajax.factor_specs` maps a sharding: a stacked axis (the
experts of an ``(E, d_in, d_out)`` bank) shards both factors the same way, a fan-in axis shards ``a``, a fan-out
axis shards ``b``, and the rank axis is replicated. So a body whose experts are sharded over a mesh axis runs each
device's experts through its own ``a``, ``b`` shards: no merged expert kernel, no gathered expert, and the
collectives in the body (all-to-alls of tokens, psums) run as written.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.extend import core as jcore
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from lorajax._factored._base import Base
from lorajax._factored._ref import KernelRef
from lorajax._factored._registry import register_rule


def _factor_entries(ref: KernelRef, spec: PartitionSpec) -> tuple[tuple, tuple] | None:
    """``(spec of a, spec of b)`` for the kernel view ``ref`` entering with ``spec``; ``None`` if it cannot map.

    Each view axis is labelled with the factor axis it is (``KernelRef.labels``), so the entry of a stacked axis goes
    to both factors, a fan-in axis's to ``a``, a fan-out axis's to ``b``; the rank axis is replicated. A sharded unit
    axis (one that no factor holds) has no factor axis to carry its entry.
    """
    entries = tuple(spec) + (None,) * (len(ref.shape) - len(spec))
    a: list[Any] = [None] * ref.a.ndim
    b: list[Any] = [None] * ref.b.ndim
    for label, entry in zip(ref.labels, entries):
        group = label[0]
        if group == "u":
            if entry is not None:
                return None
            continue
        if group in "si":
            a[ref.factor_axis("a", label)] = entry
        if group in "so":
            b[ref.factor_axis("b", label)] = entry
    return tuple(a), tuple(b)


def _source(ref: KernelRef) -> Any:
    """The base as one array in the view's layout: as stored when unviewed and dense, else its dense view.

    The recorded views hold the global shapes, which no longer hold for a shard, so a viewed (or quantized) base
    enters as the frozen kernel it views, in its own dtype: the base only, never ``W``.
    """
    if ref.base.unviewed() and not ref.base.quantized:
        return ref.base.source
    return ref.base.dense()


def _placed(x: Any, spec: PartitionSpec, mesh: Any) -> Any:
    """``x`` resharded to ``spec`` where its type says otherwise on a mesh with explicit axes (``shard_map`` checks).

    On such a mesh ``lorafy`` already places the factors so; factors placed otherwise (made on one device, say)
    are moved here, as ``jax.sharding.reshard`` moves any argument. Other meshes reshard inputs on their own.
    """
    typed = getattr(jax.typeof(x), "sharding", None)
    if AxisType.Explicit not in tuple(mesh.axis_types) or typed is None:
        return x
    if tuple(typed.spec) + (None,) * (x.ndim - len(typed.spec)) == tuple(spec) + (None,) * (x.ndim - len(spec)):
        return x
    return jax.sharding.reshard(x, NamedSharding(mesh, spec))


@register_rule("shard_map")
def shard_map(interp: Any, eqn: Any, invals: list) -> list | None:
    p = eqn.params
    specs = list(p["in_specs"])
    flat: list[Any] = []
    flat_specs: list[Any] = []
    slots: list[Any] = []  # per input: an index into flat (a plain value) or (ref, index of its base in flat)
    for val, spec in zip(invals, specs):
        if isinstance(val, KernelRef):
            if val.info.per_example or val.rows is not None:
                return None  # per-example factors or a bank's adapter ids would need the batch axis's sharding
            mapped = _factor_entries(val, spec)
            if mapped is None:
                return None
            sa, sb = PartitionSpec(*mapped[0]), PartitionSpec(*mapped[1])
            slots.append((val, len(flat)))
            flat += [_source(val), _placed(val.a, sa, p["mesh"]), _placed(val.b, sb, p["mesh"])]
            flat_specs += [spec, sa, sb]
            if val.key is not None:
                flat.append(val.key)
                flat_specs.append(PartitionSpec())
        else:
            slots.append(len(flat))
            flat.append(val)
            flat_specs.append(spec)
    manual = tuple(sorted(p["newly_manual_axes"], key=str))
    jaxpr = p["jaxpr"]
    jaxpr, consts = (jaxpr.jaxpr, list(jaxpr.consts)) if isinstance(jaxpr, jcore.ClosedJaxpr) else (jaxpr, [])

    def body(*local: Any) -> tuple:
        args = []
        for slot in slots:
            if not isinstance(slot, tuple):
                args.append(local[slot])
                continue
            ref, k = slot
            key = ref.key
            if key is not None:  # each shard draws its own dropout masks
                key = local[k + 3]
                for name in manual:
                    key = jax.random.fold_in(key, jax.lax.axis_index(name))
            args.append(ref.replace(base=Base.of(local[k]), a=local[k + 1], b=local[k + 2], key=key))
        return tuple(interp.eval(jaxpr, consts, args, arrays_out=True, where="shard_map output"))

    run = jax.shard_map(
        body,
        mesh=p["mesh"],
        in_specs=tuple(flat_specs),
        out_specs=tuple(p["out_specs"]),
        axis_names=frozenset(p["newly_manual_axes"]),
        check_vma=p["check_vma"],
    )
    return list(run(*flat))


@register_rule("pvary")
def pvary(interp: Any, eqn: Any, invals: list) -> list | None:
    """A kernel made varying over manual mesh axes (JAX inserts this where a replicated kernel meets sharded data).

    The base and both factors are cast, each over the axes it does not already vary over (a factor replicated
    where the kernel is sharded, such as ``a`` of a fan-out-sharded kernel, is cast over more axes than the base).
    """
    if len(invals) != 1 or not isinstance(invals[0], KernelRef):
        return None
    ref = invals[0]

    def cast(x: Any) -> Any:
        missing = tuple(a for a in eqn.params["axes"] if a not in getattr(jax.typeof(x), "vma", ()))
        return eqn.primitive.bind(x, **{**eqn.params, "axes": missing}) if missing else x

    return [ref.replace(base=Base.of(cast(_source(ref))), a=cast(ref.a), b=cast(ref.b))]
