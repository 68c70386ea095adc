"""Validated LoRA configuration values: ranks, alphas, their per-target patterns and the PRNG key.

``lorafy`` checks everything a user passes before it touches a kernel, and reports every bad value in
one error (:class:`lorajax._problems.Problems`) naming the field, the pattern key and the value. A rank
is a positive integer (Python or NumPy; ``bool`` is refused), an alpha a finite positive real number.
A per-target value is looked up so that "no key matches" (the global value applies) is never confused
with a matched value that happens to be falsy (``rank_pattern={"query": 0}`` is an error, not rank ``r``).
"""

from __future__ import annotations

import functools
import numbers
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorajax._paths import KeyPath
from lorajax._problems import Problems
from lorajax._targets import match_pattern

__all__ = ["DEFAULT_SEED", "MISSING", "alpha_problem", "check_config", "prng_key", "rank_problem", "target_config"]

#: The seed of the key ``lorafy`` uses when none is given.
DEFAULT_SEED = 0

#: What :func:`lorajax._targets.match_pattern` returns here where no key of a pattern names the target.
MISSING: Any = object()


def _scalar(value: Any) -> Any:
    """A concrete 0-d NumPy/JAX array as its Python scalar; anything else unchanged."""
    if (
        isinstance(value, (np.ndarray, jax.Array))
        and not isinstance(value, jax.core.Tracer)
        and value.ndim == 0
        and (jnp.issubdtype(value.dtype, jnp.number) or jnp.issubdtype(value.dtype, jnp.bool_))
    ):
        return value.item()
    return value


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def rank_problem(value: Any) -> str | None:
    """Why ``value`` is no LoRA rank, or ``None`` where it is one (an integer >= 1, NumPy integers included).

    >>> rank_problem(8) is None, rank_problem(np.int64(8)) is None
    (True, True)
    >>> rank_problem(0), rank_problem(True), rank_problem(2.0)
    ('must be an integer >= 1, got 0', 'must be an integer >= 1, got True (a bool)', 'must be an integer >= 1, got 2.0')
    """
    value = _scalar(value)
    if _is_bool(value):
        return f"must be an integer >= 1, got {value!r} (a bool)"
    if not isinstance(value, numbers.Integral) or int(value) < 1:
        return f"must be an integer >= 1, got {value!r}"
    return None


def alpha_problem(value: Any) -> str | None:
    """Why ``value`` is no LoRA alpha, or ``None`` where it is one (a finite real number > 0).

    >>> alpha_problem(16) is None, alpha_problem(np.float32(0.5)) is None
    (True, True)
    >>> alpha_problem(0.0), alpha_problem(float("nan"))
    ('must be a finite number > 0, got 0.0', 'must be a finite number > 0, got nan')
    """
    value = _scalar(value)
    if _is_bool(value) or not isinstance(value, numbers.Real):
        return f"must be a finite number > 0, got {value!r}" + (" (a bool)" if _is_bool(value) else "")
    if not (np.isfinite(float(value)) and float(value) > 0):
        return f"must be a finite number > 0, got {value!r}"
    return None


def _pattern_problems(field: str, pattern: Any, problem: Any) -> list[str]:
    if pattern is None:
        return []
    if not isinstance(pattern, Mapping):
        return [f"{field} must be a dict {{module name or regex: value}}, got {type(pattern).__name__} {pattern!r}"]
    out = []
    for key, value in pattern.items():
        if not isinstance(key, str):
            out.append(f"{field}: key {key!r} must be a string (a module name or regex)")
            continue
        try:
            re.compile(key)
        except re.error as e:
            out.append(f"{field}: key {key!r} is not a valid regular expression ({e})")
        why = problem(value)
        if why:
            out.append(f"{field}[{key!r}] {why}")
    return out


@functools.cache
def _raw_key_shape() -> tuple[int, ...]:
    return tuple(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape)


