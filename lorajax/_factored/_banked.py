"""Bank execution: a whole adapter bank in one ``dot_general``, one adapter per row of the activations.

:func:`lorajax.select` with ``form="onehot"`` or ``"ragged"`` leaves every adapter's factors in the
node (leading axis: the bank's rows, the zero row last) and adds :class:`Rows`: the adapter row of each
row of the activations (an example, or a token when ``ids`` has the activations' two leading axes).
The ``dot_general`` rule then views the bank as ONE LoRA of rank ``N * r`` (the adapter axis
moved next to the rank) and runs it as 2-D matmuls on the flattened rows:

* ``onehot``: ``t = x @ A_all``, columns of other adapters zeroed per row, ``y = t @ B_all``. No gather;
  costs ``N * r * (d_in + d_out)`` per row (the zero row gets no columns), so it pays when the bank's total rank
  is small next to the layer's width.
* ``ragged``: rows sorted by adapter, then ``jax.lax.ragged_dot`` per group (``N + 1`` static groups) and
  the rows put back. ``r * (d_in + d_out)`` per row where ragged_dot is a grouped kernel (GPU/TPU).

A ``dot_general`` these forms cannot flatten to rows (a kernel with a stacked axis that no scan sliced) runs in
the gather form (``a[ids]``, ``b[ids]``: the per-example einsum) when the ids are per example. Convolutions
run no per-example adapters in any form.

``auto`` (per-example ids) decides at each ``dot_general`` from the activations' shape (:func:`auto_onehot`):
the one-hot form where each id covers few rows (a decode step: one), the gather form where it covers many
(a prompt).

A bank that holds DoRA adapters selects to nodes of variant ``"dora"`` whose ``magnitude`` is :class:`Gains`:
``g_k = m_k / n_k`` already computed once per adapter by :func:`lorajax.select` (``1`` for plain adapters and
the zero row), which :mod:`lorajax._factored._dora` applies per row: ``y = g_row ⊙ (x·W + (x·A_row)·B_row)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lorajax._factored._products import DotPlan
from lorajax._factored._ref import KernelRef, NodeInfo
from lorajax._node import LoRA

FORMS = ("gather", "onehot", "ragged")

#: ``auto`` runs the one-hot form while (rows per id) x (adapters in the bank) stays within this budget. The
#: one-hot form costs every row the whole bank's rank; the gather form copies each example's factors once, which
#: many rows per example repay. Measured on XLA:CPU with 8 adapters of rank 16 (d 128 and 256, batch 32 and 64,
#: ``benchmarks/RESULTS.md``): one-hot / gather time 0.38-0.44 at 1 row per id, 0.89 at 8, 1.03-1.09 at 16, 1.12-1.18
#: at 64.
ONEHOT_BUDGET = 64


def auto_onehot(rows: int, ids: int, count: int) -> bool:
    """Whether ``auto`` runs the one-hot form for ``rows`` activation rows, ``ids`` adapter ids, a bank of ``count``.

    ``count`` includes the bank's zero row.

    >>> auto_onehot(rows=64, ids=64, count=9), auto_onehot(rows=64 * 128, ids=64, count=9)  # decode, prefill
    (True, False)
    """
    return rows * (count - 1) <= ONEHOT_BUDGET * ids


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rows:
    """Bank row of each row of the activations (``ids``; the zero row is ``count - 1``) and the execution form
    (``"onehot"``, ``"ragged"`` or ``"auto"``)."""

    ids: Any
    form: str = dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BankedLoRA(LoRA):
    """A per-example LoRA node that holds the whole bank (``a``: ``(N + 1, *a_shape)``) and the rows' ids."""

    rows: Any = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Gains:
    """The DoRA gains ``g = m / n`` of a selected bank node: ``(N + 1, *magnitude shape)`` for the bank forms,
    ``(batch, *magnitude shape)`` for the gather form. Stands in a per-example node's ``magnitude``."""

    g: Any


def node_rows(node: Any) -> Rows | None:
    """The :class:`Rows` of a banked node, ``None`` for any other LoRA node."""
    return node.rows if isinstance(node, BankedLoRA) else None


def rows_key(rows: Rows | None) -> Any:
    """What of ``rows`` is static for a trace: the form and the ids' shape and dtype."""
    return None if rows is None else (rows.form, tuple(rows.ids.shape), str(rows.ids.dtype))


def as_gathered(ref: KernelRef, where: str) -> KernelRef:
    """The gather form of a banked ref (``a[ids]``, ``b[ids]``: per-example factors) for a use the bank forms skip."""
    ids = ref.rows.ids
    if ids.ndim != 1:
        raise ValueError(
            f"lorajax.factored: {ref.info.path} runs a bank with per-token adapter ids (shape {tuple(ids.shape)}) "
            f"and reaches a `{where}` that cannot be flattened to rows; per-token ids need plain dense layers and "
            "embedding lookups there. Give one id per example (lorajax.select(..., form='gather'))."
        )
    return ref.replace(a=jnp.take(ref.a, ids, axis=0), b=jnp.take(ref.b, ids, axis=0), rows=None)


def adapters_only(ref: KernelRef) -> KernelRef:
    """The bank without its zero row (the last), for the one-hot form: that row adds nothing, so it gets no columns
    (``N·r`` instead of ``(N + 1)·r``: a ninth less work with 8 adapters), and rows that use it match no owner."""
    return ref.replace(a=ref.a[:-1], b=ref.b[:-1])


