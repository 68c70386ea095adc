"""Swapping adapters on a merged model that kept no copy of its base weights."""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from lorajax import _boxes
from lorajax._node import LoRASpec, compute_dtype, is_lora, lora_delta
from lorajax._problems import Problems
from lorajax.adapters._adapter import Adapter, as_adapter, reject_dora, reject_lora_bias
from lorajax.adapters._attach import (
    base_problems,
    factor_problems,
    index_paths,
    place_like,
    rebuild_params,
    trainable_problems,
)

# One term of a swap: (a, b, scale) with the scale traced, or None when that adapter does not target the kernel.
Term = tuple[Any, Any, Any] | None


def _unit(spec: LoRASpec) -> LoRASpec:
    """``spec`` at scale 1, so the compiled swap depends on shapes and layouts only, not on alpha."""
    return spec.replace(alpha=float(spec.rank), rslora=False)


@partial(jax.jit, static_argnames=("old_spec", "new_spec"))
def _swap_kernel(w: jax.Array, old: Term, new: Term, old_spec: Any, new_spec: Any) -> jax.Array:
    # Scales are traced (not static) so adapters that differ only in alpha share one compilation;
    # lora_delta at scale 1 times the scale is bit for bit lora_delta at that scale (merge's arithmetic).
    dt = compute_dtype(w.dtype)
    acc = w.astype(dt)
    if old is not None:
        acc = acc - lora_delta(old[0], old[1], old_spec, dt) * jnp.asarray(old[2], dt)
    if new is not None:
        acc = acc + lora_delta(new[0], new[1], new_spec, dt) * jnp.asarray(new[2], dt)
    return acc.astype(w.dtype)


def _as_adapter(x: Any, what: str) -> Adapter | None:
    if x is None or isinstance(x, Adapter):
        return x
    try:
        return as_adapter(x, caller="swap")
    except ValueError as e:
        raise ValueError(f"swap: {what} must be an Adapter, lorafied params or None; {e}") from None


def swap(merged: Any, old_adapter: Any, new_adapter: Any) -> Any:
    """Trade one merged adapter for another on a deployed model that kept no W0.

    For every target, ``W' = W - s·A·B + s'·A'·B'`` in float32, in one fused
    computation with a single cast back to the kernel's dtype (no intermediate
    rounding to a bf16 base). Targets of only one adapter get only its term.

    Trained leaves (``adapter.trainables``: heads, norms, biases trained with ``lorafy(..., also=...)``)
    are values, not updates: each of ``new_adapter``'s replaces the merged params' leaf (boxed and
    placed like it). A leaf only ``old_adapter`` trained cannot be put back, since the merged params
    keep no copy of its base value: that is refused.

    Args:
        merged: plain params with ``old_adapter`` merged in (``lorajax.merge`` output).
        old_adapter: the adapter merged now (:class:`Adapter` or lorafied params), or
            ``None`` to merge ``new_adapter`` into a clean base.
        new_adapter: the adapter to merge, or ``None`` to unmerge ``old_adapter``.

    Returns:
        Params of the same structure (boxes kept) with ``new_adapter`` merged.
        Unmerge-then-merge costs one rounding per kernel in the kernel's dtype:
        exact up to float32 rounding for float32 kernels, up to one bf16 ulp per
        swap for bfloat16 kernels.

    Raises:
        ValueError: listing every target missing from ``merged``, of the wrong
            shape, or still a LoRA node, and every leaf ``old_adapter`` trained that
            ``new_adapter`` does not carry.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> base = {"dense": {"kernel": jnp.ones((8, 4))}}
        >>> lora = lorajax.lorafy(base, rank=2, where=".*", key=jax.random.key(0), init="gaussian")
        >>> merged = lorajax.merge(lora)
        >>> back = lorajax.swap(merged, lora, None)  # unmerge
        >>> bool(jnp.allclose(back["dense"]["kernel"], 1.0, atol=1e-6))
        True
    """
    old, new = _as_adapter(old_adapter, "old_adapter"), _as_adapter(new_adapter, "new_adapter")
    if old is None and new is None:
        return merged
    leaves, index = index_paths(merged)
    names = sorted(set(old.factors if old else ()) | set(new.factors if new else ()))
    problems = Problems("swap")
    for name in names:
        if name not in index:
            problems.add(f"missing: {name}: no such parameter in the merged params")
            continue
        leaf = leaves[index[name]][1]
        if is_lora(leaf):
            problems.add(f"lora: {name} is a LoRA node; swap works on merged params (call lorajax.merge first)")
            continue
        for ad in (old, new):
            if ad is not None and name in ad.factors:
                f = ad.factors[name]
                problems.extend(factor_problems(name, f) + base_problems(name, f, leaf, False))
    reject_dora(
        (old, new),
        "swap",
        "a merged DoRA kernel is (m/n)(W + s*a@b) with n depending on W, so the adapter cannot be subtracted or added "
        "linearly",
        "Keep the params lorafied and swap with lorajax.attach on the base params (lorajax.unlorafy), then merge.",
    )
    reject_lora_bias((old, new), "swap", "Keep the params lorafied and use lorajax.attach, then lorajax.merge.")
    trained = dict(new.trainables) if new else {}
    problems.extend(trainable_problems(trained, leaves, index, expect=False))
    problems.extend(
        [
            f"trainable: {name}: old_adapter trained this leaf and new_adapter carries no value for it; the merged "
            "params keep no copy of its base value (attach the new adapter to the base params instead: lorajax.attach)"
            for name in sorted(set(old.trainables if old else ()) - set(trained))
        ]
    )
    problems.raise_if_any("the adapters do not fit these merged params", "Swap only adapters of this base model.")

    def term(ad: Adapter | None, name: str) -> tuple[Term, LoRASpec | None]:
        if ad is None or name not in ad.factors:
            return None, None
        f = ad.factors[name]
        return (f.a, f.b, float(f.scale)), _unit(f.spec)

    replaced: dict[int, Any] = {}
    for name in names:
        n = index[name]
        leaf = leaves[n][1]
        (old_t, old_spec), (new_t, new_spec) = term(old, name), term(new, name)
        w = _swap_kernel(_boxes.unbox(leaf), old_t, new_t, old_spec=old_spec, new_spec=new_spec)
        replaced[n] = _boxes.rebox(leaf, w)
    for name, x in trained.items():
        leaf = leaves[index[name]][1]
        replaced[index[name]] = _boxes.rebox(leaf, place_like(leaf, x))
    return rebuild_params(merged, leaves, replaced)
