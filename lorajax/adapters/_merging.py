"""The arithmetic of model merging, as PEFT 0.21.2 does it (``peft/utils/merge_utils.py``), in JAX.

Every function here works on *task tensors stacked on axis 0* (one entry per
adapter) and is pure: the randomness of DARE comes in as explicit boolean masks
(:func:`random_mask`, drawn from a JAX key), so one mask gives one result.
``batch_ndim`` counts the axes after the adapter axis that hold separate
matrices (stacked layers, ``"s"`` in a layout): magnitude pruning keeps the top
entries of each such matrix, as PEFT does for each module.

The five merges (:func:`task_arithmetic`, :func:`magnitude_prune`,
:func:`ties`, :func:`dare_linear`, :func:`dare_ties`) are PEFT's functions of the
same names: prune each task tensor, elect a sign per entry from the *unweighted*
pruned tensors (TIES), weight them, then sum (linear) or average the entries
that agree with the elected sign (disjoint merge). :func:`dare_masks` draws the
masks :func:`lorajax.combine_adapters` uses, one key per target, part and adapter.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lorajax.adapters._adapter import as_adapter

#: How TIES elects each entry's sign: ``"total"`` by the sign of the sum, ``"frequency"`` by the sign count.
SIGN_METHODS = ("total", "frequency")
#: The DARE methods and the parts of a target their masks cover: the factors, or the full update.
DARE_PARTS = {
    "dare_linear": ("a", "b"),
    "dare_ties": ("a", "b"),
    "dare_linear_svd": ("delta",),
    "dare_ties_svd": ("delta",),
}
_PART_IDS = {"a": 0, "b": 1, "delta": 2}


def magnitude_mask(x: jax.Array, density: float, batch_ndim: int = 0) -> jax.Array:
    """Where the ``int(density · n)`` largest ``|x|`` of each matrix are (``n`` its entries), as booleans.

    The matrices are ``x``'s trailing axes after ``batch_ndim`` leading ones.
    ``density >= 1`` keeps everything (PEFT prunes nothing there).

    >>> magnitude_mask(jnp.array([[3.0, -2.0], [1.0, 0.5]]), 0.5).tolist()
    [[True, True], [False, False]]
    >>> magnitude_mask(jnp.array([[3.0, -2.0], [1.0, 0.5]]), 0.5, batch_ndim=1).tolist()
    [[True, False], [True, False]]
    """
    x = jnp.asarray(x)
    if density >= 1:
        return jnp.ones(x.shape, bool)
    flat = jnp.abs(x).reshape(math.prod(x.shape[:batch_ndim]), -1)
    n = flat.shape[-1]
    k = int(density * n)  # PEFT's count: int() rounds down
    if k == 0:
        return jnp.zeros(x.shape, bool)

    def one(row: jax.Array) -> jax.Array:
        return jnp.zeros(n, bool).at[jax.lax.top_k(row, k)[1]].set(True)

    return jax.vmap(one)(flat).reshape(x.shape)


def random_mask(key: jax.Array, shape: tuple[int, ...], density: float) -> jax.Array:
    """Which entries DARE keeps: each independently with probability ``density`` (a Bernoulli draw).

    >>> m = random_mask(jax.random.key(0), (1000,), 0.3)
    >>> m.dtype.name, 0.25 < float(m.mean()) < 0.35
    ('bool', True)
    """
    return jax.random.bernoulli(key, density, tuple(shape))


def magnitude_prune_each(stacked: jax.Array, density: float, batch_ndim: int = 0) -> jax.Array:
    """Each task tensor (axis 0) with all but its largest-magnitude ``density`` share of entries set to 0.

    >>> magnitude_prune_each(jnp.array([[1.0, -3.0], [2.0, 0.5]]), 0.5).tolist()
    [[0.0, -3.0], [2.0, 0.0]]
    """
    return jnp.where(magnitude_mask(stacked, density, batch_ndim + 1), stacked, 0)


def random_prune_each(stacked: jax.Array, density: float, masks: jax.Array) -> jax.Array:
    """DARE's drop and rescale: entries outside ``masks`` set to 0, the rest divided by ``density``.

    ``density >= 1`` keeps everything unscaled, as PEFT does.

    >>> random_prune_each(jnp.array([[1.0, 2.0]]), 0.5, jnp.array([[True, False]])).tolist()
    [[2.0, 0.0]]
    """
    if density >= 1:
        return stacked
    return jnp.where(masks, stacked, 0) / jnp.asarray(density, stacked.dtype)


def elect_sign(stacked: jax.Array, method: str = "total") -> jax.Array:
    """TIES' sign election: where each task tensor's sign agrees with the elected one (zeros never do).

    The elected sign is that of the sum over the tensors (``"total"``) or of
    the sum of their signs (``"frequency"``), ``+`` on a tie.

    >>> elect_sign(jnp.array([[1.0, -1.0, 0.0], [-3.0, -1.0, 2.0]])).tolist()
    [[False, True, False], [True, True, True]]
    >>> elect_sign(jnp.array([[1.0], [1.0], [-5.0]]), "frequency").ravel().tolist()
    [True, True, False]
    """
    sign = jnp.sign(stacked)
    if method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {method!r}.")
    magnitude = stacked.sum(0) if method == "total" else sign.sum(0)
    majority = jnp.where(magnitude >= 0, 1, -1).astype(sign.dtype)
    return sign == majority


def disjoint_merge(weighted: jax.Array, agree: jax.Array) -> jax.Array:
    """The mean, per entry, of the weighted task tensors that agree with the elected sign (0 where none does).

    >>> disjoint_merge(jnp.array([[2.0, 1.0], [4.0, -1.0]]), jnp.array([[True, False], [True, False]])).tolist()
    [3.0, 0.0]
    """
    count = jnp.maximum(agree.sum(0), 1).astype(weighted.dtype)
    return jnp.where(agree, weighted, 0).sum(0) / count


def _weighted(stacked: jax.Array, weights: Any) -> jax.Array:
    w = jnp.asarray(weights, stacked.dtype)
    return stacked * w.reshape(w.shape + (1,) * (stacked.ndim - 1))


def task_arithmetic(stacked: jax.Array, weights: Any) -> jax.Array:
    """``Σ wᵢ·xᵢ``: the weighted sum of the task tensors.

    >>> task_arithmetic(jnp.array([[1.0, 2.0], [3.0, 4.0]]), [1.0, -1.0]).tolist()
    [-2.0, -2.0]
    """
    return _weighted(stacked, weights).sum(0)


def magnitude_prune(stacked: jax.Array, weights: Any, density: float, batch_ndim: int = 0) -> jax.Array:
    """The weighted sum of the task tensors, each first pruned to its largest ``density`` share by magnitude.

    >>> magnitude_prune(jnp.array([[1.0, -3.0], [2.0, 0.5]]), [1.0, 1.0], 0.5).tolist()
    [2.0, -3.0]
    """
    return task_arithmetic(magnitude_prune_each(stacked, density, batch_ndim), weights)


def ties(
    stacked: jax.Array, weights: Any, density: float, majority_sign_method: str = "total", batch_ndim: int = 0
) -> jax.Array:
    """TIES-merging: trim by magnitude, elect signs (unweighted), average the agreeing weighted entries.

    >>> ties(jnp.array([[1.0, -3.0], [2.0, 0.5]]), [1.0, 1.0], 0.5).tolist()
    [2.0, -3.0]
    """
    pruned = magnitude_prune_each(stacked, density, batch_ndim)
    return disjoint_merge(_weighted(pruned, weights), elect_sign(pruned, majority_sign_method))


def dare_linear(stacked: jax.Array, weights: Any, density: float, masks: jax.Array) -> jax.Array:
    """DARE: drop the entries outside ``masks``, rescale the rest by ``1/density``, take the weighted sum.

    >>> dare_linear(jnp.array([[1.0, 2.0], [3.0, 4.0]]), [1.0, 1.0], 0.5, jnp.array([[1, 0], [0, 1]], bool)).tolist()
    [2.0, 8.0]
    """
    return task_arithmetic(random_prune_each(stacked, density, masks), weights)


def dare_ties(
    stacked: jax.Array, weights: Any, density: float, masks: jax.Array, majority_sign_method: str = "total"
) -> jax.Array:
    """DARE's drop and rescale, then TIES' sign election and disjoint merge.

    >>> m = jnp.ones((2, 2), bool)
    >>> dare_ties(jnp.array([[1.0, -2.0], [3.0, 4.0]]), [1.0, 1.0], 0.5, m).tolist()
    [4.0, 8.0]
    """
    pruned = random_prune_each(stacked, density, masks)
    return disjoint_merge(_weighted(pruned, weights), elect_sign(pruned, majority_sign_method))


def dare_key(key: Any, path: str, part: str, index: int) -> jax.Array:
    """The key of one DARE mask: fixed by the target's path, the part and the adapter's position."""
    key = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
    return jax.random.fold_in(jax.random.fold_in(key, _PART_IDS[part]), index)


def dare_masks(adapters: Sequence[Any], method: str, density: float, key: jax.Array) -> dict[str, dict[str, list[Any]]]:
    """The DARE masks :func:`combine_adapters` draws from ``key``: which entries it keeps.

    Each mask is a boolean array, ``True`` with probability ``density``
    (``jax.random.bernoulli``), from a key that depends only on ``key``, the
    target's path, the part (``"a"``, ``"b"`` or ``"delta"``) and the adapter's
    position, so a target's masks do not change when other targets come or go.
    Give them to a reference (PEFT's ``torch.bernoulli``) to check the arithmetic
    given the same draw.

    Args:
        adapters: :class:`Adapter` objects or lorafied params, as for :func:`combine_adapters`.
        method: a DARE method: ``"dare_linear"``, ``"dare_ties"`` (masks on the factors: parts
            ``"a"`` and ``"b"``, shaped like them) or ``"dare_linear_svd"``, ``"dare_ties_svd"``
            (masks on the full update: part ``"delta"``, shaped like the base kernel).
        density: the probability of keeping an entry, in (0, 1].
        key: a JAX PRNG key.

    Returns:
        ``{path: {part: [mask of adapter 0, mask of adapter 1, ...]}}``, ``None`` where
        an adapter has no factors at that path.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> base = {"dense": {"kernel": jnp.ones((8, 6))}}
        >>> p = [lorajax.lorafy(base, rank=2, where=".*", key=jax.random.key(s)) for s in (1, 2)]
        >>> masks = lorajax.dare_masks(p, "dare_ties", 0.5, jax.random.key(0))
        >>> [m.shape for m in masks["dense/kernel"]["b"]]
        [(2, 6), (2, 6)]
    """
    if method not in DARE_PARTS:
        raise ValueError(f"dare_masks: method must be one of {', '.join(map(repr, DARE_PARTS))}; got {method!r}.")
    density = check_density(density, "dare_masks")
    ads = [as_adapter(x, caller="dare_masks") for x in adapters]
    out: dict[str, dict[str, list[Any]]] = {}
    for name in sorted({name for ad in ads for name in ad.factors}):
        out[name] = {}
        for part in DARE_PARTS[method]:
            out[name][part] = [
                None
                if name not in ad.factors
                else random_mask(
                    dare_key(key, name, part, k),
                    ad[name].shape if part == "delta" else getattr(ad[name], part).shape,
                    density,
                )
                for k, ad in enumerate(ads)
            ]
    return out


def check_density(density: Any, caller: str) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(
            f"{caller}: density must be a number in (0, 1] (the share of entries each adapter keeps), got {density!r}."
        )
    return float(density)