def as_one_lora(ref: KernelRef) -> KernelRef:
    """The bank as one (not per-example) LoRA of rank (the bank's rows) x ``r``, adapter-major along the rank."""
    n, r = ref.a.shape[0], ref.a.shape[-1]
    a = jnp.moveaxis(ref.a, 0, -2)
    a = jnp.reshape(a, a.shape[:-2] + (n * r,))
    ns = ref.count("s")
    b = jnp.moveaxis(ref.b, 0, ns)  # (*s, N + 1, r, *o)
    b = jnp.reshape(b, b.shape[:ns] + (n * r,) + b.shape[ns + 2 :])
    spec = ref.info.spec.replace(rank=n * r, alpha=float(n * r), rslora=False)  # scales are folded: scale 1
    info = NodeInfo(ref.info.path, ref.info.index, spec, False, ref.info.orig_dtype)
    return ref.replace(a=a, b=b, info=info, rows=None)


def row_ids(ids: jax.Array, lead: list[int], caller: str, path: str) -> jax.Array:
    """``ids`` broadcast over the leading free axes ``lead`` of the activations and flattened (one per 2-D row)."""
    if tuple(lead[: ids.ndim]) != tuple(ids.shape):
        raise ValueError(
            f"lorajax.factored: {path}: the adapter ids have shape {tuple(ids.shape)} but the activations reaching "
            f"this kernel lead with {tuple(lead)} ({caller}); give ids shaped like the activations' leading axes "
            "(one per example, or one per token)."
        )
    full = jnp.reshape(ids, tuple(ids.shape) + (1,) * (len(lead) - ids.ndim))
    return jnp.reshape(jnp.broadcast_to(full, tuple(lead)), (-1,))


def onehot(t: jax.Array, rows: jax.Array, count: int) -> jax.Array:
    """``t`` (rows, count * r) with the columns of every adapter but each row's own set to zero."""
    r = t.shape[-1] // count
    owner = jnp.arange(count * r, dtype=rows.dtype) // r
    return jnp.where(rows[:, None] == owner[None, :], t, jnp.zeros((), t.dtype))


def grouped(x2: jax.Array, f1: jax.Array, f2: jax.Array, rows: jax.Array, count: int, params: dict) -> jax.Array:
    """``x2[i] @ f1[rows[i]] @ f2[rows[i]]`` by sorting rows into groups and two ``ragged_dot``\\ s."""
    order = jnp.argsort(rows)
    sizes = jnp.bincount(rows, length=count).astype(jnp.int32)
    pet = params.get("preferred_element_type")
    t = jax.lax.ragged_dot(x2[order], f1, sizes, precision=params.get("precision"), preferred_element_type=pet)
    y = jax.lax.ragged_dot(t, f2, sizes, precision=params.get("precision"), preferred_element_type=pet)
    return jnp.zeros_like(y).at[order].set(y)


def dot_term(ref: KernelRef, x: jax.Array, k_side: int, dn: Any, params: dict, out_shape: Any) -> jax.Array | None:
    """The bank's LoRA term of one dot_general in the onehot/ragged form; ``None`` if not 2-D flattenable."""
    count = ref.a.shape[0]
    flat = as_one_lora(ref)
    plan = DotPlan(flat, k_side, dn, x.ndim)
    if not plan.ok or plan.first != "a":
        return None
    lead = [x.shape[q] for q in plan.xfree]
    if plan.xfree[: ref.rows.ids.ndim] != list(range(ref.rows.ids.ndim)):
        return None
    rows = row_ids(ref.rows.ids, lead, "dot_general", ref.info.path)
    form = ref.rows.form
    if form == "auto":
        if not auto_onehot(rows.shape[0], ref.rows.ids.size, count):
            return None  # the caller runs the gather form
        form = "onehot"
    if form == "onehot":
        live = as_one_lora(adapters_only(ref))
        plan = DotPlan(live, k_side, dn, x.ndim)
        t = onehot(plan.first_product(live, x, params), rows, count - 1)
        return plan.finish(t, live, x, out_shape, params)
    f1 = plan.first_2d(flat, x.dtype)  # (K, (N + 1) r) -> (N + 1, K, r)
    f1 = jnp.transpose(jnp.reshape(f1, (f1.shape[0], count, -1)), (1, 0, 2))
    f2 = plan.second_2d(flat, x.dtype)  # ((N + 1) r, M) -> (N + 1, r, M)
    f2 = jnp.reshape(f2, (count, -1, f2.shape[-1]))
    y = grouped(plan.x_2d(x), f1, f2, rows, count, params)
    return plan.lay_out(y, flat, x, out_shape)


def gather_mask(ref: KernelRef) -> tuple[KernelRef, Any]:
    """For an embedding lookup: the bank as one LoRA, and the mask to apply to the gathered rows of ``A_all``."""
    count = ref.a.shape[0] - 1
    flat = as_one_lora(adapters_only(ref))

    def mask(t: jax.Array) -> jax.Array:  # t: (*index batch, N r); the zero row's rows match no owner
        rows = row_ids(ref.rows.ids, list(t.shape[:-1]), "gather", ref.info.path)
        return jnp.reshape(onehot(jnp.reshape(t, (-1, t.shape[-1])), rows, count), t.shape)

    return flat, mask
