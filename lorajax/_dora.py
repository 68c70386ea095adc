"""DoRA (Liu et al. 2024): the weight-decomposed LoRA arithmetic, in one place.

A DoRA node adds a trainable ``magnitude`` ``m`` with one entry per output feature
to a LoRA node. With ``n`` the norm of ``W + ΔW`` over every fan-in axis (per
output feature; per stacked layer too), the effective kernel is
``(m / n) ⊙ (W + ΔW)``. ``n`` is detached (no gradient flows through it), as in
PEFT and the paper's §4.3. The magnitude has the kernel's shape with the fan-in
axes left out, in kernel order: ``(out,)`` for a Dense ``"io"`` kernel,
``(layers, out)`` for ``"sio"``, ``(heads, head_dim)`` for a ``"ioo"`` query kernel,
``(cout,)`` for a conv, ``(features,)`` for an embedding.

Two ways to get ``n``: :func:`column_norm` of a formed kernel (merge, init), and
:func:`factored_norm`, which never forms ``W + ΔW``::

    n_j² = ‖W_j‖² + 2s·(Wᵀa)_j·b_j + s²·b_jᵀ(aᵀa)b_j

Every term is a contraction of ``W`` or the factors whose result is at most
``fan_out × rank`` (no ``fan_in × fan_out`` temporary).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorajax import _boxes
from lorajax._layout import Layout
from lorajax._node import LoRA, LoRASpec, compute_dtype, lora_delta
from lorajax.quant._api import dense_base, typed_sharding
from lorajax.quant._kernel import is_quantized

_HIGHEST = jax.lax.Precision.HIGHEST


def magnitude_axes(layout: Layout) -> tuple[int, ...]:
    """Kernel axes the magnitude keeps: every axis but the fan-in ones, in kernel order.

    >>> magnitude_axes(Layout("sio")), magnitude_axes(Layout("wwio")), magnitude_axes(Layout("eo"))
    ((0, 2), (3,), (1,))
    """
    return tuple(k for k in range(layout.ndim) if k not in layout.fan_in)


def magnitude_shape(layout: Layout, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the magnitude of a kernel of ``shape``.

    >>> magnitude_shape(Layout("ioo"), (16, 4, 8))
    (4, 8)
    """
    return tuple(int(shape[k]) for k in magnitude_axes(layout))


def magnitude_entries(layout: Layout, per_axis: Any) -> tuple[Any, ...]:
    """The entries of ``per_axis`` (one per kernel axis: names, PartitionSpec entries) the magnitude keeps.

    >>> magnitude_entries(Layout("sio"), ("layers", "embed", "mlp"))
    ('layers', 'mlp')
    """
    return tuple(per_axis[k] for k in magnitude_axes(layout))


def expand(g: jax.Array, layout: Layout) -> jax.Array:
    """A per-output-feature array (magnitude shape) with the fan-in axes back as size 1, to broadcast on a kernel."""
    return jnp.expand_dims(g, layout.fan_in)


def _letters(layout: Layout) -> tuple[str, str, str, str, str]:
    """Einsum subscripts ``(W, a, b, magnitude, stack)`` of a layout (rank ``r``)."""
    ls = "abcdefghijklmnopq"[: layout.ndim]
    pick = lambda axes: "".join(ls[k] for k in axes)
    stack = pick(layout.stack)
    return (
        ls,
        stack + pick(layout.fan_in) + "r",
        stack + "r" + pick(layout.fan_out),
        pick(magnitude_axes(layout)),
        stack,
    )


def column_norm(w: jax.Array, layout: Layout, dtype: Any = None) -> jax.Array:
    """``‖w_j‖`` over every fan-in axis, per output feature (magnitude shape), accumulated in ``dtype``.

    >>> column_norm(jnp.array([[3.0, 0.0], [4.0, 1.0]]), Layout("io")).tolist()
    [5.0, 1.0]
    """
    dtype = compute_dtype(w.dtype) if dtype is None else dtype
    ws, _, _, ms, _ = _letters(layout)
    out = typed_out(w, lambda spec: magnitude_entries(layout, spec))
    sq = jnp.einsum(f"{ws},{ws}->{ms}", w, w, precision=_HIGHEST, preferred_element_type=dtype, **out)
    return jnp.sqrt(sq)


def typed_out(x: Any, entries: Any) -> dict:
    """``out_sharding`` for a contraction of ``x`` on a mesh with explicit axes (over a sharded axis it must be
    named): ``entries(x's spec, one entry per axis)`` gives the output's; ``{}`` elsewhere.

    >>> typed_out(jnp.ones((2, 3)), lambda spec: spec[1:])
    {}
    """
    sharding = typed_sharding(x)
    if sharding is None:
        return {}
    spec = tuple(sharding.spec) + (None,) * (jnp.ndim(x) - len(sharding.spec))
    return {"out_sharding": jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*entries(spec)))}


def initial_magnitude(base: Any, a: Any, b: Any, spec: LoRASpec, dtype: Any) -> jax.Array:
    """``m = ‖W + ΔW‖`` per output feature (PEFT's init), in ``dtype``: the node starts at ``W + ΔW``."""
    dt = compute_dtype(base.dtype)
    return column_norm(base.astype(dt) + lora_delta(a, b, spec, dt), spec.layout).astype(dtype)