def _key_problem(key: Any) -> str | None:
    if key is None:
        return None
    seed = _scalar(key)
    if isinstance(seed, numbers.Integral) and not _is_bool(seed):
        return None
    dtype = getattr(key, "dtype", None)
    shape = tuple(getattr(key, "shape", ()))
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return None if shape == () else f"must be a single PRNG key, got an array of {shape} keys"
    if dtype is not None and jnp.dtype(dtype) == jnp.uint32 and shape == _raw_key_shape():
        return None  # a raw key (jax.random.PRNGKey)
    if dtype is not None and jnp.issubdtype(dtype, jnp.integer) and shape == ():
        return None  # a traced integer seed
    what = f"{type(key).__name__}" + (f" of shape {shape} and dtype {dtype}" if dtype is not None else f" {key!r}")
    return (
        f"must be None, an integer seed or a PRNG key (jax.random.key(seed), or jax.random.PRNGKey(seed) of "
        f"shape {_raw_key_shape()} uint32), got {what}"
    )


def prng_key(key: Any) -> jax.Array:
    """``key`` as a PRNG key: ``None`` is ``jax.random.key(DEFAULT_SEED)``, an integer a seed; keys pass unchanged.

    Call :func:`check_config` first: this converts without checking.

    >>> prng_key(3).dtype == jax.random.key(3).dtype
    True
    """
    if key is None:
        return jax.random.key(DEFAULT_SEED)
    seed = _scalar(key)
    if isinstance(seed, numbers.Integral):
        return jax.random.key(int(seed))
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or tuple(key.shape) == _raw_key_shape():
        return key
    return jax.random.key(key)  # a traced integer seed


def check_config(
    caller: str,
    *,
    rank: Any,
    alpha: Any = None,
    rank_pattern: Any = None,
    alpha_pattern: Any = None,
    key: Any = None,
) -> None:
    """Raise one ValueError listing every invalid value among ``lorafy``'s configuration arguments.

    >>> check_config("lorafy", rank=4, alpha=8, rank_pattern={"query": 8})
    >>> try:
    ...     check_config("lorafy", rank=4, alpha=float("nan"), rank_pattern={"query": 0})
    ... except ValueError as e:
    ...     print(e)
    lorafy: invalid LoRA configuration (2 problems):
      - alpha must be a finite number > 0, got nan
      - rank_pattern['query'] must be an integer >= 1, got 0
    Ranks are positive integers, alphas finite positive numbers (alpha=None means alpha = rank, scale 1).
    """
    problems = Problems(caller)
    for field, value, problem in (("rank", rank, rank_problem), ("alpha", alpha, alpha_problem)):
        why = None if field == "alpha" and value is None else problem(value)
        if why:
            problems.add(f"{field} {why}")
    problems.extend(_pattern_problems("rank_pattern", rank_pattern, rank_problem))
    problems.extend(_pattern_problems("alpha_pattern", alpha_pattern, alpha_problem))
    why = _key_problem(key)
    if why:
        problems.add(f"key {why}")
    problems.raise_if_any(
        "invalid LoRA configuration",
        "Ranks are positive integers, alphas finite positive numbers (alpha=None means alpha = rank, scale 1).",
    )


def target_config(
    path: KeyPath, rank: Any, alpha: Any, rank_pattern: Any = None, alpha_pattern: Any = None
) -> tuple[int, float]:
    """``(rank, alpha)`` of one target: its pattern entries where a key names it, else the global values.

    ``alpha`` ``None`` (no global, no pattern entry) means the target's own rank. Values checked by
    :func:`check_config`; a matched falsy value is used, never read as "no match".

    >>> from jax.tree_util import DictKey
    >>> path = (DictKey("query"), DictKey("kernel"))
    >>> target_config(path, 4, None, {"query": 8}), target_config(path, 4, 2.0, {"value": 8}, {"query": 1})
    ((8, 8.0), (4, 1.0))
    """
    r = match_pattern(dict(rank_pattern or {}), path, default=MISSING)
    r = int(_scalar(rank if r is MISSING else r))
    a = match_pattern(dict(alpha_pattern or {}), path, default=MISSING)
    a = alpha if a is MISSING else a
    return r, float(_scalar(r if a is None else a))
