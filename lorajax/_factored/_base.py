"""The frozen base inside the factored interpreter: kept as stored until a product reads it.

A :class:`Base` is a LoRA node's base as the node stores it (a dense kernel, or a
:class:`lorajax.QuantizedKernel`) plus the views (reshape, transpose, slices) the model
applied to it, recorded rather than applied. A consumer reads it only through
:func:`base_product`, which dequantizes, views and casts it where the product needs it, under a
custom VJP (``jax.checkpoint`` when custom VJPs are off): autodiff keeps the stored base (NF4
codes, a bf16 kernel) as the residual for the backward pass and rebuilds the dense kernel there,
instead of keeping the dequantized or upcast copy of every kernel from the forward pass to the
backward pass. So neither a QLoRA step nor a bf16-base step holds a dense float32 copy of the model.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorajax.quant import dequantize, is_quantized, layer_slices

# Nothing from the base's dequantization or dtype conversion is saved for the backward pass.
_POLICY = jax.checkpoint_policies.nothing_saveable


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Base:
    """A stored base and the views to apply to it; ``shape`` and ``dtype`` are those of the viewed kernel."""

    source: Any  # a dense array or a QuantizedKernel, under stop_gradient
    operands: tuple = ()  # dynamic operands of the views (dynamic_slice starts), in order
    views: tuple[tuple[Callable[..., Any], int], ...] = dataclasses.field(default=(), metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    dtype: Any = dataclasses.field(default=np.dtype("float32"), metadata=dict(static=True))
    # A quantized base's DoRA node keeps its magnitude m, not g = m / n, in b's extra rank row: the consumer
    # computes n from the kernel it dequantizes anyway (lorajax/_factored/_dora.py). ``fan_in``: the number of
    # fan-in entries of one column of the stored kernel, to tell a view that still holds whole columns.
    m_row: bool = dataclasses.field(default=False, metadata=dict(static=True))
    fan_in: int = dataclasses.field(default=0, metadata=dict(static=True))

    @classmethod
    def of(cls, source: Any) -> Base:
        shape = tuple(int(d) for d in source.shape)
        fan_in = int(np.prod([shape[k] for k in source.layout.fan_in])) if is_quantized(source) else 0
        return cls(source, shape=shape, dtype=np.dtype(source.dtype), m_row=is_quantized(source), fan_in=fan_in)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def quantized(self) -> bool:
        return is_quantized(self.source)

    def view(self, fn: Callable[..., Any], *operands: Any) -> Base:
        """This base seen through ``fn(kernel, *operands)``, a view that keeps the dtype."""
        out = jax.eval_shape(fn, jax.ShapeDtypeStruct(self.shape, self.dtype), *operands)
        return dataclasses.replace(
            self,
            operands=self.operands + operands,
            views=self.views + ((fn, len(operands)),),
            shape=tuple(out.shape),
        )

    def unviewed(self) -> bool:
        return not self.views

    def layers(self) -> tuple[Any, Callable[[Any], Base]]:
        """``(xs, one_layer)`` for ``lax.scan`` over the viewed kernel's first axis (a stacked axis).

        A quantized base with no views is scanned as stored, one layer's codes at a time, so a
        scanned QLoRA model is never dense beyond one layer. A viewed one is made dense first (in
        its own dtype) and a dense one scans as it is.
        """
        if self.quantized and self.unviewed() and self.source.layout.axes.startswith("s"):
            xs, one = layer_slices(self.source)
            return xs, lambda sliced: Base.of(one(sliced))
        return self.dense(), lambda x: dataclasses.replace(Base.of(x), m_row=self.m_row, fan_in=self.fan_in)

    def dense(self, dtype: Any = None) -> jax.Array:
        """The viewed kernel as a dense array (dequantized in the base's own dtype), cast to ``dtype``."""
        x = dequantize(self.source)
        k = 0
        for fn, n in self.views:
            x = fn(x, *self.operands[k : k + n])
            k += n
        return x if dtype is None else x.astype(dtype)

    def norm_axes(self, labels: tuple, path: str) -> tuple[int, ...] | None:
        """The view's fan-in axes when b's extra rank row holds DoRA's magnitude (see ``m_row``), else None.

        A view that left out part of a column (a slice along fan-in) cannot give the column's norm: a ValueError.
        """
        if not self.m_row:
            return None
        axes = tuple(p for p, (group, _) in enumerate(labels) if group == "i")
        if int(np.prod([self.shape[p] for p in axes])) != self.fan_in:
            raise ValueError(
                f"lorajax.factored: {path} is a DoRA node on a quantized base whose kernel is used through a view "
                f"of shape {self.shape} that keeps only part of each column's {self.fan_in} fan-in entries, so the "
                "column norms cannot be read there. Dequantize that base (lorajax.dequantize) before lorafy."
            )
        return axes


#: Whether custom VJPs may be used (``factored(fast_weight_grads=...)``, set around each trace). A custom VJP
#: has no forward mode; without them the base products fall back to ``jax.checkpoint``.
CUSTOM_VJPS: contextvars.ContextVar[bool] = contextvars.ContextVar("lorajax_custom_vjps", default=True)


def base_product(fn: Callable[..., jax.Array], base: Base, dtype: Any, *args: Any) -> jax.Array:
    """``fn(kernel, *args)`` with ``kernel = base.dense(dtype)``, the kernel rebuilt for the backward pass.

    ``fn`` must be linear in its floating-point ``args`` (a matmul, conv or lookup with the kernel), so the
    backward pass needs only the kernel: it is rebuilt there from the stored base instead of being kept from
    the forward pass. Each build is tied to the data it meets (the activations going forward, the cotangent
    going back, on a single device), so XLA cannot schedule every layer's build at the start and hold them all.
    """
    floats = {np.dtype(x.dtype) for x in args if jnp.issubdtype(x.dtype, jnp.inexact)}
    if not base.quantized and np.dtype(dtype) == base.dtype and floats <= {base.dtype}:
        # Views only, no conversion (not even one XLA inserts for mixed operands): nothing to build.
        return fn(base.dense(), *args)
    if CUSTOM_VJPS.get():
        return _product(fn, np.dtype(dtype), base, *args)
    # Forward mode stays available: jax.checkpoint recomputes the kernel (scheduled as XLA likes).
    return jax.checkpoint(lambda b, *xs: _use(fn, dtype, b, xs), policy=_POLICY)(base, *args)


def base_dot(eqn: Any, x: jax.Array, ref: Any, k_side: int) -> jax.Array:
    """The base's part of a ``dot_general``, ``x`` on the side opposite ``k_side`` (the kernel rebuilt for backward)."""

    def dot(w: jax.Array, x: jax.Array) -> jax.Array:
        return eqn.primitive.bind(*((w, x) if k_side == 0 else (x, w)), **eqn.params)

    return base_product(dot, ref.base, ref.dtype, x)


def base_conv(eqn: Any, x: jax.Array, ref: Any) -> jax.Array:
    """The base's part of a convolution of ``x`` with the kernel."""
    return base_product(lambda w, x: eqn.primitive.bind(x, w, **eqn.params), ref.base, ref.dtype, x)


def base_gather(eqn: Any, ref: Any, idx: jax.Array) -> jax.Array:
    """The base's part of an embedding lookup: rows of the kernel at ``idx``."""
    return base_product(lambda w, i: eqn.primitive.bind(w, i, **eqn.params), ref.base, ref.dtype, idx)


def _use(fn: Callable[..., jax.Array], dtype: Any, base: Base, xs: tuple) -> jax.Array:
    return fn(after(base, xs).dense(dtype), *xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _product(fn: Callable[..., jax.Array], dtype: Any, base: Base, *args: Any) -> jax.Array:
    return _use(fn, dtype, base, args)


def _product_fwd(fn: Callable[..., jax.Array], dtype: Any, base: Base, *args: Any) -> tuple[jax.Array, Any]:
    return _use(fn, dtype, base, args), (base, args)


def _product_bwd(fn: Callable[..., jax.Array], dtype: Any, res: Any, g: jax.Array) -> tuple:
    base, args = res
    return (_zeros(base), *_moved(fn, dtype, base, args, g))


def _moved(fn: Callable[..., jax.Array], dtype: Any, base: Base, args: tuple, g: jax.Array) -> tuple:
    """The cotangents of ``args`` for the cotangent ``g`` of ``fn(kernel, *args)``, the kernel rebuilt here."""
    w = after(base, (g,)).dense(dtype)
    diff = [k for k, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.inexact)]

    def linear(*moving: Any) -> jax.Array:
        full = list(args)
        for k, v in zip(diff, moving):
            full[k] = v
        return fn(w, *full)

    moved = dict(zip(diff, jax.linear_transpose(linear, *(args[k] for k in diff))(g)))
    return tuple(moved[k] if k in moved else _zeros(a) for k, a in enumerate(args))


_product.defvjp(_product_fwd, _product_bwd)


def base_product_stats(
    fn: Callable[..., jax.Array], forward: Callable[..., Any], base: Base, dtype: Any, args: tuple, extra: tuple
) -> tuple[jax.Array, Any]:
    """``forward(kernel, args, extra)``, i.e. ``(fn(kernel, *args), stats)``, from one dequantization of the base.

    ``kernel`` is ``base.dense(dtype)`` as in :func:`base_product` (rebuilt for the backward pass the same way):
    DoRA's column norms read the very kernel the forward product reads, so a QDoRA step dequantizes each kernel as
    often as a QLoRA step, not once more for its norms. ``forward`` returns the product (equal to ``fn``'s, which
    the backward pass differentiates) and the statistics; it may compute both in one matmul. No gradient flows to
    ``extra`` or through the statistics.
    """
    extra = jax.lax.stop_gradient(tuple(extra))
    if CUSTOM_VJPS.get():
        y, st = _stats_product(fn, forward, np.dtype(dtype), base, tuple(args), extra)
    else:
        run = lambda b, xs, ex: _use_stats(forward, dtype, b, xs, ex)
        y, st = jax.checkpoint(run, policy=_POLICY)(base, tuple(args), extra)
    return y, jax.lax.stop_gradient(st)


def _use_stats(forward: Callable[..., Any], dtype: Any, base: Base, xs: tuple, ex: tuple):
    return forward(after(base, xs).dense(dtype), xs, ex)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _stats_product(fn: Callable[..., jax.Array], forward: Callable[..., Any], dtype: Any, base: Base, args, extra):
    return _use_stats(forward, dtype, base, args, extra)


def _stats_product_fwd(fn: Callable[..., jax.Array], forward: Callable[..., Any], dtype: Any, base: Base, args, extra):
    return _use_stats(forward, dtype, base, args, extra), (base, args, extra)


def _stats_product_bwd(fn: Callable[..., jax.Array], forward: Callable[..., Any], dtype: Any, res: Any, cts: Any):
    base, args, extra = res
    return _zeros(base), _moved(fn, dtype, base, args, cts[0]), _zeros(extra)


_stats_product.defvjp(_stats_product_fwd, _stats_product_bwd)


def _zeros(tree: Any) -> Any:
    """The zero cotangent of ``tree`` (``float0`` for integer leaves): the base never trains."""

    def zero(x: Any) -> Any:
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.zeros_like(x)  # typed like x, its sharding included on explicit meshes
        return np.zeros(x.shape, jax.dtypes.float0)

    return jax.tree.map(zero, tree)


def after(b: Any, xs: tuple) -> Any:
    """``b`` (a :class:`Base` or any pytree of arrays) with its leaves made to depend on ``xs``, same values.

    For XLA's scheduler: whatever is built from ``b`` (a dequantized or upcast kernel) cannot start before ``xs``
    exist, so such builds happen one at a time, each where it is used, rather than all at the start.

    Only in single-device programs: with several devices the scalar taken from ``xs`` would cost a collective per
    product (a broadcast from the device holding it), so there the build is left to XLA's scheduler.
    """
    floats = [x for x in jax.tree.leaves(xs) if jnp.issubdtype(x.dtype, jnp.floating)]
    if not floats or jax.device_count() > 1:
        return b
    x0 = floats[0].reshape(-1)[:1].astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(x0, jnp.int32)
    # The sign bit shifted out: 0 for every input, NaN and Inf included, in a form XLA does not fold away.
    zero = jax.lax.shift_right_logical(jax.lax.shift_right_logical(bits, 31), 1)[0]

    def tie(leaf: jax.Array) -> jax.Array:
        if jnp.issubdtype(leaf.dtype, jnp.integer):
            return leaf + zero.astype(leaf.dtype)
        width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(leaf.dtype.itemsize)
        if width is None:
            return leaf
        raw = jax.lax.bitcast_convert_type(leaf, width)
        return jax.lax.bitcast_convert_type(raw + zero.astype(width), leaf.dtype)

    return jax.tree.map(tie, b)


def in_turn(base: Any, prior: tuple) -> Any:
    """``base`` tied :func:`after` ``prior`` where reading it densely builds a float32 transient, else ``base``.

    A quantized base is dequantized and a base below float32 upcast (XLA:CPU upcasts bf16 contractions) when a
    DoRA norm reads it; chaining the reads keeps one such transient alive at a time. A float32 base is read as
    stored: a tie would only add a copy.
    """
    if is_quantized(base) or jnp.promote_types(base.dtype, jnp.float32) != base.dtype:
        return after(base, prior)
    return base
