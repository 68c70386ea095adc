"""A PiSSA/OLoRA adapter as plain LoRA for the original kernel (PEFT's weight conversion)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lorajax import _boxes
from lorajax._merge import merged_kernel
from lorajax._node import LoRA, is_lora
from lorajax._paths import path_str, rebuild, tree_paths
from lorajax._problems import Problems
from lorajax._trainable import is_node
from lorajax.inits._factors import is_residual


def _rank_axis(node: LoRA) -> tuple[int, int]:
    """Positions of the rank axis in ``a`` and ``b``."""
    return len(node.layout.stack) + len(node.layout.fan_in), len(node.layout.stack)


def plain_node(trained: LoRA, initial: LoRA) -> LoRA:
    """One node: base ``W`` (the initial node merged), ``a' = [a, a0]``, ``b' = [b; -b0]``, rank and alpha doubled."""
    ka, kb = _rank_axis(trained)
    a, b = _boxes.unbox(trained.a), _boxes.unbox(trained.b)
    a0, b0 = (jnp.asarray(_boxes.unbox(x)).astype(y.dtype) for x, y in ((initial.a, a), (initial.b, b)))
    spec = trained.spec
    # scale' = alpha' / r' must equal alpha / r: alpha doubles, or grows by sqrt(2) under rsLoRA (alpha / sqrt(r)).
    alpha = spec.alpha * (math.sqrt(2.0) if spec.rslora else 2.0)
    new = spec.replace(rank=2 * spec.rank, alpha=alpha, init="default")
    names_a, names_b = _boxes.names(trained.a), _boxes.names(trained.b)
    return LoRA(
        base=_boxes.rebox(initial.base, merged_kernel(initial)),
        a=_boxes.rebox(trained.a, jnp.concatenate([a, a0], axis=ka), names_a),
        b=_boxes.rebox(trained.b, jnp.concatenate([b, -b0], axis=kb), names_b),
        spec=new,
    )


def to_plain_lora(trained: Any, initial: Any) -> Any:
    """A PiSSA/OLoRA-initialised model as plain LoRA on the *original* kernels.

    A PiSSA or OLoRA node works only on its residual base ``W - s * a0 @ b0``. The
    same model on ``W`` is a LoRA of rank ``2r``: ``a' = [a, a0]`` (concatenated along
    the rank axis) and ``b' = [b; -b0]``, so ``s * a' @ b' = s * (a @ b - a0 @ b0)``,
    with ``alpha`` doubled (times ``sqrt(2)`` under rsLoRA) to keep the scale. This is
    PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)``; the
    result carries no residual, so it saves, combines and swaps like any LoRA.
    Nodes made by other inits pass through unchanged.

    Args:
        trained: the trained params (LoRA nodes with ``spec.init`` ``"pissa"``, ``"olora"``...).
        initial: the params ``lorafy`` returned before training (same paths; their
            factors ``a0``, ``b0`` and residual base are read).

    Returns:
        ``trained`` with each residual node replaced by a plain rank-``2r`` node whose
        base is ``W`` (the initial node merged: ``W`` up to one rounding).

    Raises:
        ValueError: listing every residual node without a matching initial node.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> w = jax.random.normal(jax.random.key(0), (8, 6))
        >>> init = lorajax.lorafy({"fc": {"kernel": w}}, rank=2, where=["fc"], init="pissa")
        >>> trained = jax.tree.map(lambda x, t: x * 1.5 if t else x, init, lorajax.mask(init))  # a training run
        >>> plain = lorajax.to_plain_lora(trained, init)
        >>> plain["fc"]["kernel"].rank, plain["fc"]["kernel"].spec.init
        (4, 'default')
        >>> bool(jnp.allclose(lorajax.merge(plain)["fc"]["kernel"], lorajax.merge(trained)["fc"]["kernel"], atol=1e-5))
        True
    """
    return plain_lora(trained, initial, caller="to_plain_lora")


def plain_lora(trained: Any, initial: Any, *, caller: str) -> Any:
    """:func:`to_plain_lora`, with errors that name ``caller`` (the public function the user called)."""
    leaves = tree_paths(trained, is_leaf=is_node)
    start = {path_str(p): x for p, x in tree_paths(initial, is_leaf=is_node) if is_lora(x)}
    problems = Problems(caller)
    chosen: dict[int, Any] = {}
    for n, (path, x) in enumerate(leaves):
        if not (is_lora(x) and is_residual(x.spec.init)):
            continue
        name = path_str(path)
        x0 = start.get(name)
        if x0 is None:
            problems.add(f"{name}: initial holds no LoRA node here (pass the params lorafy returned before training)")
        elif x0.spec != x.spec or x0.shape != x.shape or jnp.shape(_boxes.unbox(x0.a)) != jnp.shape(_boxes.unbox(x.a)):
            problems.add(f"{name}: the initial node ({x0.spec}, shape {x0.shape}) is not this node's start ({x.spec})")
        elif x.spec.variant != "lora":
            problems.add(f"{name}: a {x.spec.variant} node; only plain LoRA converts (PEFT's conversion too)")
        elif x.per_example:
            problems.add(f"{name}: holds per-example factors (lorajax.select); convert before selecting")
        else:
            chosen[n] = plain_node(x, x0)
    problems.raise_if_any(
        "cannot pair every PiSSA/OLoRA node with its initial factors",
        "initial must be what lorafy(..., init='pissa'|'olora') returned, before any training step.",
    )
    return rebuild(trained, leaves, chosen, is_node) if chosen else trained


def _same_base(x: LoRA, x0: LoRA) -> bool:
    """Whether two nodes sit on the same base kernel: the same arrays, or equal ones of one shape and dtype."""
    if x.base is x0.base:
        return True
    got, want = jax.tree.leaves(_boxes.unbox(x.base)), jax.tree.leaves(_boxes.unbox(x0.base))
    return len(got) == len(want) and all(
        g is w
        or (jnp.shape(g) == jnp.shape(w) and jnp.result_type(g) == jnp.result_type(w) and bool(jnp.array_equal(g, w)))
        for g, w in zip(got, want, strict=True)
    )


def weight_conversion(trained: Any, initial: Any, *, caller: str) -> Any:
    """Every LoRA node of ``trained`` as ``a' = [a, a0]``, ``b' = [b; -b0]`` (rank and alpha doubled), any init.

    PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)``: the update
    since ``initial`` as plain LoRA. ``initial`` must be the same adapter at its start on
    the same base: a LoRA node at each path of ``trained`` and nowhere else, with the same
    spec, base shape, factor shapes and base values. Raises one ValueError listing every
    node that differs.
    """
    leaves = tree_paths(trained, is_leaf=is_node)
    start = {path_str(p): x for p, x in tree_paths(initial, is_leaf=is_node) if is_lora(x)}
    problems = Problems(caller)
    chosen: dict[int, Any] = {}
    for n, (path, x) in enumerate(leaves):
        if not is_lora(x):
            continue
        name = path_str(path)
        x0 = start.pop(name, None)
        if x0 is None:
            problems.add(f"{name}: initial holds no LoRA node here")
        elif x0.spec != x.spec or x0.shape != x.shape:
            problems.add(
                f"{name}: initial node {x0.spec} on a {x0.shape} kernel; the trained one is {x.spec} on {x.shape}"
            )
        elif [jnp.shape(_boxes.unbox(f)) for f in (x0.a, x0.b)] != [jnp.shape(_boxes.unbox(f)) for f in (x.a, x.b)]:
            problems.add(
                f"{name}: initial factors a {jnp.shape(_boxes.unbox(x0.a))}, b {jnp.shape(_boxes.unbox(x0.b))}; "
                f"the trained ones a {jnp.shape(_boxes.unbox(x.a))}, b {jnp.shape(_boxes.unbox(x.b))}"
            )
        elif x.spec.variant != "lora":
            problems.add(f"{name}: a {x.spec.variant} node; only plain LoRA converts (PEFT's conversion too)")
        elif x.per_example or x0.per_example:
            problems.add(f"{name}: holds per-example factors (lorajax.select); convert before selecting")
        elif not _same_base(x, x0):
            problems.add(f"{name}: the initial node sits on a different base kernel (values differ)")
        else:
            chosen[n] = plain_node(x, x0)
    problems.extend([f"{name}: initial holds a LoRA node that the trained params do not" for name in sorted(start)])
    problems.raise_if_any(
        "initial is not these params' adapter at its start",
        "Pass as initial= the params lorafy (or load_peft of the initial adapter) returned before the first training "
        "step, on the same base.",
    )
    return rebuild(trained, leaves, chosen, is_node)


def residual_problems(factors: Mapping[str, Any], base_params: Any) -> list[str]:
    """Targets of an adapter made on a PiSSA/OLoRA residual base that ``base_params`` does not hold.

    ``factors`` maps paths to :class:`lorajax.AdapterFactors`. Such factors fit only the
    residual base: ``base_params`` must hold, at that path, a LoRA node made by the same init.
    """
    nodes = {path_str(p): x for p, x in tree_paths(base_params, is_leaf=is_node)}
    out = []
    for name, f in sorted(factors.items()):
        if not is_residual(f.spec.init):
            continue
        x = nodes.get(name)
        if not (isinstance(x, LoRA) and x.spec.init == f.spec.init):
            out.append(
                f"residual: {name}: the adapter was trained on the {f.spec.init} residual base W - s*a0@b0, and the "
                "base holds the original kernel there"
            )
    return out
