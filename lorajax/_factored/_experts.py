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

from lorajax._factored._base import base_product
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
    ref = normalize(ref)
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


@register_rule("ragged_dot_general")
def ragged_dot_general(interp: Any, eqn: Any, invals: list) -> list | None:
    """``ragged_dot(x, W, gs)`` as the base's grouped matmul plus ``s·ragged_dot(ragged_dot(x, A, gs), B, gs)``."""
    x, ref, sizes = invals
    p = eqn.params
    if isinstance(x, KernelRef) or isinstance(sizes, KernelRef) or not isinstance(ref, KernelRef):
        return None
    if ref.info.spec.variant == "dora":
        raise ValueError(
            f"lorajax.factored: the DoRA expert bank {ref.info.path!r} (view shape {ref.shape}) reaches "
            "jax.lax.ragged_dot, which factored runs for plain LoRA experts only; run the merge path, "
            "fn(lorajax.merge(params), ...), or lorafy the experts with variant='lora'."
        )
    if not _grouped_form(ref, x, p):
        return None
    ref = normalize(ref)
    y0 = base_product(lambda w, xs, gs: eqn.primitive.bind(xs, w, gs, **p), ref.base, ref.dtype, x, sizes)
    xd = interp.dropout(ref, x)
    a = ref.a.astype(xd.dtype)  # (E, d_in, r) after normalize: stacked, fan-in, rank
    pet = p.get("preferred_element_type")
    t = lax.ragged_dot(xd, a, sizes, precision=p.get("precision"), preferred_element_type=pet)
    t = t * jnp.asarray(ref.info.scale, t.dtype)
    y = lax.ragged_dot(t, ref.b.astype(t.dtype), sizes, precision=p.get("precision"), preferred_element_type=pet)
    return [y0 + y.astype(y0.dtype)]