def with_magnitude(node: LoRA, dtype: Any) -> LoRA:
    """``node`` made a DoRA node: variant ``"dora"`` and ``m = ‖W + ΔW‖`` in ``dtype`` (abstract for abstract bases).

    The magnitude is boxed like the base, its axis names those of the axes it keeps.
    """
    base, a, b = (_boxes.unbox(v) for v in (node.base, node.a, node.b))
    if is_quantized(base):  # QLoRA + DoRA: the norms of the dequantized kernel, as PEFT's Linear4bit DoRA
        abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(base))
        base = jax.ShapeDtypeStruct(base.shape, base.dtype) if abstract else dense_base(base)
    if not isinstance(base, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
        raise ValueError(
            f"lorafy: DoRA needs a dense float kernel for its column norms; this target's base is a "
            f"{type(base).__name__} (shape {tuple(getattr(base, 'shape', ()))}). Dequantize it first, or use "
            "dora=False."
        )
    spec = node.spec.replace(variant="dora")
    if any(isinstance(v, jax.ShapeDtypeStruct) for v in (base, a, b)):
        m: Any = jax.ShapeDtypeStruct(magnitude_shape(spec.layout, tuple(base.shape)), dtype)
    else:
        m = initial_magnitude(base, a, b, spec, dtype)
    names = _boxes.names(node.base)
    m = _boxes.rebox(node.base, m, None if names is None else magnitude_entries(spec.layout, names))
    return dataclasses.replace(node, spec=spec, magnitude=m)


def dora_weight(base: Any, a: Any, b: Any, magnitude: Any, spec: LoRASpec, dtype: Any) -> jax.Array:
    """``(m / n) ⊙ (W + ΔW)`` in ``dtype`` (not rounded), ``n`` detached: the one DoRA kernel formula."""
    w = base.astype(dtype) + lora_delta(a, b, spec, dtype)
    n = jax.lax.stop_gradient(column_norm(w, spec.layout, dtype))
    return expand(jnp.asarray(magnitude).astype(dtype) / n, spec.layout) * w


def merged_kernel(base: Any, a: Any, b: Any, magnitude: Any, spec: LoRASpec) -> jax.Array:
    """``(m / n) ⊙ (W + ΔW)`` with ``n`` detached, computed in float32 (at least), rounded once to W's dtype.

    >>> from lorajax._node import LoRASpec
    >>> w = jnp.array([[3.0, 0.0], [4.0, 2.0]])
    >>> spec = LoRASpec(1, 1.0, Layout("io"), variant="dora")
    >>> merged_kernel(w, jnp.zeros((2, 1)), jnp.zeros((1, 2)), jnp.array([10.0, 1.0]), spec).tolist()
    [[6.0, 0.0], [8.0, 1.0]]
    """
    return dora_weight(base, a, b, magnitude, spec, compute_dtype(base.dtype)).astype(base.dtype)


def _node_parts(node: LoRA, what: str) -> tuple[Any, Any, Any, Any]:
    """``(dense base under stop_gradient, a, b, magnitude)`` of a DoRA node, or a ValueError saying what is missing."""
    if node.per_example:
        raise ValueError(
            f"A DoRA node with per-example factors (lorajax.select) has no single {what}; run it through "
            "lorajax.factored, or merge each adapter separately."
        )
    if node.magnitude is None:
        raise ValueError(
            f"A DoRA node (spec.variant='dora') of shape {node.shape} has no magnitude, so it has no {what}: put it "
            "back (lorajax.combine of the trainable and frozen halves from lorajax.partition), or make the node with "
            "lorafy(..., dora=True)."
        )
    base = jax.lax.stop_gradient(dense_base(_boxes.unbox(node.base)))  # a quantized base: dense in float32
    return base, _boxes.unbox(node.a), _boxes.unbox(node.b), _boxes.unbox(node.magnitude)


def node_kernel(node: LoRA) -> jax.Array:
    """The merged kernel of a DoRA node (its base under stop_gradient), or a ValueError saying what is missing."""
    merged = merged_kernel(*_node_parts(node, "kernel"), node.spec)
    return merged.astype(node.dtype)


def node_update(node: LoRA, dtype: Any) -> jax.Array:
    """What a DoRA node adds to its base: ``(m / n) ⊙ (W + ΔW) − W`` in ``dtype`` (``W`` under stop_gradient).

    >>> from lorajax._node import LoRASpec
    >>> spec = LoRASpec(1, 1.0, Layout("io"), variant="dora")
    >>> node = LoRA(jnp.array([[3.0], [4.0]]), jnp.zeros((2, 1)), jnp.zeros((1, 1)), spec, magnitude=jnp.array([10.0]))
    >>> node_update(node, jnp.float32).tolist()  # the column doubles: W + (W)
    [[3.0], [4.0]]
    """
    base, a, b, m = _node_parts(node, "update")
    return dora_weight(base, a, b, m, node.spec, dtype) - base.astype(dtype)


def factored_norm(base: Any, a: Any, b: Any, spec: LoRASpec, dtype: Any = None) -> jax.Array:
    """``‖W + ΔW‖`` per output feature without forming ``W + ΔW``; detached (no gradient).

    ``n_j² = ‖W_j‖² + 2s·(Wᵀa)_j·b_j + s²·b_jᵀ(aᵀa)b_j``. The base enters only
    through contractions over its fan-in axes (``‖W_j‖²`` and the rank-``r``
    ``aᵀW``), accumulated in float32 at ``Precision.HIGHEST`` without upcasting
    ``W`` itself (no ``W``-sized temporary, not even a cast).

    >>> from lorajax._node import LoRASpec
    >>> spec = LoRASpec(1, 2.0, Layout("io"))
    >>> w, a, b = jnp.eye(2), jnp.ones((2, 1)), jnp.ones((1, 2))
    >>> bool(jnp.allclose(factored_norm(w, a, b, spec), column_norm(w + 2.0 * a @ b, Layout("io"))))
    True
    """
    dt = compute_dtype(base.dtype) if dtype is None else dtype
    ws, as_, bs, ms, ss = _letters(spec.layout)
    wf, af, bf = base, jnp.asarray(a).astype(dt), jnp.asarray(b).astype(dt)
    s = jnp.asarray(spec.scale, dt)
    kw = dict(precision=_HIGHEST, preferred_element_type=dt)
    mag = lambda entries: magnitude_entries(spec.layout, entries)
    w2 = jnp.einsum(f"{ws},{ws}->{ms}", wf, wf, **kw, **typed_out(wf, mag))
    # Rank-major (r before W's free axes), and the sums over r below as multiply-and-reduce, not as one
    # einsum with W's free axes batched: XLA:CPU then reorients aᵀW and runs it 5-6x slower.
    aw = jnp.einsum(f"{as_},{ws}->r{ms}", af, wf, **kw, **typed_out(wf, lambda e: (None, *mag(e))))  # W not cast
    bt = jnp.einsum(f"{bs}->r{ms}", bf)  # b laid out like aw
    ns = len(ss)
    out = typed_out(af, lambda e: (*e[:ns], None, None))
    gram = jnp.einsum(f"{as_},{as_.replace('r', 'z')}->{ss}rz", af, af, **kw, **out)
    gb = jnp.einsum(f"{ss}rz,{bs.replace('r', 'z')}->r{ms}", gram, bf, **kw)
    n2 = w2 + jnp.sum((2 * s * aw + s * s * gb) * bt, axis=0)
    return jax.lax.stop_gradient(jnp.sqrt(jnp.maximum(n2, 0)))


def bank_gains(base: Any, a: Any, b: Any, magnitude: Any, dora: Any, spec: LoRASpec) -> jax.Array:
    """DoRA gains ``g_k = m_k / ‖W + A_k·B_k‖`` of every adapter ``k`` of a bank; ``1`` where ``dora[k]`` is false.

    ``a`` is ``(K, *a_shape)`` and ``b`` ``(K, *b_shape)`` with the scales folded into ``b`` (``spec`` has scale 1),
    ``magnitude`` is ``(K, *magnitude shape)`` and ``dora`` ``(K,)`` booleans. Each norm is :func:`factored_norm`
    (detached, no ``fan_in × fan_out`` temporary): ``‖W_j‖²`` once for the bank, ``Wᵀa`` as one contraction over
    every adapter's rank columns. Returns ``(K, *magnitude shape)`` in float32 (at least).

    >>> from lorajax._node import LoRASpec
    >>> w, spec = jnp.array([[3.0, 0.0], [4.0, 2.0]]), LoRASpec(1, 1.0, Layout("io"))
    >>> a, b, m = jnp.zeros((2, 2, 1)), jnp.zeros((2, 1, 2)), jnp.array([[10.0, 1.0], [7.0, 7.0]])
    >>> bank_gains(w, a, b, m, jnp.array([True, False]), spec).tolist()  # adapter 1 is plain LoRA: g = 1
    [[2.0, 0.5], [1.0, 1.0]]
    """
    dt = compute_dtype(base.dtype)
    n = jax.vmap(lambda a1, b1: factored_norm(base, a1, b1, spec, dt))(a, b)
    flag = jnp.reshape(jnp.asarray(dora, bool), (-1,) + (1,) * (n.ndim - 1))
    return jnp.where(flag, jnp.asarray(magnitude).astype(dt) / jnp.where(flag, n, 1), jnp.ones((), dt))


def check_magnitude(magnitude: Any, layout: Layout, shape: tuple[int, ...], where: str, caller: str) -> None:
    """Raise a ValueError naming ``where`` when ``magnitude`` does not fit a kernel of ``shape``."""
    want = magnitude_shape(layout, shape)
    got = tuple(getattr(magnitude, "shape", ()))
    if got != want:
        raise ValueError(
            f"{caller}: {where}: a DoRA magnitude of shape {got} does not fit the kernel of shape {shape} "
            f"(layout {layout.axes!r}); it needs one entry per output feature, shape {want}."
        )
