"""Tolerances from error analysis, not from the machine a test was written on.

Two float32 computations of the same quantity that differ only in the order of their sums (autodiff's
orientation of a product against a custom VJP's, a factored product against the merged kernel's, XLA:CPU
with one thread against many) do not agree bit for bit, and how far apart they land depends on the CPU, the
thread count and the XLA version. What does not depend on them is the classic bound (Higham, *Accuracy
and Stability of Numerical Algorithms*, §3.1): a sum of ``n`` terms computed in any order in floating point
with unit roundoff ``u = eps / 2`` is within ``gamma(n - 1) * sum(|terms|)`` of the exact sum, where
``gamma(k) = k u / (1 - k u)``. A dot product of length ``n`` is within ``gamma(n) * sum(|a_i b_i|)``; a chain of
products adds the lengths. So two such results differ by at most twice that, and a float32 result differs
from a float64 reference (whose own error is negligible) by at most once that.

The bounds are elementwise: ``abs_terms`` is the same computation run on the absolute values of its operands
(``|x|.T @ |g| @ |b|.T`` for ``x.T @ g @ b.T``), best done in float64 with NumPy.
"""

from __future__ import annotations

import numpy as np

#: float32's machine epsilon, 2**-23 (the unit roundoff is half of it).
EPS32 = float(np.finfo(np.float32).eps)


def gamma(n: int, eps: float = EPS32) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``, ``u = eps / 2``: the relative error bound of ``n`` roundings."""
    u = eps / 2
    assert n * u < 1, "the bound needs n * u < 1"
    return n * u / (1 - n * u)


def sum_bound(abs_terms: np.ndarray, n: int, eps: float = EPS32) -> np.ndarray:
    """Bound on a float result's error against the exact value, for a reduction of length ``n`` per entry.

    ``abs_terms``: the reduction run on absolute values (elementwise, float64). ``n``: the number of roundings
    on the longest path (the reduction length; a chain of products adds its lengths).
    """
    return gamma(n, eps) * np.asarray(abs_terms, np.float64)


def order_bound(abs_terms: np.ndarray, n: int, eps: float = EPS32) -> np.ndarray:
    """Bound on the difference of two float computations of the same reduction in different orders."""
    return 2 * sum_bound(abs_terms, n, eps)


def assert_within(got: np.ndarray, want: np.ndarray, bound: np.ndarray, what: str = "") -> float:
    """Assert ``|got - want| <= bound`` elementwise; return the worst ratio ``|got - want| / bound`` (for reports).

    >>> assert_within(np.float32([1.0]), np.float64([1.0 + 1e-8]), np.float64([1e-7])) < 1
    True
    """
    got64, want64 = np.asarray(got, np.float64), np.asarray(want, np.float64)
    bound = np.broadcast_to(np.asarray(bound, np.float64), got64.shape)
    err = np.abs(got64 - want64)
    assert got64.shape == want64.shape, f"{what}: shapes {got64.shape} and {want64.shape}"
    bad = err > bound
    if bad.any():
        k = np.unravel_index(np.argmax(np.where(bad, err - bound, -np.inf)), err.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.size} entries beyond the error bound; worst at {tuple(map(int, k))}: "
            f"got {got64[k]!r}, want {want64[k]!r}, |diff| {err[k]:.3g} > bound {bound[k]:.3g}"
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(bound > 0, err / bound, 0.0)
    return float(ratio.max()) if ratio.size else 0.0
