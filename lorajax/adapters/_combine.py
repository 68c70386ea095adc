"""Combining adapters into one whose update is a weighted sum, like PEFT's ``add_weighted_adapter``."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorajax._node import LoRASpec, fold_scale, lora_delta
from lorajax.adapters._adapter import Adapter, AdapterFactors, as_adapter, dump_metadata, reject_dora
from lorajax.adapters._attach import group_targets


@partial(jax.jit, static_argnames=("specs", "shape", "r"))
def _svd_factors(
    weights: jax.Array, factors: list[tuple[Any, Any]], specs: tuple[LoRASpec, ...], shape: tuple[int, ...], r: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Best rank-``r`` factors of ``Σ wᵢ·ΔWᵢ`` (float32) in the kernel's layout, and all its singular values."""
    layout = specs[0].layout
    delta = sum(w * lora_delta(a, b, spec, jnp.float32) for w, (a, b), spec in zip(weights, factors, specs))
    # The kernel as a (*stacked, fan_in, fan_out) matrix; a and b come back in the factor shapes of the layout.
    stack = tuple(shape[k] for k in layout.stack)
    mat = jnp.transpose(delta, layout.stack + layout.fan_in + layout.fan_out).reshape(stack + layout.sizes(shape))
    u, s, vh = jnp.linalg.svd(mat, full_matrices=False)
    root = jnp.sqrt(s[..., :r])  # split the singular values evenly between a and b
    a = (u[..., :r] * root[..., None, :]).reshape(layout.a_shape(shape, r))
    b = (root[..., :, None] * vh[..., :r, :]).reshape(layout.b_shape(shape, r))
    return a, b, s


def combine_adapters(
    adapters: Sequence[Any],
    weights: Sequence[float],
    method: str = "cat",
    rank: int | None = None,
) -> Adapter:
    """One adapter whose update is ``Σ wᵢ·ΔWᵢ``, like PEFT's ``add_weighted_adapter``.

    * ``method="cat"``: exact. Factors are concatenated along the rank axis
      (rank ``Σ rᵢ`` per target) with ``wᵢ·scaleᵢ`` folded into each ``b``;
      the result has ``alpha = rank`` (scale 1), so merging it gives
      ``Σ wᵢ·ΔWᵢ`` up to float32 rounding.
    * ``method="svd"``: the combined update is formed in float32 and truncated
      by SVD to ``rank`` (default: the largest input rank; capped at
      ``min(fan_in, fan_out)``), the singular values split evenly between
      ``a`` and ``b``. The relative Frobenius error
      ``‖ΔW - ΔW_svd‖ / ‖ΔW‖`` of each target (0.0 where ΔW is 0) is
      reported in ``result.metadata["combine"]["relative_error"]`` (a dict
      ``{path: error}``) and the largest one in ``["max_relative_error"]``.

    A target present in only some adapters is combined from those alone.
    Factors come out in the common dtype of the inputs.

    Args:
        adapters: :class:`Adapter` objects or lorafied params, all for one base.
        weights: one float per adapter (negative allowed, e.g. to subtract a task).
        method: ``"cat"`` or ``"svd"``.
        rank: target rank for ``"svd"``; must be None for ``"cat"``.

    Returns:
        An :class:`Adapter`; its metadata records the method, weights and (svd) errors.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> base = {"dense": {"kernel": jnp.ones((8, 6))}}
        >>> p1 = lorajax.lorafy(base, rank=2, where=".*", key=jax.random.key(1), init="gaussian")
        >>> p2 = lorajax.lorafy(base, rank=3, where=".*", key=jax.random.key(2), init="gaussian")
        >>> lorajax.combine_adapters([p1, p2], [0.5, 0.5], method="cat")["dense/kernel"].rank
        5
        >>> svd = lorajax.combine_adapters([p1, p2], [0.5, 0.5], method="svd", rank=1)
        >>> svd.metadata["combine"]["max_relative_error"] >= 0
        True
    """
    ads = [as_adapter(x, caller="combine_adapters") for x in adapters]
    reject_dora(
        ads,
        "combine_adapters",
        "DoRA rescales each output feature by m/||W + dW||, which is not linear in the adapters, so no weighted sum "
        "of their factors gives the weighted sum of their effects",
        "Merge each DoRA adapter into its own copy of the base (lorajax.merge) and combine the merged weights, or "
        "combine plain LoRA adapters.",
    )
    weights = [float(w) for w in weights]
    if not ads:
        raise ValueError("combine_adapters: give at least one adapter.")
    if len(weights) != len(ads):
        raise ValueError(
            f"combine_adapters: {len(ads)} adapters but {len(weights)} weights; give one weight per adapter."
        )
    if method not in ("cat", "svd"):
        raise ValueError(f"combine_adapters: method must be 'cat' or 'svd', got {method!r}.")
    if method == "cat" and rank is not None:
        raise ValueError("combine_adapters: rank applies to method='svd' only; 'cat' has rank Σ rᵢ by construction.")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"combine_adapters: rank must be an integer >= 1, got {rank!r}.")
    out: dict[str, AdapterFactors] = {}
    errors: dict[str, float] = {}
    for name, members in group_targets(ads, "combine_adapters").items():
        ref = members[0][1]
        dtype = jnp.result_type(*[f.a.dtype for _, f in members], *[f.b.dtype for _, f in members])
        if method == "cat":
            a = jnp.concatenate([jnp.asarray(f.a, dtype) for _, f in members], axis=-1)
            b = jnp.concatenate(
                [fold_scale(jnp.asarray(f.b), weights[k] * f.scale, dtype) for k, f in members],
                axis=len(ref.layout.stack),  # the rank axis of b
            )
            r = int(a.shape[-1])
        else:
            fan_in, fan_out = ref.layout.sizes(ref.shape)
            r = min(rank or max(f.rank for _, f in members), fan_in, fan_out)
            a, b, s = _svd_factors(
                jnp.asarray([weights[k] for k, _ in members], jnp.float32),
                [(f.a, f.b) for _, f in members],
                specs=tuple(f.spec for _, f in members),
                shape=ref.shape,
                r=r,
            )
            s64 = np.asarray(s, np.float64)
            total = float(np.sum(s64**2))
            errors[name] = float(np.sqrt(np.sum(s64[..., r:] ** 2) / total)) if total > 0 else 0.0
        spec = LoRASpec(rank=r, alpha=float(r), layout=ref.layout)  # scale 1: the weights and scales are folded in
        out[name] = AdapterFactors(a=a.astype(dtype), b=b.astype(dtype), spec=spec, shape=ref.shape, dtype=ref.dtype)
    info: dict[str, Any] = {"method": method, "weights": weights, "sources": len(ads)}
    if method == "svd":
        info.update(rank=rank, relative_error=errors, max_relative_error=max(errors.values(), default=0.0))
    return Adapter(out, dump_metadata({"combine": info}))
