"""DoRA in the factored interpreter: ``y = g ⊙ (x·W + s·(x·A)·B)`` with ``g = m / n``, never forming ``W``.

``g`` is computed once per node per call, from the factored column norms
(:func:`lorajax._dora.factored_norm`: contractions of ``W`` over its fan-in axes and
rank-``r`` products, nothing of size fan-in × fan-out), with ``n`` detached as in PEFT.

To travel through every view of the kernel (reshapes, transposes, scan slices) with no
extra bookkeeping, ``g`` rides in the factors themselves: ``a`` gets a zero rank column
and ``b`` the row ``g`` (:func:`extend_factors`). Then ``a_ext @ b_ext = a @ b`` exactly, so
anything that forms the kernel from the factors stays right, and the DoRA rules below read
``g`` back from the last rank row of ``b``, already laid out like the kernel view's fan-out
axes. They compute ``g ⊙ x·W + s·(x·A)·(g ⊙ B)``: the LoRA products at rank ``r`` with ``g``
folded into ``B``. With LoRA dropout active they follow PEFT:
``y = x·W + (g − 1) ⊙ (drop(x)·W) + g ⊙ s·(drop(x)·A)·B``.

A quantized base (QDoRA) is the exception: reading ``W`` for ``n`` before the model runs would dequantize every
kernel once more per step (the products already dequantize it going forward and going back). There the row holds
the magnitude ``m`` itself (``Base.m_row``), and each use computes ``n`` from the kernel it dequantizes: a
``dot_general`` reads ``‖W_j‖²`` and ``aᵀW`` off the kernel of its forward product
(:func:`~lorajax._factored._base.base_product_stats`), a kernel formed for an unfactored use takes the norms of
what it forms, and convolutions and lookups read the dense view for them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lorajax._dora import factored_norm, magnitude_axes, typed_out
from lorajax._factored import _banked
from lorajax._factored._banked import Gains
from lorajax._factored._base import base_conv, base_dot, base_gather, base_product_stats, in_turn
from lorajax._factored._products import DotPlan, conv_lora, dot_lora_einsum, gather_lora, matmul
from lorajax._factored._ref import KernelRef, normalize
from lorajax._layout import Layout
from lorajax._node import LoRASpec, compute_dtype
from lorajax.quant import is_quantized


def is_dora(ref: KernelRef) -> bool:
    """Whether ``ref`` stands for a DoRA node (its ``b`` carries ``g`` as an extra rank row)."""
    return ref.info.spec.variant == "dora"


def extend_factors(
    base: Any, a: Any, b: Any, magnitude: Any, spec: LoRASpec, path: str, prior: tuple = ()
) -> tuple[Any, Any, Any]:
    """``(a_ext, b_ext, done)``: ``a`` with a zero rank column, ``b`` with the row ``g = m / n`` (float32 at least).

    A selected bank node (:func:`lorajax.select`) brings its gains ready, one per example or bank row, as
    :class:`~lorajax._factored._banked.Gains`; its factors have that leading axis too.

    A quantized base gets ``m`` in that row instead (its uses compute ``n``: see the module docstring).

    The norm reads ``W`` upcast (a bf16 base: XLA:CPU upcasts it for the contraction), a transient
    the size of the kernel in float32. ``prior`` (the previous node's ``done``, a scalar that depends on its whole
    norm) makes this node's read wait for it, so the transients live one at a time; left to itself XLA built them
    all at once (242 MiB of temporaries against LoRA's 24 on a bf16 4 x 1024 model).
    """
    if magnitude is None:
        raise ValueError(
            f"lorajax.factored: {path} is a DoRA node without its magnitude; combine the halves from "
            "lorajax.partition back before calling the model."
        )
    lay = spec.layout
    lead = 1 if isinstance(magnitude, Gains) else 0
    if lead:
        g = jnp.asarray(magnitude.g)
        dt = jnp.promote_types(g.dtype, jnp.float32)
    else:
        if jnp.ndim(a) != lay.ndim - len(lay.fan_out) + 1:
            raise ValueError(
                f"lorajax.factored: {path} is a per-example DoRA node (factor a of shape {tuple(jnp.shape(a))}) "
                "without the gains lorajax.select computes; make it with lorajax.select from lorajax.stack_adapters."
            )
        dt = compute_dtype(base.dtype)
        if is_quantized(base):
            # b's row holds m: each product computes n from the kernel it dequantizes (Base.m_row, _dot_and_gain)
            g = jnp.asarray(magnitude).astype(dt)
        else:
            g = jnp.asarray(magnitude).astype(dt) / factored_norm(in_turn(base, prior), a, b, spec, dt)
    # g's axes are the kernel's stacked and fan-out axes in kernel order; b holds them as (*stack, r, *fan_out).
    keep = magnitude_axes(lay)
    order = list(range(lead)) + [lead + keep.index(k) for k in lay.stack + lay.fan_out]
    g = jnp.expand_dims(jnp.transpose(g, order), lead + len(lay.stack))
    wide = jnp.promote_types(b.dtype, dt)
    b_ext = jnp.concatenate([jnp.asarray(b).astype(wide), g.astype(wide)], axis=lead + len(lay.stack))
    a_ext = jnp.concatenate([a, jnp.zeros_like(a[..., :1])], axis=-1)  # zeros_like: typed like a on explicit meshes
    return a_ext, b_ext, jnp.sum(g)


def _gain_row(ref: KernelRef) -> KernelRef:
    """``ref`` whose ``b`` is only its last rank row, ``g``."""
    axis = ref.rank_axis("b")
    r = ref.b.shape[axis] - 1
    return ref.replace(a=ref.a[..., r:], b=lax.slice_in_dim(ref.b, r, r + 1, axis=axis))


def lora_part(ref: KernelRef) -> KernelRef:
    """The plain LoRA term of ``ref`` at its true rank ``r`` (without ``g``'s row); ``ref`` itself if not DoRA.

    The products then run at rank ``r``: an odd rank ``r + 1`` costs XLA:CPU more than its share.
    """
    return _split(ref)[0] if is_dora(ref) else ref


def _gained_part(ref: KernelRef) -> KernelRef:
    """:func:`lora_part` with ``g`` folded into ``b`` (each rank row times ``g``): its term is ``g ⊙ s·x·A·B``.

    Scaling the rank-``r`` factor instead of the ``tokens × fan-out`` LoRA term saves a pass over the
    activations forward and keeps the base product, not ``x·W + ΔW-term``, as what the magnitude's gradient reads.
    """
    plain, g = _split(ref)
    return plain.replace(b=plain.b * jnp.expand_dims(g, ref.rank_axis("b")))


def _combine(y0: jax.Array, gained: jax.Array, g: jax.Array, dropped: jax.Array | None) -> jax.Array:
    """``g ⊙ y0 + gained``, ``gained`` the LoRA term times ``g``; with dropout (``dropped`` = ``drop(x)·W``)
    PEFT's ``y0 + (g−1) ⊙ dropped + gained``."""
    g = g.astype(y0.dtype)
    gained = gained.astype(y0.dtype)
    if dropped is None:
        return g * y0 + gained
    return y0 + (g - 1) * dropped + gained


def dot(interp: Any, eqn: Any, x: jax.Array, ref: KernelRef, k_side: int) -> jax.Array:
    """A DoRA kernel in a ``dot_general`` (Dense, DenseGeneral): through the 2-D plan, else formed."""
    if ref.info.per_example:
        return _rows_dot(interp, eqn, x, ref, k_side)
    p = eqn.params
    plan = DotPlan(ref, k_side, p["dimension_numbers"], x.ndim)
    if not (interp.flatten and x.ndim >= 1 and plan.ok and plan.first == "a"):
        w = interp.fallback(ref, "dot_general (DoRA: only x @ W with W's fan-in contracted is factored)")
        return eqn.primitive.bind(*((w, x) if k_side == 0 else (x, w)), **p)
    plain = lora_part(ref)
    if holds_magnitude(ref):
        y0, g2 = _dot_and_gain(eqn, x, ref, k_side, plan)
    else:
        y0 = base_dot(eqn, x, ref, k_side)
        g2 = plan.second_2d(_gain_row(ref), compute_dtype(ref.b.dtype))  # (1, fan-out), in the plan's order
    xd = interp.dropout(ref, x)
    t = interp.first_products.pop(eqn.outvars[0], None)  # x·A: its rank-r factor is lora_part's
    if t is None:
        t = plan.first_product(plain, xd, p)
    # The LoRA term with g folded into B (g ⊙ s·x·A·B): B's columns times g, in the plan's order.
    b2 = plan.second_2d(plain, plain.b.dtype) * g2.astype(plain.b.dtype)
    lora = plan.lay_out(matmul(t, b2.astype(t.dtype), p), plain, x, y0.shape)
    ones = [1] * len(plan.xfree)
    ks = [ref.shape[q] for q in plan.kfree]
    g = jnp.reshape(g2, ones + ks if k_side == 1 else ks + ones)
    dropped = None if xd is x else base_dot(eqn, xd, ref, k_side)
    return _combine(y0, lora, g, dropped)


def conv(interp: Any, eqn: Any, x: jax.Array, ref: KernelRef) -> jax.Array:
    """A DoRA kernel in a convolution: the base conv, PEFT's factored conv, and ``g`` on the channel axis."""
    p = eqn.params
    if holds_magnitude(ref):
        gained = with_gain(ref)
        if gained is None:
            return eqn.primitive.bind(x, interp.fallback(ref, "conv_general_dilated (DoRA)"), **p)
        ref = gained
    y0 = base_conv(eqn, x, ref)
    xd = interp.dropout(ref, x)
    lora = conv_lora(xd, _gained_part(ref), p, y0.shape)
    if lora is None:
        return eqn.primitive.bind(x, interp.fallback(ref, "conv_general_dilated (DoRA)"), **p)
    g = _gain_row(ref).b.reshape(-1)  # conv_lora needs one fan-out axis and no stack: b is (r + 1, cout)
    shape = [1] * y0.ndim
    shape[p["dimension_numbers"].out_spec[1]] = g.shape[0]
    dropped = None if xd is x else base_conv(eqn, xd, ref)
    return _combine(y0, lora, jnp.reshape(g, shape), dropped)


def gather(interp: Any, eqn: Any, ref: KernelRef, idx: jax.Array) -> jax.Array:
    """A DoRA embedding lookup: ``g ⊙ (W[idx] + s·A[idx]·B)`` (PEFT applies no dropout to embeddings)."""
    if ref.info.per_example:
        return _rows_gather(interp, eqn, ref, idx)
    p = eqn.params
    if holds_magnitude(ref):
        gained = with_gain(ref)
        if gained is None:
            return eqn.primitive.bind(interp.fallback(ref, "gather (DoRA)"), idx, **p)
        ref = gained
    y0 = base_gather(eqn, ref, idx)
    lora = gather_lora(idx, _gained_part(ref), p, y0.shape)
    if lora is None:
        return eqn.primitive.bind(interp.fallback(ref, "gather (DoRA)"), idx, **p)
    dn = p["dimension_numbers"]
    p_out = next(q for q, (grp, _) in enumerate(ref.labels) if grp == "o")
    kept = [q for q in range(len(ref.labels)) if q not in dn.collapsed_slice_dims]
    g = _gain_row(ref).b.reshape(-1)  # gather_lora needs one fan-in and one fan-out axis: b is (r + 1, features)
    shape = [1] * y0.ndim
    shape[dn.offset_dims[kept.index(p_out)]] = g.shape[0]
    return _combine(y0, lora, jnp.reshape(g, shape), None)


# ---------------------------------------------------------------------------------------------------------------------
# A quantized base: b's row holds the magnitude m, and n comes from the kernel the product dequantizes anyway.


def holds_magnitude(ref: KernelRef) -> bool:
    """Whether ``ref``'s last rank row of ``b`` is the magnitude ``m`` (a quantized base), not ``g = m / n``."""
    if not is_dora(ref) or ref.info.per_example:
        return False
    return ref.base.norm_axes(ref.labels, ref.info.path) is not None


def _norm(w2: jax.Array, aw: jax.Array, a2: jax.Array, b2: jax.Array, scale: float) -> jax.Array:
    """``n = ‖W + s·A·B‖`` per column from ``‖W_j‖²`` ``(F,)``, ``aᵀW`` ``(r, F)``, ``A`` ``(I, r)`` and ``B``
    ``(r, F)``: :func:`lorajax._dora.factored_norm`'s formula on the 2-D view, detached."""
    kw: dict[str, Any] = dict(precision=lax.Precision.HIGHEST, preferred_element_type=w2.dtype)
    gram = jnp.einsum("iz,ir->zr", a2, a2, **kw, **typed_out(a2, lambda e: (None, None)))
    gb = jnp.einsum("zr,zf->rf", gram, b2, **kw)  # (AᵀA)·B, rank-major
    s = jnp.asarray(scale, w2.dtype)
    n2 = w2 + jnp.sum((2 * s * aw + s * s * gb) * b2, axis=0)
    return lax.stop_gradient(jnp.sqrt(jnp.maximum(n2, 0)))


def _dot_and_gain(eqn: Any, x: jax.Array, ref: KernelRef, k_side: int, plan: DotPlan) -> tuple[jax.Array, jax.Array]:
    """``(x·W, g)`` for a node whose row holds ``m``: ``‖W_j‖²`` and ``aᵀW`` read off the one kernel the base product
    dequantizes (:func:`~lorajax._factored._base.base_product_stats`); ``g`` is ``(1, fan-out)`` in the plan's order.
    """
    p = eqn.params
    dt = compute_dtype(ref.info.orig_dtype)
    plain = lora_part(ref)
    a2, b2 = lax.stop_gradient(plan.first_2d(plain, dt)), lax.stop_gradient(plan.second_2d(plain, dt))

    def product(w: jax.Array, x: jax.Array) -> jax.Array:
        return eqn.primitive.bind(*((w, x) if k_side == 0 else (x, w)), **p)

    out = eqn.outvars[0].aval
    # aᵀW rides along with x·W as r more rows of one matmul: one pass over the kernel instead of two (the weight-bound
    # QDoRA step 1.12-1.15x the QLoRA step instead of 1.22-1.27x, benchmarks/qlora_step.py). Only where that pass
    # outweighs the copies it adds (x's rows in, the product's rows out) and changes nothing else: one device (no
    # rows of other shardings mixed in), one dtype, and full float32 at the product's own precision (on XLA:CPU
    # every precision is; elsewhere aᵀW keeps Precision.HIGHEST in a matmul of its own).
    rows, fan_in = math.prod(x.shape[q] for q in plan.xfree), a2.shape[0]
    fan_out = math.prod(ref.shape[q] for q in plan.kfree)
    full = p.get("precision") in (lax.Precision.HIGHEST, (lax.Precision.HIGHEST,) * 2) or jax.default_backend() == "cpu"
    same = jnp.dtype(x.dtype) == jnp.dtype(ref.dtype) == jnp.dtype(dt) == jnp.dtype(out.dtype)
    joint = full and same and jax.device_count() == 1 and rows * (fan_in + fan_out) <= fan_in * fan_out

    def forward(w: jax.Array, xs: tuple, ex: tuple) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        (x,), (a2,) = xs, ex
        w2d = jnp.reshape(jnp.transpose(w, plan.kc + plan.kfree), (a2.shape[0], -1))  # (fan-in, fan-out)
        kw = dict(precision=lax.Precision.HIGHEST, preferred_element_type=dt)
        w2 = jnp.einsum("if,if->f", w2d, w2d, **kw, **typed_out(w2d, lambda e: e[1:]))
        if joint:
            x2 = plan.x_2d(x)
            both = jnp.concatenate([x2, jnp.transpose(a2)], axis=0)  # x's rows, then aᵀ's r rows
            dims = (((1,), (0,)), ((), ()))
            y2 = lax.dot_general(both, w2d, dims, precision=p.get("precision"), preferred_element_type=dt)
            y0 = plan.lay_out(y2[: x2.shape[0]], ref, x, out.shape)
            return y0, (w2, y2[x2.shape[0] :])
        # Wᵀa (fan-out × r), transposed behind an optimization barrier (else XLA folds the transpose back in): the
        # dequantized kernel is laid out fan-out-major (PyTorch's (out, in) order of the codes), on which XLA:CPU
        # runs the rank-major aᵀW ~15x slower (30 ms against 2 ms for a 1024 x 4096 kernel).
        wa = jnp.einsum("if,ir->fr", w2d, a2, **kw, **typed_out(w2d, lambda e: (e[1], None)))
        return product(w, x), (w2, jnp.transpose(lax.optimization_barrier(wa)))

    y0, (w2, aw) = base_product_stats(product, forward, ref.base, ref.dtype, (x,), (a2,))
    m2 = plan.second_2d(_gain_row(ref), dt)
    return y0, m2 / _norm(w2, aw, a2, b2, ref.info.scale)


def with_gain(ref: KernelRef) -> KernelRef | None:
    """``ref`` with ``g = m / n`` in its row (the base no longer marked), ``n`` from the dense view; for the uses
    that do not read ``W`` through :func:`_dot_and_gain` (convolutions, lookups). None where the view has no
    fan-in or fan-out axis left (the caller forms the kernel then)."""
    ref = normalize(ref)
    ns, ni, no = ref.count("s"), ref.count("i"), ref.count("o")
    if not ni or not no:
        return None
    pos = {grp: [q for q, (g, _) in enumerate(ref.labels) if g == grp] for grp in "sio"}
    units = [q for q, (g, _) in enumerate(ref.labels) if g == "u"]
    dt = compute_dtype(ref.info.orig_dtype)
    w = jnp.transpose(ref.base.dense(dt), pos["s"] + pos["i"] + pos["o"] + units)
    w = jnp.reshape(w, w.shape[: w.ndim - len(units)])  # the normal layout s..si..io..o
    plain, m = _split(ref)
    spec = plain.info.spec.replace(layout=Layout("s" * ns + "i" * ni + "o" * no))
    n = factored_norm(lax.stop_gradient(w), plain.a, plain.b, spec, dt)
    axis = ref.rank_axis("b")
    b = jnp.concatenate([plain.b, jnp.expand_dims(m.astype(dt) / n, axis).astype(ref.b.dtype)], axis=axis)
    return ref.replace(b=b, base=dataclasses.replace(ref.base, m_row=False))


# ---------------------------------------------------------------------------------------------------------------------
# Selected banks (lorajax.select): one adapter, and so one gain g, per row of the activations.


def _split(ref: KernelRef) -> tuple[KernelRef, jax.Array]:
    """A DoRA ref as its plain LoRA part (rank ``r``) and its gains: ``b``'s last rank row, that axis dropped
    (``(n, *stack, *fan-out)`` for a per-example ref)."""
    axis = ref.rank_axis("b")
    r = ref.b.shape[axis] - 1
    info = dataclasses.replace(ref.info, spec=ref.info.spec.replace(variant="lora"))
    plain = ref.replace(a=ref.a[..., :r], b=lax.slice_in_dim(ref.b, 0, r, axis=axis), info=info)
    return plain, jnp.take(ref.b, r, axis=axis)


def _per_row(ref: KernelRef, gains: jax.Array) -> tuple[jax.Array, int]:
    """The gains of each leading row of the activations and how many leading axes index them.

    The gather form's gains are per example already (one leading axis); a bank's are per adapter, picked by the
    rows' ids (``(batch,)`` or ``(batch, seq)``).
    """
    if ref.rows is None:
        return gains, 1
    return jnp.take(gains, ref.rows.ids, axis=0), ref.rows.ids.ndim


def _dot_gain(g: jax.Array, lead: int, ref: KernelRef, k_side: int, dn: Any, x: jax.Array) -> jax.Array | None:
    """``g`` (``lead`` row axes, then ``*stack, *fan-out``) laid out to broadcast on the ``dot_general`` output.

    ``None`` unless the dot is ``x @ W`` with every fan-in axis contracted, the stacked and fan-out axes free and the
    rows on the leading axes of ``x``: the shapes in which the gain of each output is the gain of its column.
    """
    (lc, rc), (lb, rb) = dn
    xc, kc, kb = (lc, rc, rb) if k_side == 1 else (rc, lc, lb)
    xfree = [q for q in range(x.ndim) if q not in xc]
    kfree = [p for p in range(len(ref.labels)) if p not in kc]
    if kb or xfree[:lead] != list(range(lead)) or tuple(x.shape[:lead]) != tuple(g.shape[:lead]):
        return None
    if any(ref.labels[p][0] in "so" for p in kc) or any(ref.labels[p][0] == "i" for p in kfree):
        return None
    ns = ref.count("s")
    src = [lead + j if grp == "s" else lead + ns + j for grp, j in (ref.labels[p] for p in kfree) if grp != "u"]
    g = jnp.transpose(g, list(range(lead)) + src)  # rows, then the kernel's free axes in output order
    kshape = [1 if ref.labels[p][0] == "u" else ref.shape[p] for p in kfree]
    xshape = list(g.shape[:lead]) + [1] * (len(xfree) - lead)
    if k_side == 1:
        return jnp.reshape(g, xshape + kshape)
    g = jnp.moveaxis(g, list(range(lead)), list(range(g.ndim - lead, g.ndim)))
    return jnp.reshape(g, kshape + xshape)


def _rows_dot(interp: Any, eqn: Any, x: jax.Array, ref: KernelRef, k_side: int) -> jax.Array:
    """A selected bank in a ``dot_general``: the plain bank rules for the LoRA term, each row scaled by its gain."""
    p = eqn.params
    dn = p["dimension_numbers"]
    y0 = base_dot(eqn, x, ref, k_side)
    xd = interp.dropout(ref, x)
    plain, gains = _split(ref)
    g, lead = _per_row(ref, gains)
    lora = None
    if plain.rows is not None:
        lora = _banked.dot_term(plain, xd, k_side, dn, p, y0.shape)
        if lora is None:
            plain = _banked.as_gathered(plain, "dot_general")
    if lora is None:
        lora = dot_lora_einsum(xd, plain, k_side, dn, p, y0.shape)
    g_out = _dot_gain(g, lead, ref, k_side, dn, x)
    if lora is None or g_out is None:
        w = interp.fallback(ref, "dot_general (a DoRA bank needs x @ W with W's fan-in contracted)")
        return eqn.primitive.bind(*((w, x) if k_side == 0 else (x, w)), **p)
    dropped = None if xd is x else base_dot(eqn, xd, ref, k_side)
    return _combine(y0, g_out.astype(lora.dtype) * lora, g_out, dropped)


def _rows_gather(interp: Any, eqn: Any, ref: KernelRef, idx: jax.Array) -> jax.Array:
    """A selected bank in an embedding lookup: ``g_row ⊙ (W[idx] + A_row[idx]·B_row)``."""
    p = eqn.params
    dn = p["dimension_numbers"]
    y0 = base_gather(eqn, ref, idx)
    plain, gains = _split(ref)
    g, lead = _per_row(ref, gains)
    lora = None
    if plain.rows is not None:
        flat, mask = _banked.gather_mask(plain)
        lora = gather_lora(idx, flat, p, y0.shape, mask=mask)
        if lora is None:
            plain = _banked.as_gathered(plain, "gather")
    if lora is None:
        lora = gather_lora(idx, plain, p, y0.shape)
    if lora is None:  # gather_lora ran: one fan-in and one fan-out axis, no stack
        return eqn.primitive.bind(interp.fallback(ref, "gather (DoRA bank)"), idx, **p)
    p_out = next(q for q, (grp, _) in enumerate(ref.labels) if grp == "o")
    kept = [q for q in range(len(ref.labels)) if q not in dn.collapsed_slice_dims]
    out_axis = dn.offset_dims[kept.index(p_out)]
    batch = [d for d in range(y0.ndim) if d not in dn.offset_dims]
    if out_axis < lead or batch[:lead] != list(range(lead)) or tuple(y0.shape[:lead]) != tuple(g.shape[:lead]):
        return eqn.primitive.bind(interp.fallback(ref, "gather (DoRA bank: rows not leading the lookup)"), idx, **p)
    shape = list(g.shape[:lead]) + [1] * (y0.ndim - lead)
    shape[out_axis] = g.shape[-1]
    g = jnp.reshape(g, shape)
    return _combine(y0, g.astype(lora.dtype) * lora, g, None)
