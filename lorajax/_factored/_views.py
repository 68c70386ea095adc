"""Rules for the views of a kernel: reshape, transpose, convert, squeeze, slice, broadcast, dynamic_slice.

A view of a :class:`~lorajax._factored._ref.KernelRef` is again a ``KernelRef``: the base is
viewed as the primitive says, and the factors follow (each kernel axis is labelled with the
factor axis it comes from). A view that mixes stacked, fan-in and fan-out axes cannot be
followed, so its rule declines and the kernel is formed for that use.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import lax

from lorajax._factored._ref import KernelRef, drop_unit, reshape_factors, slice_factors
from lorajax._factored._registry import register_rule


def _single(invals: list) -> KernelRef | None:
    ref = invals[0]
    return ref if len(invals) == 1 and isinstance(ref, KernelRef) else None


@register_rule("convert_element_type")
def convert_element_type(interp: Any, eqn: Any, invals: list) -> list | None:
    ref = _single(invals)
    return None if ref is None else [ref.replace(dtype=jnp.dtype(eqn.params["new_dtype"]))]


@register_rule("copy", "copy_p")
def copy(interp: Any, eqn: Any, invals: list) -> list | None:
    ref = _single(invals)
    return None if ref is None else [ref]


@register_rule("transpose")
def transpose(interp: Any, eqn: Any, invals: list) -> list | None:
    ref = _single(invals)
    if ref is None:
        return None
    perm = eqn.params["permutation"]
    labels = tuple(ref.labels[k] for k in perm)
    return [ref.replace(base=ref.base.view(lambda w: jnp.transpose(w, perm)), labels=labels)]


@register_rule("reshape")
def reshape(interp: Any, eqn: Any, invals: list) -> list | None:
    ref = _single(invals)
    p = eqn.params
    if ref is None or p.get("dimensions") is not None:
        return None
    new = reshape_factors(ref, tuple(p["new_sizes"]))
    if new is None:
        return None
    sizes = tuple(p["new_sizes"])
    return [new.replace(base=ref.base.view(lambda w: jnp.reshape(w, sizes)))]


@register_rule("squeeze")
def squeeze(interp: Any, eqn: Any, invals: list) -> list | None:
    ref = _single(invals)
    if ref is None:
        return None
    dims = [d % len(ref.labels) for d in eqn.params["dimensions"]]
    for d in dims:
        ref = drop_unit(ref, d)
    labels = tuple(lab for k, lab in enumerate(ref.labels) if k not in dims)
    return [ref.replace(base=ref.base.view(lambda w: lax.squeeze(w, dims)), labels=labels)]


@register_rule("slice")
def slice_(interp: Any, eqn: Any, invals: list) -> list | None:
    ref = _single(invals)
    if ref is None:
        return None
    p = eqn.params
    start, limit, strides = p["start_indices"], p["limit_indices"], p["strides"] or (1,) * len(ref.shape)
    base = ref.base.view(lambda w: eqn.primitive.bind(w, **p))
    for ax, (lo, hi, st) in enumerate(zip(start, limit, strides)):
        if (lo, hi, st) != (0, ref.shape[ax], 1) and ref.labels[ax][0] != "u":
            ref = slice_factors(ref, ax, lambda f, k, lo=lo, hi=hi, st=st: lax.slice_in_dim(f, lo, hi, st, k))
    return [ref.replace(base=base)]


@register_rule("broadcast_in_dim")
def broadcast_in_dim(interp: Any, eqn: Any, invals: list) -> list | None:
    ref = _single(invals)
    if ref is None:
        return None
    shape, bdims = tuple(eqn.params["shape"]), tuple(eqn.params["broadcast_dimensions"])
    # Only new unit axes can be followed: a real broadcast would repeat the kernel.
    if any(ref.shape[k] != shape[d] for k, d in enumerate(bdims)):
        return None
    if any(shape[d] != 1 for d in range(len(shape)) if d not in bdims):
        return None
    new_labels: list[tuple[str, int]] = [("u", 0)] * len(shape)
    for k, d in enumerate(bdims):
        new_labels[d] = ref.labels[k]
    return [ref.replace(base=ref.base.view(lambda w: jnp.reshape(w, shape)), labels=tuple(new_labels))]


@register_rule("dynamic_slice")
def dynamic_slice(interp: Any, eqn: Any, invals: list) -> list | None:
    ref, idx = invals[0], invals[1:]
    if not isinstance(ref, KernelRef) or any(isinstance(i, KernelRef) for i in idx):
        return None
    sizes = eqn.params["slice_sizes"]
    base = ref.base.view(lambda w, *i: eqn.primitive.bind(w, *i, **eqn.params), *idx)
    for ax, (i, n) in enumerate(zip(idx, sizes)):
        if n != ref.shape[ax] and ref.labels[ax][0] != "u":
            # Same clamping as dynamic_slice: the factor axis has the kernel axis's length.
            ref = slice_factors(ref, ax, lambda f, k, i=i, n=n: lax.dynamic_slice_in_dim(f, i, n, k))
    return [ref.replace(base=base)]
