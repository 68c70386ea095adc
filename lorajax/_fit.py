"""Whether factors fit their kernel: one check for LoRA nodes, adapter entries and files.

A LoRA node (or an adapter entry) holds a rank, a layout, the kernel's shape and the factors. The layout
projects the kernel's axes onto the factors (:meth:`lorajax.Layout.project`): ``a`` is
``(*stacked, *fan_in, rank)`` and ``b`` ``(*stacked, rank, *fan_out)``; a DoRA magnitude has one entry per
output feature. :func:`fit_problems` compares them and returns problem lines (for
:class:`lorajax._problems.Problems`), so that ``merge``, ``factored``, ``attach`` and the file readers name
the path, the shapes and what the layout expects before anything is traced.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

from lorajax import _boxes
from lorajax._node import LoRA, LoRASpec, is_lora
from lorajax._paths import path_str, tree_paths
from lorajax._problems import Problems

__all__ = ["check_nodes", "check_tree", "fit_problems", "node_problems"]


def _shape(x: Any) -> tuple[int, ...] | None:
    x = _boxes.unbox(x)
    return None if x is None or not hasattr(x, "shape") else tuple(int(d) for d in x.shape)


def fit_problems(
    name: str,
    spec: LoRASpec,
    shape: tuple[int, ...],
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    m_shape: tuple[int, ...] | None = None,
    lead: int | None = 0,
) -> list[str]:
    """Problem lines where factors of ``a_shape``/``b_shape`` (and a DoRA magnitude) do not fit a kernel of ``shape``.

    ``lead`` is the number of leading axes the factors carry beyond the layout's (per-example and bank nodes
    from :func:`lorajax.select`; ``None``: any number, the same in ``a`` and ``b``); their magnitude is not checked.

    >>> from lorajax._layout import Layout
    >>> spec = LoRASpec(rank=2, alpha=2.0, layout=Layout("io"))
    >>> fit_problems("q/kernel", spec, (8, 4), (8, 2), (2, 4))
    []
    >>> fit_problems("q/kernel", spec, (8, 4), (4, 2), (2, 4))
    ["shape: q/kernel: factor a has shape (4, 2), expected (8, 2) (rank 2, layout 'io', kernel shape (8, 4))"]
    """
    ints = lambda s: None if s is None else tuple(int(d) for d in s)
    found = _fit(spec, ints(shape), ints(a_shape), ints(b_shape), ints(m_shape), lead)
    return [f"{kind}: {name}: {text}" for kind, text in found]


@functools.lru_cache(maxsize=4096)
def _fit(
    spec: LoRASpec,
    shape: tuple[int, ...],
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    m_shape: tuple[int, ...] | None,
    lead: int | None,
) -> tuple[tuple[str, str], ...]:
    """``(kind, text)`` of each problem; cached, so a model's repeated layers and each step cost one lookup."""
    layout = spec.layout
    if layout.ndim != len(shape):
        return (
            ("layout", f"layout {layout.axes!r} has {layout.ndim} axes, the kernel shape {shape} has {len(shape)}"),
        )
    want_a, want_b = layout.a_shape(shape, spec.rank), layout.b_shape(shape, spec.rank)
    extra = {len(a_shape) - len(want_a), len(b_shape) - len(want_b)}
    n = lead if lead is not None else (extra.pop() if len(extra) == 1 and min(extra) >= 0 else 0)
    out = []
    for which, got, want in (("a", a_shape, want_a), ("b", b_shape, want_b)):
        if len(got) != len(want) + n or got[n:] != want:
            shown = str(want) if n == 0 else "(" + ", ".join(["..."] * n + [str(d) for d in want]) + ")"
            out.append(
                (
                    "shape",
                    f"factor {which} has shape {got}, expected {shown} "
                    f"(rank {spec.rank}, layout {layout.axes!r}, kernel shape {shape})",
                )
            )
    if n and not out and a_shape[:n] != b_shape[:n]:
        out.append(("shape", f"factors a {a_shape} and b {b_shape} differ in their leading (per-example) axes"))
    if spec.variant == "dora" and lead == 0 and m_shape != ():
        # lorajax._dora.magnitude_shape (every axis but the fan-in ones), not imported: that would tie this low
        # module into the _dora -> quant -> _merge import cycle.
        want_m = tuple(shape[k] for k in range(layout.ndim) if k not in layout.fan_in)
        if m_shape != want_m:
            out.append(
                (
                    "shape",
                    f"a DoRA entry needs a magnitude of shape {want_m} (one per output feature, layout "
                    f"{layout.axes!r}), got {'none' if m_shape is None else m_shape}",
                )
            )
    return tuple(out)


def _node_fit(node: LoRA) -> tuple[tuple[str, str], ...]:
    shape, a, b = _shape(node.base), _shape(node.a), _shape(node.b)
    if shape is None or a is None or b is None:
        return ()  # not arrays (a tree of shardings or specs mapped over the params): nothing to compare
    # A DoRA node without its magnitude gets merge's own error (what is missing and how to put it back): skip ().
    m = (_shape(node.magnitude) or ()) if node.spec.variant == "dora" else None
    return _fit(node.spec, shape, a, b, m, None if node.per_example else 0)


def node_problems(name: str, node: LoRA) -> list[str]:
    """:func:`fit_problems` for a :class:`lorajax.LoRA` node (its base, factors and magnitude as they are stored).

    >>> import jax.numpy as jnp
    >>> from lorajax._layout import Layout
    >>> node = LoRA(jnp.zeros((8, 4)), jnp.zeros((8, 2)), jnp.zeros((4, 2)), LoRASpec(2, 2.0, Layout("io")))
    >>> node_problems("q/kernel", node)
    ["shape: q/kernel: factor b has shape (4, 2), expected (2, 4) (rank 2, layout 'io', kernel shape (8, 4))"]
    """
    return [f"{kind}: {name}: {text}" for kind, text in _node_fit(node)]


def check_nodes(caller: str, items: Iterable[tuple[Any, LoRA]], name: Callable[[Any], str] = str) -> None:
    """Raise one ValueError naming every node of ``items`` (``(key, node)``) whose factors do not fit its base.

    ``name(key)`` gives a node's path for the message; it is called only for nodes that do not fit.

    >>> import jax.numpy as jnp
    >>> from lorajax._layout import Layout
    >>> node = LoRA(jnp.zeros((8, 4)), jnp.zeros((8, 3)), jnp.zeros((2, 4)), LoRASpec(2, 2.0, Layout("io")))
    >>> try:
    ...     check_nodes("merge", [("q/kernel", node)])
    ... except ValueError as e:
    ...     print(str(e).splitlines()[1])
      - shape: q/kernel: factor a has shape (8, 3), expected (8, 2) (rank 2, layout 'io', kernel shape (8, 4))
    """
    problems = Problems(caller)
    for key, node in items:
        found = _node_fit(node)
        if found:
            problems.extend([f"{kind}: {name(key)}: {text}" for kind, text in found])
    problems.raise_if_any(
        "the LoRA factors do not fit their base kernels",
        "A node's a is (*stacked, *fan_in, rank) and b (*stacked, rank, *fan_out) in its layout's kernel axes "
        "(lorajax.Layout); build nodes with lorajax.lorafy or lorajax.attach, or fix the rank or layout in the spec.",
    )


def check_tree(caller: str, params: Any) -> None:
    """:func:`check_nodes` over every :class:`lorajax.LoRA` node of ``params``, named by its path."""
    check_nodes(caller, ((p, x) for p, x in tree_paths(params, is_leaf=is_lora) if is_lora(x)), path_str)
