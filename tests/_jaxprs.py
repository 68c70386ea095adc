"""Walking jaxprs in tests: what values a traced computation forms."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def equations(jaxpr: Any) -> Iterator[Any]:
    """Every equation of ``jaxpr`` and of its sub-jaxprs (scan and cond bodies, pjit, custom derivatives), in order."""
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for j in v if isinstance(v, tuple) else (v,):
                inner = getattr(j, "jaxpr", j)
                if hasattr(inner, "eqns"):
                    yield from equations(inner)


def computed_shapes(jaxpr: Any, only: str | None = None) -> list[tuple[int, ...]]:
    """The shape of every value any equation of ``jaxpr`` (and its sub-jaxprs) computes; ``only``: one primitive's.

    ``stop_gradient`` is left out: it returns the frozen base itself (no computation, no new buffer).
    """
    return [
        tuple(v.aval.shape)
        for eqn in equations(jaxpr)
        if eqn.primitive.name != "stop_gradient" and only in (None, eqn.primitive.name)
        for v in eqn.outvars
        if hasattr(v.aval, "shape")
    ]
