"""Walking jaxprs in tests: what values a traced computation forms."""

from __future__ import annotations


def computed_shapes(jaxpr, only: str | None = None) -> list[tuple[int, ...]]:
    """The shape of every value any equation of ``jaxpr`` (and its sub-jaxprs) computes; ``only``: one primitive's.

    ``stop_gradient`` is left out: it returns the frozen base itself (no computation, no new buffer).
    """
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name != "stop_gradient" and only in (None, eqn.primitive.name):
            shapes += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for v in eqn.params.values():
            for j in v if isinstance(v, tuple) else (v,):
                inner = getattr(j, "jaxpr", j)
                if hasattr(inner, "eqns"):
                    shapes += computed_shapes(inner, only)
    return shapes
