"""Rules for the consumers of a LoRA kernel: dot_general, conv_general_dilated, gather.

Each computes the base's use plus the LoRA term through the rank-``r`` factors:

* ``dot_general``:  ``x @ W0 + s * ((x @ A) @ B)`` (or ``(x @ Bᵀ) @ Aᵀ`` when the fan-out axis is
  contracted, as in ``Embed.attend``);
* ``conv_general_dilated``: the base conv plus a conv to ``rank`` channels with A and a 1x1 conv with B;
* ``gather`` (embedding lookup): rows of the base plus ``rows of A @ B``.

A rule returns ``None`` when it cannot factor the use; the interpreter then forms the kernel for
that one use and warns. The products themselves are in ``_products.py``; a DoRA kernel goes to
``_dora.py``, a bank with per-row adapter ids to ``_banked.py``.
"""

from __future__ import annotations

from typing import Any

import jax

from lorajax._factored import _banked, _dora, _experts
from lorajax._factored._base import base_conv, base_dot, base_gather
from lorajax._factored._layout_check import check_contraction
from lorajax._factored._products import DotPlan, conv_lora, dot_lora_einsum, gather_lora
from lorajax._factored._ref import KernelRef
from lorajax._factored._registry import register_rule


def _plain_dot(interp: Any, eqn: Any, x: jax.Array, ref: KernelRef, k_side: int) -> jax.Array:
    p = eqn.params
    y0 = base_dot(eqn, x, ref, k_side)
    xd = interp.dropout(ref, x)
    lora = None
    if ref.rows is not None:  # a whole bank with per-row adapter ids (lorajax.select's onehot/ragged forms)
        lora = _banked.dot_term(ref, xd, k_side, p["dimension_numbers"], p, y0.shape)
        if lora is not None:
            return y0 + lora.astype(y0.dtype)
        ref = _banked.as_gathered(ref, "dot_general")
    if interp.flatten and x.ndim >= 1:
        plan = DotPlan(ref, k_side, p["dimension_numbers"], x.ndim)
        if plan.ok:
            t = interp.first_products.pop(eqn.outvars[0], None)
            if t is None:
                t = plan.first_product(ref, xd, p)
            lora = plan.finish(t, ref, x, y0.shape, p)
    if lora is None:
        lora = dot_lora_einsum(xd, ref, k_side, p["dimension_numbers"], p, y0.shape)
    if lora is None:
        vals = [x, x]
        vals[k_side] = interp.fallback(ref, "dot_general")
        return eqn.primitive.bind(*vals, **p)
    return y0 + lora.astype(y0.dtype)


@register_rule("dot_general")
def dot_general(interp: Any, eqn: Any, invals: list) -> list | None:
    lhs, rhs = invals
    if isinstance(lhs, KernelRef) and isinstance(rhs, KernelRef):
        rhs = interp.fallback(rhs, "dot_general (kernel times kernel)")
    k_side = 0 if isinstance(lhs, KernelRef) else 1
    ref, x = (lhs, rhs) if k_side == 0 else (rhs, lhs)
    check_contraction(ref, k_side, eqn.params["dimension_numbers"])
    if ref.info.spec.variant == "dora":
        out = _experts.dora_dot(interp, eqn, x, ref, k_side) if ref.count("s") else None  # an expert bank
        return [_dora.dot(interp, eqn, x, ref, k_side) if out is None else out]
    return [_plain_dot(interp, eqn, x, ref, k_side)]


@register_rule("conv_general_dilated")
def conv_general_dilated(interp: Any, eqn: Any, invals: list) -> list | None:
    x, ref = invals
    if not isinstance(ref, KernelRef) or isinstance(x, KernelRef):
        return None
    if ref.info.spec.variant == "dora":
        return [_dora.conv(interp, eqn, x, ref)]
    y0 = base_conv(eqn, x, ref)
    lora = conv_lora(interp.dropout(ref, x), ref, eqn.params, y0.shape)
    if lora is None:
        return [eqn.primitive.bind(x, interp.fallback(ref, "conv_general_dilated"), **eqn.params)]
    return [y0 + lora.astype(y0.dtype)]


@register_rule("gather")
def gather(interp: Any, eqn: Any, invals: list) -> list | None:
    ref, idx = invals
    if not isinstance(ref, KernelRef) or isinstance(idx, KernelRef):
        return None
    experts = _experts.expert_gather(ref, idx, eqn.params)  # W[idx] of an expert bank: a view, factors gathered
    if experts is not None:
        return [experts]
    if ref.info.spec.variant == "dora":
        return [_dora.gather(interp, eqn, ref, idx)]
    y0 = base_gather(eqn, ref, idx)
    if ref.rows is not None:  # a whole bank with per-row adapter ids: gather rows of A_all, mask, @ B_all
        flat, mask = _banked.gather_mask(ref)
        lora = gather_lora(idx, flat, eqn.params, y0.shape, mask=mask)
        if lora is not None:
            return [y0 + lora.astype(y0.dtype)]
        ref = _banked.as_gathered(ref, "gather")
    lora = gather_lora(idx, ref, eqn.params, y0.shape)
    if lora is None:
        return [eqn.primitive.bind(interp.fallback(ref, "gather"), idx, **eqn.params)]
    return [y0 + lora.astype(y0.dtype)]
