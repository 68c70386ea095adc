"""Mixture-of-experts dispatch in the factored interpreter: expert gathers and grouped matmuls.

An expert bank is a kernel with a stacked expert axis (``(E, d_in, d_out)``, layout ``sio``: one LoRA per
expert, ``A: (E, d_in, r)``, ``B: (E, r, d_out)``). Three dispatch forms reach it:

* a dense all-experts einsum (``td,edf->tef``, MaxText's capacity form ``EBCM,EMH->EBCH``): a ``dot_general``
  with the expert axis free or batched, which the einsum form of the consumer rules already runs;
* a gather of expert weights by index (``W[idx]``, ``idx`` the top-k experts of each token): :func:`expert_gather`
  keeps it a *view*. The factors are gathered (``A[idx]``, ``B[idx]``: tokens·k·r·(d_in + d_out) numbers), the
  index axes become stacked axes of the view, and the ``dot_general`` that follows runs
  ``x·W[idx] + s·(x·A[idx])·B[idx]`` through rank ``r``; the base's gather is the model's own;
* ``jax.lax.ragged_dot`` (``ragged_dot_general``) over tokens sorted by expert with group sizes, as in
  MaxText/megablox: :func:`ragged_dot_general` runs the base's grouped matmul plus
  ``s·ragged_dot(ragged_dot(x, A, gs), B, gs)``. Autodiff of the two rank-``r`` grouped products gives the
  factors' gradients (``(E, d_in, r)`` and ``(E, r, d_out)``); the base gets none.

A Pallas kernel (``pallas_call``, tunix's grouped matmul on accelerators) is opaque: no rule sees through it.
:func:`way_out` words what to do instead, for the interpreter's fallback message.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lorajax._factored._base import base_dot, base_product
from lorajax._factored._dora import holds_magnitude, lora_part, with_gain
from lorajax._factored._products import dot_lora_einsum
from lorajax._factored._ref import KernelRef, Label, normalize
from lorajax._factored._registry import register_rule

# Primitives that are opaque kernels: no rule can follow a LoRA kernel into them.
_OPAQUE = ("pallas_call", "custom_call", "mosaic", "triton")


def way_out(ref: KernelRef, where: str) -> str:
    """What to write instead when an expert bank (or any kernel) reaches an opaque or unknown use ``where``.

    Empty for uses that are no expert dispatch (the interpreter's own message then stands alone).

    >>> "ragged_dot" in way_out(None, "pallas_call")
    True
    """
    opaque = any(where.startswith(name) for name in _OPAQUE)
    stacked = ref is not None and ref.count("s") > 0
    if not opaque and not stacked:
        return ""
    what = (
        f"`{where}` is an opaque kernel (a Pallas grouped matmul, say): no rule can see through it"
        if opaque
        else "it is an expert bank (a stacked kernel) used in a way no rule follows"
    )
    return (
        f" ({what}). Write the expert matmuls in a form factored follows: jax.lax.ragged_dot over tokens sorted by "
        "expert with group sizes, a gather of the experts' kernels by index (W[idx]) then an einsum, or a dense "
        "all-experts einsum; or run the merge path, fn(lorajax.merge(params), ...), for this model"
    )


def expert_gather(ref: KernelRef, idx: jax.Array, params: dict) -> KernelRef | None:
    """``W[idx]`` as a view of the kernel: the factors gathered alike, the index axes stacked axes of the view.

    ``None`` unless the gather indexes only stacked axes and takes every other axis whole (an expert lookup,
    not an embedding lookup).
    """
    dn = params["dimension_numbers"]
    collapsed = tuple(dn.collapsed_slice_dims)
    if ref.rows is not None or ref.info.per_example or dn.operand_batching_dims or not collapsed:
        return None
    if sorted(dn.start_index_map) != sorted(collapsed) or any(ref.labels[p][0] != "s" for p in collapsed):
        return None
    sizes = params["slice_sizes"]
    if any(sizes[p] != ref.shape[p] for p in range(len(ref.shape)) if p not in collapsed):
        return None
    gained_ref = _gain_first(ref)
    if gained_ref is None:
        return None
    ref = gained_ref
    nb = idx.ndim - 1  # gather_p's index vector is the last axis of the indices

    def take(f: jax.Array, which: str) -> jax.Array:
        where = {p: ref.factor_axis(which, ref.labels[p]) for p in collapsed}
        fcollapsed = tuple(sorted(where.values()))
        fdn = lax.GatherDimensionNumbers(
            offset_dims=tuple(range(nb, nb + f.ndim - len(fcollapsed))),
            collapsed_slice_dims=fcollapsed,
            start_index_map=tuple(where[p] for p in dn.start_index_map),
        )
        fsizes = tuple(1 if k in fcollapsed else f.shape[k] for k in range(f.ndim))
        return lax.gather(
            f,
            idx,
            fdn,
            fsizes,
            indices_are_sorted=params["indices_are_sorted"],
            unique_indices=params["unique_indices"],
            mode=params["mode"],
            fill_value=params["fill_value"],
        )

    kept = [p for p in range(len(ref.labels)) if p not in collapsed]
    rest = sorted(j for g, j in (ref.labels[p] for p in kept) if g == "s")
    offsets = list(dn.offset_dims)
    labels: list[Label] = []
    batch = 0
    for q in range(nb + len(kept)):
        if q in offsets:
            g, j = ref.labels[kept[offsets.index(q)]]
            labels.append(("s", nb + rest.index(j)) if g == "s" else (g, j))
        else:
            labels.append(("s", batch))
            batch += 1
    base = ref.base.view(lambda w, i: lax.gather_p.bind(w, i, **params), idx)
    return ref.replace(base=base, a=take(ref.a, "a"), b=take(ref.b, "b"), labels=tuple(labels))


def _grouped_form(ref: KernelRef, x: Any, params: dict) -> bool:
    """Whether the use is ``ragged_dot(x, W, group_sizes)``: rows of ``x`` grouped by the kernel's expert axis."""
    rdn = params["ragged_dot_dimension_numbers"]
    (lc, rc), (lb, rb) = rdn.dot_dimension_numbers
    if params.get("group_offset") is not None or lb or rb or ref.info.per_example or ref.rows is not None:
        return False
    if not hasattr(x, "ndim") or x.ndim != 2 or tuple(lc) != (1,) or tuple(rdn.lhs_ragged_dimensions) != (0,):
        return False
    if len(ref.labels) != 3 or len(rc) != 1 or len(rdn.rhs_group_dimensions) != 1:
        return False
    (pe,), (pi,) = rdn.rhs_group_dimensions, rc
    (po,) = [p for p in range(3) if p not in (pe, pi)]
    return (ref.labels[pe][0], ref.labels[pi][0], ref.labels[po][0]) == ("s", "i", "o")


def _gain_first(ref: KernelRef) -> KernelRef | None:
    """``ref`` normalized, with DoRA's ``g = m / n`` in ``b``'s last rank row.

    A quantized base's DoRA ref carries ``m`` there instead (each product computes ``n`` from the kernel it
    dequantizes); an expert gather or grouped matmul reads the bank per token or per group, so ``n`` is computed
    here, once, from the bank's dense view. ``None`` where that view has no fan-in or fan-out axis.
    """
    return with_gain(ref) if holds_magnitude(ref) else normalize(ref)


def _gains(ref: KernelRef) -> tuple[KernelRef, jax.Array]:
    """A normalized DoRA ref as its LoRA part at rank ``r`` with ``g`` folded into ``b``, and ``g``.

    ``g = m / n`` rides in ``b``'s last rank row (:mod:`lorajax._factored._dora`), so it was gathered with the
    experts; it comes back with the stacked and fan-out axes of ``b`` (``(*stack, *fan_out)``).
    """
    axis = ref.rank_axis("b")
    g = jnp.take(ref.b, ref.b.shape[axis] - 1, axis=axis)
    plain = lora_part(ref)
    return plain.replace(b=plain.b * jnp.expand_dims(g, axis).astype(plain.b.dtype)), g


def _combine(y0: jax.Array, lora: jax.Array, g: jax.Array, dropped: jax.Array | None) -> jax.Array:
    """DoRA's output ``g ⊙ y0 + lora`` (``lora`` already times ``g``); with dropout PEFT's
    ``y0 + (g − 1) ⊙ drop(x)·W + lora``."""
    g, lora = g.astype(y0.dtype), lora.astype(y0.dtype)
    return g * y0 + lora if dropped is None else y0 + (g - 1) * dropped + lora


def dora_dot(interp: Any, eqn: Any, x: jax.Array, ref: KernelRef, k_side: int) -> jax.Array | None:
    """A DoRA expert bank in a ``dot_general`` (a dense all-experts einsum, a gathered ``W[idx]``).

    ``g ⊙ x·W + s·(x·A)·(g ⊙ B)`` by the einsum form, ``g`` (per expert, or per token and choice after a gather)
    laid out on the product's output. ``None`` where the product contracts a stacked or fan-out axis.
    """
    p = eqn.params
    dn = p["dimension_numbers"]
    (lc, rc), (lb, rb) = dn
    kc, kb = (rc, rb) if k_side == 1 else (lc, lb)
    if ref.info.per_example or ref.rows is not None or any(ref.labels[q][0] in "so" for q in kc):
        return None
    gained_ref = _gain_first(ref)
    if gained_ref is None:
        return None
    ref = gained_ref
    gained, g = _gains(ref)
    y0 = base_dot(eqn, x, ref, k_side)
    xd = interp.dropout(ref, x)
    lora = dot_lora_einsum(xd, gained, k_side, dn, p, y0.shape)
    if lora is None:
        return None
    # Output position of each kernel axis: batch axes first, then lhs free, then rhs free (dot_general's order).
    kfree = [q for q in range(len(ref.labels)) if q not in kc and q not in kb]
    off = len(kb) + (x.ndim - len(kc) - len(kb) if k_side == 1 else 0)
    at = {q: n for n, q in enumerate(kb)} | {q: off + n for n, q in enumerate(kfree)}
    ns = ref.count("s")
    axes = sorted((at[q], j if grp == "s" else ns + j) for q, (grp, j) in enumerate(ref.labels) if grp in "so")
    shape = [1] * y0.ndim
    for pos, _ in axes:
        shape[pos] = y0.shape[pos]
    g = jnp.reshape(jnp.transpose(g, [src for _, src in axes]), shape)
    dropped = None if xd is x else base_dot(eqn, xd, ref, k_side)
    return _combine(y0, lora, g, dropped)


@register_rule("ragged_dot_general")
def ragged_dot_general(interp: Any, eqn: Any, invals: list) -> list | None:
    """``ragged_dot(x, W, gs)`` as the base's grouped matmul plus ``s·ragged_dot(ragged_dot(x, A, gs), B, gs)``."""
    x, ref, sizes = invals
    p = eqn.params
    if isinstance(x, KernelRef) or isinstance(sizes, KernelRef) or not isinstance(ref, KernelRef):
        return None
    if not _grouped_form(ref, x, p):
        return None
    ref = _gain_first(ref)
    if ref is None:
        return None
    base = lambda xs: base_product(lambda w, v, gs: eqn.primitive.bind(v, w, gs, **p), ref.base, ref.dtype, xs, sizes)
    y0 = base(x)
    xd = interp.dropout(ref, x)
    dora = ref.info.spec.variant == "dora"
    lora, g = _gains(ref) if dora else (ref, None)
    a = lora.a.astype(xd.dtype)  # (E, d_in, r) after normalize: stacked, fan-in, rank
    pet = p.get("preferred_element_type")
    t = lax.ragged_dot(xd, a, sizes, precision=p.get("precision"), preferred_element_type=pet)
    t = t * jnp.asarray(ref.info.scale, t.dtype)
    y = lax.ragged_dot(t, lora.b.astype(t.dtype), sizes, precision=p.get("precision"), preferred_element_type=pet)
    if g is None:
        return [y0 + y.astype(y0.dtype)]
    # DoRA: each row's gain is its expert's (rows past the groups are zero in every product).
    expert = jnp.repeat(jnp.arange(g.shape[0]), sizes, total_repeat_length=x.shape[0])
    return [_combine(y0, y, g[expert], None if xd is x else base(xd))]
