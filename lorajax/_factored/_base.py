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

    @classmethod
    def of(cls, source: Any) -> Base:
        return cls(source, shape=tuple(int(d) for d in source.shape), dtype=np.dtype(source.dtype))

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
        return self.dense(), Base.of

    def dense(self, dtype: Any = None) -> jax.Array:
        """The viewed kernel as a dense array (dequantized in the base's own dtype), cast to ``dtype``."""
        x = dequantize(self.source)
        k = 0
        for fn, n in self.views:
            x = fn(x, *self.operands[k : k + n])
            k += n
        return x if dtype is None else x.astype(dtype)


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
    w = after(base, (g,)).dense(dtype)
    diff = [k for k, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.inexact)]

    def linear(*moving: Any) -> jax.Array:
        full = list(args)
        for k, v in zip(diff, moving):
            full[k] = v
        return fn(w, *full)

    moved = dict(zip(diff, jax.linear_transpose(linear, *(args[k] for k in diff))(g)))
    return (_zeros(base), *(moved[k] if k in moved else _zeros(a) for k, a in enumerate(args)))


_product.defvjp(_product_fwd, _product_bwd)


def _zeros(tree: Any) -> Any:
    """The zero cotangent of ``tree`` (``float0`` for integer leaves): the base never trains."""

    def zero(x: Any) -> Any:
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.zeros(x.shape, x.dtype)
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
