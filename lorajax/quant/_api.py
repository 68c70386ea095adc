"""quantize and dequantize: swap chosen kernels of a pytree for quantized ones and back."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorajax import _boxes, _paths, _targets
from lorajax._layout import Layout, LayoutArg, resolve_layout
from lorajax._node import LoRA, compute_dtype, is_lora
from lorajax._paths import path_str, rebuild
from lorajax._problems import Problems
from lorajax._trainable import is_node, is_trainable
from lorajax.quant._kernel import BLOCK_SIZES, KINDS, QuantizedKernel, dense, is_quantized, quantize_kernel
from lorajax.quant._placement import code_shardings, dense_sharding, dense_spec, wants_rows


def walk_stop(x: Any) -> bool:
    """``is_leaf`` for walks over targets: LoRA/Trainable nodes and quantized kernels are single units."""
    return is_node(x) or is_quantized(x)


def quantize(
    params: Any,
    *,
    where: Any,
    dtype: str = "nf4",
    block_size: int = 64,
    double_quant: bool = True,
    layout: LayoutArg = None,
) -> Any:
    """Replace each chosen kernel of ``params`` by a :class:`lorajax.QuantizedKernel`.

    ``"nf4"`` is QLoRA's 4-bit NormalFloat: blocks of ``block_size`` weights
    (bitsandbytes' 32..4096; QLoRA uses 64), each scaled by its absmax, taken
    along the fan-in axes in PyTorch's ``(out, in)`` row-major order, so the
    codes and scales are bit for bit those bitsandbytes computes for the same
    PyTorch weight. A last partial block is kept, as bitsandbytes does. With
    ``double_quant`` (QLoRA's default) the float32 absmaxes minus their mean are
    quantized 256 per block to bitsandbytes' dynamic 8-bit map: about 4.127 bits
    per weight in all. ``"int8"`` is bitsandbytes' row-wise absmax int8
    (``round(127 * w / absmax)`` per output channel); ``"fp8"`` is float8 e4m3
    with one float32 scale per output channel.

    Works on concrete arrays, under ``jax.jit`` and on ``ShapeDtypeStruct``
    trees (planning: the codes and scales come back abstract). A LoRA node's base
    is quantized in place, its factors kept. Apply :func:`lorajax.lorafy` to the
    result to train LoRA on the quantized base (QLoRA).

    A kernel sharded with a ``NamedSharding`` (or a ``ShapeDtypeStruct`` carrying
    one) gets codes and scales sharded like it: the stacked (layer) axis and the
    first axis in PyTorch order (fan-out; an embedding's rows) carry over where the
    flattening keeps each device's share contiguous and whole blocks. A kernel
    sharded on its fan-in axes (FSDP) keeps its NF4 codes per row, ``(slices, out,
    in / 2)``, sharded by columns where each device's share of a row is whole
    blocks; other axes of the codes are replicated (docs/guide/qlora.md,
    "Sharding"). Meshes with explicit axes work as automatic ones. Each device
    quantizes its own share; the codes are the same bits as on one device. Under
    ``jax.jit`` the placement is left to XLA: pass ``out_shardings`` from
    :func:`lorajax.partition_specs` to fix it.

    Args:
        params: any pytree of parameters.
        where: which kernels, as for :func:`lorajax.lorafy` (a preset, a regex, a module list or a callable).
        dtype: ``"nf4"``, ``"int8"`` or ``"fp8"``.
        block_size: NF4 block size.
        double_quant: quantize the NF4 absmaxes too.
        layout: per-kernel layouts where names and shapes cannot settle them, as for ``lorafy``.

    Returns:
        The same pytree with quantized kernels at the chosen paths.

    Raises:
        ValueError: an unknown ``dtype`` or ``block_size``; a chosen kernel that is not floating point, too small
            to quantize (fewer weights per matrix than ``block_size``, or under 2 axes) or holds NaN or Inf
            (checked on concrete arrays): every such kernel is listed with its path and shape; nothing
            matched ``where``; or an NF4 kernel is sharded on its fan-in axes in shares that are not whole
            blocks of ``block_size`` where another block size would be (the error names it).

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> w = jax.random.normal(jax.random.key(0), (128, 64))
        >>> q = lorajax.quantize({"mlp": {"kernel": w}}, where=["mlp"])
        >>> back = lorajax.dequantize(q)["mlp"]["kernel"]
        >>> back.shape, bool(jnp.abs(back - w).max() < 0.5)
        ((128, 64), True)
    """
    if dtype not in KINDS:
        raise ValueError(f"quantize: dtype must be one of {KINDS}, got {dtype!r}.")
    if dtype == "nf4" and block_size not in BLOCK_SIZES:
        raise ValueError(
            f"quantize: block_size must be one of {BLOCK_SIZES} (bitsandbytes' sizes), got {block_size!r}."
        )
    match = _targets.compile_where(where)
    leaves = _paths.tree_paths(params, is_leaf=walk_stop)
    problems = Problems("quantize")
    chosen: dict[int, Any] = {}
    for n, (path, leaf) in enumerate(leaves):
        if is_quantized(leaf) or is_trainable(leaf):
            continue
        array = _boxes.unbox(leaf.base if is_lora(leaf) else leaf)
        if is_quantized(array) or not hasattr(array, "shape") or not match(path, array):
            continue
        name, shape = path_str(path), tuple(array.shape)
        if not jnp.issubdtype(array.dtype, jnp.floating):
            problems.add(f"{name} with shape {shape} has dtype {array.dtype}; only float kernels quantize")
            continue
        if len(shape) < 2:
            problems.add(f"{name} with shape {shape} is not a kernel (fewer than 2 axes)")
            continue
        lay = leaf.layout if is_lora(leaf) else resolve_layout(layout, path, array, "quantize")
        per_matrix = int(np.prod([shape[k] for k in range(len(shape)) if k not in lay.stack]))
        if dtype == "nf4" and per_matrix < block_size:
            problems.add(
                f"{name} with shape {shape} holds {per_matrix} weights per matrix, fewer than one block of "
                f"{block_size}; leave it out of where (it saves nothing) or use a smaller block_size"
            )
            continue
        if not isinstance(array, (jax.ShapeDtypeStruct, jax.core.Tracer)) and not bool(jnp.isfinite(array).all()):
            problems.add(f"{name} with shape {shape} holds NaN or Inf; quantizing it would spread them over its blocks")
            continue
        chosen[n] = _one(leaf, array, lay, dtype, block_size, double_quant, name)
    problems.raise_if_any("cannot quantize these kernels", "Fix them or leave them out of where.")
    if not chosen:
        raise ValueError(f"quantize: where={where!r} matched no float kernel.")
    return rebuild(params, leaves, chosen, walk_stop)


def explicit_mesh(x: Any) -> Any:
    """The mesh of ``x``'s sharding when it has explicit axes (sharding in types), else None."""
    sharding = getattr(x, "sharding", None) if not isinstance(x, jax.core.Tracer) else jax.typeof(x).sharding
    return explicit(getattr(sharding, "mesh", None))


def typed_sharding(x: Any) -> Any:
    """The sharding in ``x``'s type on a mesh with explicit axes (a quantized kernel: its dense kernel's), else None.

    What a stand-in ``ShapeDtypeStruct`` for ``x`` needs, so that a function traced on stand-ins sees the shardings
    (explicit axes type every value, constants and zeros included) that it will meet.

    >>> typed_sharding(jax.numpy.ones(3)) is None
    True
    """
    if is_quantized(x):
        if explicit_mesh(x.codes) is None:
            return None
        sharding = jax.typeof(x.codes).sharding
        return jax.sharding.NamedSharding(sharding.mesh, dense_spec(sharding.spec, x))
    if explicit_mesh(x) is None:
        return None
    return jax.typeof(x).sharding


def explicit(mesh: Any) -> Any:
    """``mesh`` when it has explicit axes, else None."""
    types = getattr(mesh, "axis_types", ())
    return mesh if any(t == jax.sharding.AxisType.Explicit for t in types) else None


@functools.lru_cache(maxsize=256)
def _placed_program(lay: Layout, kind: str, block: int, dq: bool, rows: bool, out: QuantizedKernel) -> Any:
    run = lambda x: quantize_kernel(x, lay, kind, block, dq, rows)
    if explicit(out.codes.mesh) is not None:
        # Sharding in types rejects the flattening reshapes and searchsorted; run them with automatic axes.
        run = jax.sharding.auto_axes(run, out_sharding=out)
    return jax.jit(run, out_shardings=out)


def quantize_placed(array: Any, lay: Layout, kind: str, block: int, dq: bool, name: str = "kernel") -> QuantizedKernel:
    """One kernel quantized, its codes and scales placed after the kernel's sharding (abstract ones described)."""
    tracer = isinstance(array, jax.core.Tracer)
    sharding: Any = getattr(array, "sharding", None) if not tracer else jax.typeof(array).sharding
    named = isinstance(sharding, jax.sharding.NamedSharding) and (not tracer or explicit_mesh(array) is not None)
    rows = bool(
        named and kind == "nf4" and wants_rows(sharding.spec, tuple(array.shape), lay, block, sharding.mesh, name)
    )
    run = lambda x: quantize_kernel(x, lay, kind, block, dq, rows)
    if tracer:
        if named:  # under jit on an explicit mesh: placed as the codes of the kernel's type
            out = code_shardings(sharding, jax.eval_shape(run, _plain(array)))
            return jax.sharding.auto_axes(run, out_sharding=out)(array)
        return run(array)
    template = jax.eval_shape(run, _plain(array))  # shapes only: an explicit mesh's types would reject the reshapes
    if isinstance(sharding, jax.sharding.SingleDeviceSharding) and not isinstance(array, jax.ShapeDtypeStruct):
        return run(array)  # one device: eager ops stay on it, no compile
    out = code_shardings(sharding, template)
    if isinstance(array, jax.ShapeDtypeStruct):
        if out is None:
            return template
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), template, out)
    if out is None:
        return run(array)  # a sharding lorajax cannot map: placement left to JAX
    return _placed_program(lay, kind, block, dq, rows, out)(array)


def _plain(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _one(leaf: Any, array: Any, lay: Any, kind: str, block: int, dq: bool, name: str) -> Any:
    q = quantize_placed(array, lay, kind, block, dq, name)
    if is_lora(leaf):
        return LoRA(base=_boxes.rebox(leaf.base, q), a=leaf.a, b=leaf.b, spec=leaf.spec, per_example=leaf.per_example)
    return _boxes.rebox(leaf, q)


def dequantize(tree: Any, dtype: Any = None) -> Any:
    """Replace every :class:`lorajax.QuantizedKernel` of ``tree`` by its dense kernel.

    Each weight is ``code * scale`` computed in float32, as bitsandbytes does,
    and rounded once to ``dtype`` (default: the dtype of the kernel that was
    quantized). LoRA nodes keep their factors; their quantized bases become
    dense. Jit-able; abstract kernels give ``ShapeDtypeStruct`` s (with the
    kernel's sharding where the codes carry one). Sharded codes dequantize on
    their devices into a kernel sharded as it was before quantization.

    Example:
        >>> import jax.numpy as jnp, lorajax
        >>> q = lorajax.quantize({"fc": {"kernel": jnp.full((64, 4), 0.5)}}, where=["fc"], dtype="int8")
        >>> lorajax.dequantize(q)["fc"]["kernel"][0].tolist()
        [0.5, 0.5, 0.5, 0.5]
    """

    def one(x: Any) -> Any:
        if not is_quantized(x):
            return x
        if isinstance(x.codes, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype if dtype is None else dtype, sharding=dense_sharding(x))
        return dense_placed(x, dtype)

    return jax.tree.map(one, tree, is_leaf=is_quantized)


def dense_placed(q: QuantizedKernel, dtype: Any = None) -> jax.Array:
    """:func:`dense`, run with automatic axes when the codes live on a mesh with explicit axes.

    The result then carries the kernel's sharding (:func:`dense_spec` of the codes') in its type.
    """
    if explicit_mesh(q.codes) is None:
        return dense(q, dtype)
    sharding = jax.typeof(q.codes).sharding
    out = jax.sharding.NamedSharding(sharding.mesh, dense_spec(sharding.spec, q))
    return jax.sharding.auto_axes(lambda x: dense(x, dtype), out_sharding=out)(q)


def dense_base(base: Any) -> Any:
    """A LoRA base as a dense array: a quantized one dequantized in the compute dtype, any other as it is.

    The hook ``merge`` and the factored path use, so a quantized base is dense only inside the computation that
    reads it.
    """
    if not is_quantized(base):
        return base
    return dense_placed(base, compute_dtype(base.dtype))


def kernel_view(base: Any) -> Any:
    """What a factor init sees of a base: a ``ShapeDtypeStruct`` for an abstract quantized kernel, else the base."""
    if is_quantized(base) and isinstance(base.codes, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(base.shape, base.dtype, sharding=dense_sharding(base))
    return base


def dense_shapes(tree: Any) -> Any:
    """``tree`` with each quantized kernel replaced by the ``ShapeDtypeStruct`` of its dense kernel (no compute)."""
    stand_in = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dense_sharding(x)) if is_quantized(x) else x
    return jax.tree.map(stand_in, tree, is_leaf=is_quantized)


def quantized_bytes(x: Any) -> int | None:
    """Bytes a quantized kernel occupies (codes and scales), or None for anything else."""
    return x.nbytes if is_quantized(x) else None
