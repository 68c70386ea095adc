"""DoRA in the factored interpreter: ``y = g ⊙ (x·W + s·(x·A)·B)`` with ``g = m / n``, never forming ``W``.

``g`` is computed once per node per call, from the factored column norms
(:func:`lorajax._dora.factored_norm`: contractions of ``W`` over its fan-in axes and
rank-``r`` products, nothing of size fan-in × fan-out), with ``n`` detached as in PEFT.

To travel through every view of the kernel (reshapes, transposes, scan slices) with no
extra bookkeeping, ``g`` rides in the factors themselves: ``a`` gets a zero rank column
and ``b`` the row ``g`` (:func:`extend_factors`). Then ``a_ext @ b_ext = a @ b`` exactly,
so the plain LoRA rules compute the plain LoRA term unchanged, and the DoRA rules below
read ``g`` back from the last rank row of ``b``, already laid out like the kernel view's
fan-out axes. With LoRA dropout active they follow PEFT:
``y = x·W + (g − 1) ⊙ (drop(x)·W) + g ⊙ s·(drop(x)·A)·B``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lorajax._dora import factored_norm, magnitude_axes
from lorajax._factored._consumers import DotPlan, conv_lora, gather_lora
from lorajax._factored._ref import KernelRef
from lorajax._node import LoRASpec, compute_dtype
from lorajax.quant import dense_base


def is_dora(ref: KernelRef) -> bool:
    """Whether ``ref`` stands for a DoRA node (its ``b`` carries ``g`` as an extra rank row)."""
    return ref.info.spec.variant == "dora"


def extend_factors(base: Any, a: Any, b: Any, magnitude: Any, spec: LoRASpec, path: str) -> tuple[Any, Any]:
    """``(a_ext, b_ext)``: ``a`` with a zero rank column, ``b`` with the row ``g = m / n`` (float32 at least)."""
    if magnitude is None:
        raise ValueError(
            f"lorajax.factored: {path} is a DoRA node without its magnitude; combine the halves from "
            "lorajax.partition back before calling the model."
        )
    lay = spec.layout
    base = dense_base(base)  # a quantized base: its norms are those of the dequantized kernel
    dt = compute_dtype(base.dtype)
    g = jnp.asarray(magnitude).astype(dt) / factored_norm(base, a, b, spec, dt)
    # g's axes are the kernel's stacked and fan-out axes in kernel order; b holds them as (*stack, r, *fan_out).
    keep = magnitude_axes(lay)
    order = [keep.index(k) for k in lay.stack + lay.fan_out]
    g = jnp.expand_dims(jnp.transpose(g, order), len(lay.stack))
    wide = jnp.promote_types(b.dtype, dt)
    b_ext = jnp.concatenate([jnp.asarray(b).astype(wide), g.astype(wide)], axis=len(lay.stack))
    a_ext = jnp.concatenate([a, jnp.zeros(a.shape[:-1] + (1,), a.dtype)], axis=-1)
    return a_ext, b_ext


def _gain_row(ref: KernelRef) -> KernelRef:
    """``ref`` whose ``b`` is only its last rank row, ``g``."""
    axis = ref.rank_axis("b")
    r = ref.b.shape[axis] - 1
    return ref.replace(a=ref.a[..., r:], b=lax.slice_in_dim(ref.b, r, r + 1, axis=axis))


def _combine(y0: jax.Array, lora: jax.Array, g: jax.Array, dropped: jax.Array | None) -> jax.Array:
    """``g ⊙ (y0 + lora)``; with dropout (``dropped`` = ``drop(x)·W``) PEFT's ``y0 + (g−1) ⊙ dropped + g ⊙ lora``."""
    g = g.astype(y0.dtype)
    lora = lora.astype(y0.dtype)
    if dropped is None:
        return g * (y0 + lora)
    return y0 + (g - 1) * dropped + g * lora


def dot(interp: Any, eqn: Any, x: jax.Array, ref: KernelRef, k_side: int) -> jax.Array:
    """A DoRA kernel in a ``dot_general`` (Dense, DenseGeneral): through the 2-D plan, else formed."""
    p = eqn.params
    vals = [x, x]
    vals[k_side] = ref.base.astype(ref.dtype)
    plan = DotPlan(ref, k_side, p["dimension_numbers"], x.ndim)
    if not (interp.flatten and x.ndim >= 1 and plan.ok and plan.first == "a"):
        vals[k_side] = interp.fallback(ref, "dot_general (DoRA: only x @ W with W's fan-in contracted is factored)")
        return eqn.primitive.bind(*vals, **p)
    y0 = eqn.primitive.bind(*vals, **p)
    xd = interp.dropout(ref, x)
    t = interp.first_products.pop(eqn.outvars[0], None)
    if t is None:
        t = plan.first_product(ref, xd, p)
    lora = plan.finish(t, ref, x, y0.shape, p)
    g2 = plan.second_2d(_gain_row(ref), compute_dtype(ref.b.dtype))  # (1, fan-out), in the plan's order
    ones = [1] * len(plan.xfree)
    ks = [ref.shape[q] for q in plan.kfree]
    g = jnp.reshape(g2, ones + ks if k_side == 1 else ks + ones)
    dropped = None
    if xd is not x:
        vals[1 - k_side] = xd
        dropped = eqn.primitive.bind(*vals, **p)
    return _combine(y0, lora, g, dropped)


def conv(interp: Any, eqn: Any, x: jax.Array, ref: KernelRef) -> jax.Array:
    """A DoRA kernel in a convolution: the base conv, PEFT's factored conv, and ``g`` on the channel axis."""
    p = eqn.params
    y0 = eqn.primitive.bind(x, ref.base.astype(ref.dtype), **p)
    xd = interp.dropout(ref, x)
    lora = conv_lora(xd, ref, p, y0.shape)
    if lora is None:
        return eqn.primitive.bind(x, interp.fallback(ref, "conv_general_dilated (DoRA)"), **p)
    g = _gain_row(ref).b.reshape(-1)  # conv_lora needs one fan-out axis and no stack: b is (r + 1, cout)
    shape = [1] * y0.ndim
    shape[p["dimension_numbers"].out_spec[1]] = g.shape[0]
    dropped = None if xd is x else eqn.primitive.bind(xd, ref.base.astype(ref.dtype), **p)
    return _combine(y0, lora, jnp.reshape(g, shape), dropped)


def gather(interp: Any, eqn: Any, ref: KernelRef, idx: jax.Array) -> jax.Array:
    """A DoRA embedding lookup: ``g ⊙ (W[idx] + s·A[idx]·B)`` (PEFT applies no dropout to embeddings)."""
    p = eqn.params
    y0 = eqn.primitive.bind(ref.base.astype(ref.dtype), idx, **p)
    lora = None if ref.info.per_example else gather_lora(idx, ref, p, y0.shape)
    if lora is None:
        return eqn.primitive.bind(interp.fallback(ref, "gather (DoRA)"), idx, **p)
    dn = p["dimension_numbers"]
    p_out = next(q for q, (grp, _) in enumerate(ref.labels) if grp == "o")
    kept = [q for q in range(len(ref.labels)) if q not in dn.collapsed_slice_dims]
    g = _gain_row(ref).b.reshape(-1)  # gather_lora needs one fan-in and one fan-out axis: b is (r + 1, features)
    shape = [1] * y0.ndim
    shape[dn.offset_dims[kept.index(p_out)]] = g.shape[0]
    return _combine(y0, lora, jnp.reshape(g, shape), None)
