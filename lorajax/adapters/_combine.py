"""Combining adapters into one, like PEFT's ``add_weighted_adapter``: one rule per combination method.

A method is a *space* and a *merge*. The space says what the merge works on:
``cat`` concatenates the factors; the factor methods (``linear``, ``ties``,
``dare_linear``, ``dare_ties``, ``magnitude_prune``) merge the ``a`` factors and
the ``b`` factors separately, each weighted by ``±√|wᵢ·scaleᵢ|`` (the sign on
``a`` only), so every adapter needs the same rank at a target; the ``*_svd``
methods (and ``svd``) merge the full updates ``scaleᵢ·aᵢ·bᵢ`` weighted by ``wᵢ``
and factor the result back by SVD. The merges (``_merging``) are PEFT's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorajax._node import LoRASpec, fold_scale, lora_delta
from lorajax._problems import Problems
from lorajax.adapters import _merging as merging
from lorajax.adapters._adapter import (
    Adapter,
    AdapterFactors,
    as_adapter,
    dump_metadata,
    reject_dora,
    reject_lora_bias,
    reject_trainables,
)
from lorajax.adapters._attach import group_targets

Members = list[tuple[int, AdapterFactors]]
#: (stacked task tensors, weights, density, majority sign method, DARE masks, batch_ndim) -> merged tensor.
MergeFn = Callable[[jax.Array, Any, Any, Any, Any, int], jax.Array]


@dataclasses.dataclass(frozen=True)
class Merge:
    """How task tensors become one, and which options that takes."""

    fn: MergeFn
    density: bool = False  # prunes: needs density
    signs: bool = False  # elects signs: takes majority_sign_method
    random: bool = False  # DARE: needs a key


MERGES: dict[str, Merge] = {
    "linear": Merge(lambda x, w, d, s, m, nb: merging.task_arithmetic(x, w)),
    "ties": Merge(lambda x, w, d, s, m, nb: merging.ties(x, w, d, s, nb), density=True, signs=True),
    "dare_linear": Merge(lambda x, w, d, s, m, nb: merging.dare_linear(x, w, d, m), density=True, random=True),
    "dare_ties": Merge(
        lambda x, w, d, s, m, nb: merging.dare_ties(x, w, d, m, s), density=True, signs=True, random=True
    ),
    "magnitude_prune": Merge(lambda x, w, d, s, m, nb: merging.magnitude_prune(x, w, d, nb), density=True),
}


@dataclasses.dataclass(frozen=True)
class Options:
    """The method's options for one call, checked: what every target's rule reads."""

    merge: str
    weights: list[float]
    rank: int | None = None
    density: float | None = None
    sign: str = "total"
    clamp: float | None = None
    masks: dict[str, dict[str, list[Any]]] = dataclasses.field(default_factory=dict)


@partial(jax.jit, static_argnames=("merge", "density", "sign", "batch_ndim"))
def _merge_stacked(stacked: Any, weights: Any, masks: Any, merge: str, density: Any, sign: str, batch_ndim: int) -> Any:
    return MERGES[merge].fn(stacked, weights, density, sign, masks, batch_ndim)


def _dtype(members: Members) -> Any:
    return jnp.result_type(*[f.a.dtype for _, f in members], *[f.b.dtype for _, f in members])


def _cat(name: str, members: Members, o: Options) -> tuple[Any, Any, int, float | None]:
    """Exact: factors side by side along the rank axis, ``wᵢ·scaleᵢ`` folded into each ``b``."""
    ref, dtype = members[0][1], _dtype(members)
    a = jnp.concatenate([jnp.asarray(f.a, dtype) for _, f in members], axis=-1)
    b = jnp.concatenate(
        [fold_scale(jnp.asarray(f.b), o.weights[k] * f.scale, dtype) for k, f in members],
        axis=len(ref.layout.stack),  # the rank axis of b
    )
    return a, b, int(a.shape[-1]), None


def _on_factors(name: str, members: Members, o: Options) -> tuple[Any, Any, int, float | None]:
    """PEFT's factor methods: the ``a``s merged with weights ``±√|wᵢ·sᵢ|``, the ``b``s with ``√|wᵢ·sᵢ|``."""
    ref = members[0][1]
    ws = [o.weights[k] * f.scale for k, f in members]
    roots = [math.sqrt(abs(w)) for w in ws]
    signed = [r if w >= 0 else -r for r, w in zip(roots, ws)]  # the sign on one side only
    nb = len(ref.layout.stack)
    out = []
    for part, w in (("a", signed), ("b", roots)):
        stacked = jnp.stack([jnp.asarray(getattr(f, part), jnp.float32) for _, f in members])
        masks = o.masks.get(name, {}).get(part)
        m = None if masks is None else jnp.stack([masks[k] for k, _ in members])
        out.append(_merge_stacked(stacked, jnp.asarray(w, jnp.float32), m, o.merge, o.density, o.sign, nb))
    return out[0], out[1], ref.rank, None


@partial(jax.jit, static_argnames=("specs", "shape", "r", "merge", "density", "sign", "clamp"))
def _svd_factors(
    weights: jax.Array,
    factors: list[tuple[Any, Any]],
    masks: Any,
    specs: tuple[LoRASpec, ...],
    shape: tuple[int, ...],
    r: int,
    merge: str,
    density: Any,
    sign: str,
    clamp: float | None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Rank-``r`` factors of the merged ``ΔWᵢ`` (float32) in the kernel's layout, all singular values, and the error.

    The error is ``‖ΔW - a·b‖`` over all stacked slices; singular vectors have a fixed sign (the largest entry of each
    ``a`` column positive). Without ``clamp`` the singular values are split evenly between ``a`` and ``b``; with it
    they go to ``b`` (PEFT's ``U·S``) and both factors are clipped to ``±`` the ``clamp`` quantile of their entries.
    """
    layout = specs[0].layout
    deltas = jnp.stack([lora_delta(a, b, spec, jnp.float32) for (a, b), spec in zip(factors, specs)])
    delta = MERGES[merge].fn(deltas, weights, density, sign, masks, len(layout.stack))
    # The kernel as a (*stacked, fan_in, fan_out) matrix; a and b come back in the factor shapes of the layout.
    stack = tuple(shape[k] for k in layout.stack)
    mat = jnp.transpose(delta, layout.stack + layout.fan_in + layout.fan_out).reshape(stack + layout.sizes(shape))
    u, s, vh = jnp.linalg.svd(mat, full_matrices=False)
    u, vh = u[..., :r], vh[..., :r, :]
    pick = jnp.argmax(jnp.abs(u), axis=-2, keepdims=True)
    flip = jnp.where(jnp.take_along_axis(u, pick, axis=-2) < 0, -1.0, 1.0)  # (..., 1, r)
    u, vh = u * flip, vh * jnp.swapaxes(flip, -1, -2)
    if clamp is None:
        root = jnp.sqrt(s[..., :r])  # split the singular values evenly between a and b
        a, b = u * root[..., None, :], root[..., :, None] * vh
    else:
        a, b = u, s[..., :r, None] * vh
        both = jnp.concatenate([a.reshape(*stack, -1), b.reshape(*stack, -1)], axis=-1)
        hi = jnp.quantile(both, clamp, axis=-1)[..., None, None]
        a, b = jnp.clip(a, -hi, hi), jnp.clip(b, -hi, hi)
    # With a clamp the error is measured; without, _on_delta reads it off the singular values.
    error = jnp.linalg.norm(mat - a @ b) / jnp.linalg.norm(mat) if clamp is not None else jnp.zeros(())
    return a.reshape(layout.a_shape(shape, r)), b.reshape(layout.b_shape(shape, r)), s, error


def _on_delta(name: str, members: Members, o: Options) -> tuple[Any, Any, int, float | None]:
    """PEFT's ``*_svd`` methods: merge the updates ``scaleᵢ·aᵢ·bᵢ`` weighted by ``wᵢ``, keep the top ``r`` by SVD."""
    ref = members[0][1]
    fan_in, fan_out = ref.layout.sizes(ref.shape)
    r = min(o.rank or max(f.rank for _, f in members), fan_in, fan_out)
    masks = o.masks.get(name, {}).get("delta")
    a, b, s, direct = _svd_factors(
        jnp.asarray([o.weights[k] for k, _ in members], jnp.float32),
        [(f.a, f.b) for _, f in members],
        None if masks is None else jnp.stack([masks[k] for k, _ in members]),
        specs=tuple(f.spec for _, f in members),
        shape=ref.shape,
        r=r,
        merge=o.merge,
        density=o.density,
        sign=o.sign,
        clamp=o.clamp,
    )
    s64 = np.asarray(s, np.float64)
    total = float(np.sum(s64**2))
    if total == 0:
        return a, b, r, 0.0
    # Without a clamp the error is exactly the discarded singular values' share (Eckart-Young).
    error = float(np.sqrt(np.sum(s64[..., r:] ** 2) / total)) if o.clamp is None else float(direct)
    return a, b, r, error


#: method -> (how a target is combined, which merge it uses): PEFT's eleven ``combination_type`` values.
METHODS: dict[str, tuple[Callable[[str, Members, Options], tuple[Any, Any, int, float | None]], str]] = {
    "cat": (_cat, "linear"),
    "linear": (_on_factors, "linear"),
    "ties": (_on_factors, "ties"),
    "dare_linear": (_on_factors, "dare_linear"),
    "dare_ties": (_on_factors, "dare_ties"),
    "magnitude_prune": (_on_factors, "magnitude_prune"),
    "svd": (_on_delta, "linear"),
    "ties_svd": (_on_delta, "ties"),
    "dare_linear_svd": (_on_delta, "dare_linear"),
    "dare_ties_svd": (_on_delta, "dare_ties"),
    "magnitude_prune_svd": (_on_delta, "magnitude_prune"),
}

SVD_METHODS = tuple(m for m, (rule, _) in METHODS.items() if rule is _on_delta)
DARE_METHODS = tuple(m for m, (_, merge) in METHODS.items() if MERGES[merge].random)


def _options(
    method: str, n: int, weights: list[float], rank: Any, density: Any, sign: Any, key: Any, clamp: Any
) -> tuple[str, Options]:
    """The checked options, and the merge to run: PEFT merges a single adapter by ``linear`` whatever the method."""
    if method not in METHODS:
        raise ValueError(f"combine_adapters: method must be one of {', '.join(map(repr, METHODS))}; got {method!r}.")
    rule, merge = METHODS[method]
    needs = MERGES[merge]
    if rank is not None and rule is not _on_delta:
        what = "rank Σ rᵢ" if method == "cat" else "the adapters' common rank"
        raise ValueError(
            f"combine_adapters: rank applies to the SVD methods only ({', '.join(SVD_METHODS)}); "
            f"{method!r} gives {what} by construction."
        )
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"combine_adapters: rank must be an integer >= 1, got {rank!r}.")
    uses = [m for m, (_, g) in METHODS.items() if MERGES[g].density]
    if not needs.density and density is not None:
        raise ValueError(f"combine_adapters: density applies to {', '.join(uses)} only, not {method!r}.")
    if needs.density:
        if density is None:
            raise ValueError(
                f"combine_adapters: method {method!r} prunes each adapter: give density=, the share of "
                "entries kept, in (0, 1] (e.g. density=0.5)."
            )
        density = merging.check_density(density, "combine_adapters")
    if sign is not None and not needs.signs:
        elect = [m for m, (_, g) in METHODS.items() if MERGES[g].signs]
        raise ValueError(f"combine_adapters: majority_sign_method applies to {', '.join(elect)} only, not {method!r}.")
    sign = "total" if sign is None else sign
    if sign not in merging.SIGN_METHODS:
        raise ValueError(f"combine_adapters: majority_sign_method must be 'total' or 'frequency', got {sign!r}.")
    if needs.random and key is None:
        raise ValueError(
            f"combine_adapters: {method!r} drops entries at random: give key=jax.random.key(...) "
            "(the same key gives the same adapter; lorajax.dare_masks shows what it drops)."
        )
    if key is not None and not needs.random:
        raise ValueError(f"combine_adapters: key applies to the DARE methods only ({', '.join(DARE_METHODS)}).")
    if clamp is not None and rule is not _on_delta:
        raise ValueError(f"combine_adapters: clamp applies to the SVD methods only ({', '.join(SVD_METHODS)}).")
    if clamp is not None and (isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or not 0 <= clamp <= 1):
        raise ValueError(f"combine_adapters: clamp must be a quantile in [0, 1] (PEFT's svd_clamp), got {clamp!r}.")
    if n == 1 and method not in ("cat", "svd"):
        method, merge = "linear", "linear"  # PEFT's rule: one adapter is merged by 'linear' (no pruning)
    options = Options(merge, weights, rank, density, sign, None if clamp is None else float(clamp))
    return method, options


def combine_adapters(
    adapters: Sequence[Any],
    weights: Sequence[float],
    method: str = "cat",
    rank: int | None = None,
    *,
    density: float | None = None,
    majority_sign_method: str | None = None,
    key: jax.Array | None = None,
    clamp: float | None = None,
) -> Adapter:
    """One adapter from several, by any of PEFT's eleven ``add_weighted_adapter`` methods.

    * ``"cat"``: exact, ``Σ wᵢ·ΔWᵢ``. Factors are concatenated along the rank axis
      (rank ``Σ rᵢ`` per target) with ``wᵢ·scaleᵢ`` folded into each ``b``.
    * ``"svd"``: ``Σ wᵢ·ΔWᵢ`` formed in float32 and truncated by SVD to ``rank``
      (default: the largest input rank; capped at ``min(fan_in, fan_out)``).
    * ``"linear"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"``,
      ``"magnitude_prune"``: PEFT's factor methods. The ``a`` factors and the ``b``
      factors are merged separately, with weights ``±√|wᵢ·scaleᵢ|`` (the sign on
      ``a`` only), so the result is *not* ``Σ wᵢ·ΔWᵢ`` (it has cross terms
      ``aᵢ·bⱼ``), and every adapter must have the same rank at a target.
    * ``"ties_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``,
      ``"magnitude_prune_svd"``: the same merges on the full updates
      ``ΔWᵢ = scaleᵢ·aᵢ·bᵢ`` (weights ``wᵢ``), then truncated by SVD like ``"svd"``.

    The merges: ``magnitude_prune`` keeps each tensor's ``int(density·n)``
    largest-magnitude entries, then sums; ``dare_*`` keeps each entry with
    probability ``density`` (masks drawn from ``key``, see :func:`dare_masks`) and
    divides what it keeps by ``density``; ``ties`` and ``dare_ties`` then elect a
    sign per entry from the unweighted pruned tensors (``majority_sign_method``:
    ``"total"``, the sign of their sum, or ``"frequency"``, the more common sign)
    and average the weighted entries that agree with it. Pruning counts each
    stacked layer (``"s"`` axis) as its own matrix, as PEFT counts each module.
    As in PEFT, a single adapter is combined by ``"linear"`` whatever the method
    (except ``"cat"`` and ``"svd"``), which gives ``w·ΔW`` exactly.

    The SVD methods report the relative Frobenius error ``‖ΔW - ΔW_svd‖ / ‖ΔW‖``
    of each target (``ΔW`` the merged update; 0.0 where it is 0) in
    ``result.metadata["combine"]["relative_error"]`` (``{path: error}``) and the
    largest in ``["max_relative_error"]``. Their singular values are split evenly
    between ``a`` and ``b``; with ``clamp`` they go to ``b`` and both factors are
    clipped to ``±`` the ``clamp`` quantile of their entries, as PEFT does.
    Singular vectors have a fixed sign (each ``a`` column's largest entry positive).

    A target present in only some adapters is combined from those alone.
    Factors come out in the common dtype of the inputs, computed in float32.

    Args:
        adapters: :class:`Adapter` objects or lorafied params, all for one base.
        weights: one float per adapter (negative allowed, e.g. to subtract a task).
        method: one of the eleven methods above (PEFT's ``combination_type``).
        rank: target rank for the SVD methods (PEFT's ``svd_rank``).
        density: the share of entries kept, in (0, 1], for the pruning methods (required there).
        majority_sign_method: ``"total"`` (default) or ``"frequency"``, for the TIES methods.
        key: a JAX PRNG key, required by the DARE methods: the same key gives the same adapter.
        clamp: a quantile in [0, 1] for the SVD methods (PEFT's ``svd_clamp``).

    Returns:
        An :class:`Adapter` with scale 1 at every target (weights and scales folded
        in); its metadata records the method and its options (and the SVD errors).

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
        >>> ties = lorajax.combine_adapters([p1, p1], [0.5, 0.5], method="ties", density=0.5)
        >>> ties["dense/kernel"].rank
        2
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
    reject_lora_bias(ads, "combine_adapters", "Merge each adapter (lorajax.merge) and combine the merged weights.")
    reject_trainables(
        ads,
        "combine_adapters",
        "the combination methods merge low-rank factors, and a whole trained leaf has no factors to merge",
        "Combine adapters without also= leaves, or average those leaves yourself and attach them after combining.",
    )
    weights = [float(w) for w in weights]
    if not ads:
        raise ValueError("combine_adapters: give at least one adapter.")
    if len(weights) != len(ads):
        raise ValueError(
            f"combine_adapters: {len(ads)} adapters but {len(weights)} weights; give one weight per adapter."
        )
    run, o = _options(method, len(ads), weights, rank, density, majority_sign_method, key, clamp)
    rule = METHODS[run][0]
    groups = group_targets(ads, "combine_adapters")
    if rule is _on_factors:
        problems = Problems("combine_adapters")
        for name, members in groups.items():
            if len({f.rank for _, f in members}) > 1:
                ranks = ", ".join(f"adapter {k} rank {f.rank}" for k, f in members)
                problems.add(f"rank: {name}: {ranks}")
        problems.raise_if_any(
            f"{method!r} merges the factors entry by entry, so the adapters need the same rank at each target",
            f"Use 'cat', 'svd' or {', '.join(repr(m) for m in SVD_METHODS[1:])}, which take any ranks.",
        )
    if MERGES[o.merge].random and o.density is not None and key is not None:  # both checked by _options
        o = dataclasses.replace(o, masks=merging.dare_masks(ads, run, o.density, key))
    out: dict[str, AdapterFactors] = {}
    errors: dict[str, float] = {}
    for name, members in groups.items():
        ref, dtype = members[0][1], _dtype(members)
        a, b, r, error = rule(name, members, o)
        if error is not None:
            errors[name] = error
        spec = LoRASpec(rank=r, alpha=float(r), layout=ref.layout)  # scale 1: the weights and scales are folded in
        out[name] = AdapterFactors(a=a.astype(dtype), b=b.astype(dtype), spec=spec, shape=ref.shape, dtype=ref.dtype)
    info: dict[str, Any] = {"method": method, "weights": weights, "sources": len(ads)}
    if run != method:
        info["applied"] = run
    if MERGES[METHODS[method][1]].density:
        info["density"] = o.density
    if MERGES[METHODS[method][1]].signs:
        info["majority_sign_method"] = o.sign
    if key is not None:
        info["key"] = np.asarray(jax.random.key_data(key)).ravel().tolist()
    if rule is _on_delta:
        info.update(rank=rank, relative_error=errors, max_relative_error=max(errors.values(), default=0.0))
        if clamp is not None:
            info["clamp"] = o.clamp
    return Adapter(out, dump_metadata({"combine": info}))
