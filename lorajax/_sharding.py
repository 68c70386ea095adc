"""Sharding: LoRA factors follow their base kernel's partitioning.

lorajax adds no communication of its own. A factor is sharded exactly like the
kernel axes it shares: ``a`` like the base's stacked and fan-in axes (its rank
axis replicated), ``b`` like the stacked and fan-out axes (rank replicated). Then
``scale * a @ b`` comes out sharded like the base with no collective at all, and
the factored path's ``x @ a`` / ``(x a) @ b`` shard like ``x @ W``.

A quantized base (:class:`lorajax.QuantizedKernel`) is described by the dense
kernel's sharding: its codes and scales are placed from it
(``lorajax/quant/_placement.py``) and its factors follow it as a dense base's do.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from lorajax import _boxes, _paths
from lorajax._dora import magnitude_entries
from lorajax._layout import Layout
from lorajax._node import is_lora
from lorajax.quant import is_quantized
from lorajax.quant._placement import code_shardings, code_specs, dense_sharding, dense_spec


def _padded(spec: PartitionSpec | None, ndim: int, what: str) -> tuple[Any, ...]:
    entries = tuple(spec) if spec is not None else ()
    if len(entries) > ndim:
        raise ValueError(f"{what}: PartitionSpec {spec} has {len(entries)} entries for a {ndim}-axis kernel.")
    return entries + (None,) * (ndim - len(entries))


def factor_specs(
    spec: PartitionSpec | None, layout: Layout | str, *, per_example: bool = False
) -> tuple[PartitionSpec, PartitionSpec]:
    """PartitionSpecs of ``(a, b)`` for a base kernel partitioned by ``spec``.

    ``a`` takes the base's specs for its stacked and fan-in axes plus ``None``
    (replicated) for the rank axis; ``b`` takes ``None`` for rank and the
    fan-out axes' specs. A shorter ``spec`` is padded with ``None``, as JAX does.

    Args:
        spec: the base kernel's ``PartitionSpec`` (``None``: replicated).
        layout: the node's :class:`lorajax.Layout` or its string.
        per_example: the node holds per-example factors (an extra leading batch
            axis, replicated here).

    Returns:
        ``(spec_a, spec_b)``.

    Example:
        >>> from jax.sharding import PartitionSpec as P
        >>> factor_specs(P("fsdp", "tp"), "io")
        (P('fsdp', None), P(None, 'tp'))
        >>> factor_specs(P(None, None, "tp"), "sio")  # stacked Dense, fan-out sharded
        (P(None, None, None), P(None, None, 'tp'))
    """
    layout = layout if isinstance(layout, Layout) else Layout(layout)
    a, b = layout.project(_padded(spec, layout.ndim, "factor_specs"), None)
    lead = (None,) if per_example else ()
    return PartitionSpec(*lead, *a), PartitionSpec(*lead, *b)


def _factor_shardings(sharding: Any, layout: Layout, per_example: bool = False) -> tuple[Any, Any]:
    if sharding is None:
        return None, None
    if isinstance(sharding, PartitionSpec):
        return factor_specs(sharding, layout, per_example=per_example)
    if isinstance(sharding, NamedSharding):
        sa, sb = factor_specs(sharding.spec, layout, per_example=per_example)
        return NamedSharding(sharding.mesh, sa), NamedSharding(sharding.mesh, sb)
    if isinstance(sharding, Sharding) and sharding.is_fully_replicated:
        return sharding, sharding  # one device, or replicated over a device set: the factors go there too
    raise TypeError(
        f"lorajax: cannot derive factor shardings from {sharding!r}; give the base a PartitionSpec or a NamedSharding."
    )


def magnitude_sharding(sharding: Any, layout: Layout) -> Any:
    """The sharding of a DoRA magnitude: the base's entries for its stacked and fan-out axes.

    >>> from jax.sharding import PartitionSpec as P
    >>> magnitude_sharding(P("layers", "fsdp", "tp"), Layout("sio"))
    P('layers', 'tp')
    """
    if sharding is None:
        return None
    if isinstance(sharding, (PartitionSpec, NamedSharding)):
        spec = sharding if isinstance(sharding, PartitionSpec) else sharding.spec
        m = PartitionSpec(*magnitude_entries(layout, _padded(spec, layout.ndim, "magnitude_sharding")))
        return m if isinstance(sharding, PartitionSpec) else NamedSharding(sharding.mesh, m)
    if isinstance(sharding, Sharding) and sharding.is_fully_replicated:
        return sharding
    raise TypeError(
        f"lorajax: cannot derive a magnitude sharding from {sharding!r}; give the base a PartitionSpec or a "
        "NamedSharding."
    )


def _is_spec_leaf(x: Any) -> bool:
    return x is None or isinstance(x, (PartitionSpec, Sharding)) or is_quantized(x)


def _quantized_entry(spec: Any, q: Any) -> tuple[Any, Any]:
    """``(the dequantized kernel's spec, q's tree of specs)`` from a spec given for a quantized kernel ``q``.

    ``spec`` is either the dense kernel's (a ``PartitionSpec``, a ``NamedSharding`` or None) or already a tree of
    specs for ``q``'s arrays (a :class:`lorajax.QuantizedKernel` holding them, as ``shardings_of`` gives). The
    first is the sharding the codes keep of the kernel's (:func:`dense_spec`): what ``dequantize`` gives and what
    ``lorafy`` places the factors after, so a fan-in axis the codes replicate is replicated in the factors too.
    """
    if not is_quantized(spec):
        if spec is None or isinstance(spec, PartitionSpec):
            spec = code_specs(spec, q)
        else:
            placed = code_shardings(spec, q)
            if placed is None:
                raise TypeError(
                    f"lorajax: cannot derive code shardings from {spec!r}; give the base a PartitionSpec or a "
                    "NamedSharding."
                )
            spec = placed
    codes = spec.codes
    if isinstance(codes, NamedSharding):
        return NamedSharding(codes.mesh, dense_spec(codes.spec, q)), spec
    if isinstance(codes, Sharding) and codes.is_fully_replicated:
        return codes, spec
    return dense_spec(codes, q), spec


def partition_specs(lorafied: Any, base_specs: Any) -> Any:
    """A sharding tree for a lorafied pytree, derived from the base model's.

    Use it wherever JAX wants shardings for an abstract tree: ``jax.jit(...,
    in_shardings=..., out_shardings=...)``, ``jax.device_put``, checkpoint restore.

    Args:
        lorafied: a pytree with :class:`LoRA` nodes (concrete, abstract from
            ``jax.eval_shape``, or ``ShapeDtypeStruct``).
        base_specs: the same tree *before* :func:`lorajax.lorafy` (the structure of
            ``lorajax.unlorafy(lorafied)``), with a ``PartitionSpec``, a ``NamedSharding``
            or ``None`` (unspecified/replicated) at every leaf. At a quantized kernel
            give the dense kernel's spec (the model's own), or a
            :class:`lorajax.QuantizedKernel` of specs for its arrays.

    Returns:
        The structure of ``lorafied``: each LoRA node becomes ``LoRA(base=spec, a=spec_a,
        b=spec_b)`` (see :func:`factor_specs`), every other leaf keeps its spec. A
        ``NamedSharding`` gives ``NamedSharding`` factors on the same mesh. A quantized
        kernel (a LoRA base or not) becomes a :class:`lorajax.QuantizedKernel` of specs
        for its codes and scales, placed after the dense kernel's as :func:`lorajax.quantize`
        places them (a bare ``PartitionSpec`` knows no mesh: only what aligns on any mesh is
        sharded), and its factors follow what the codes keep of the kernel's spec.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> from jax.sharding import PartitionSpec as P
        >>> params = {"mlp": {"kernel": jnp.ones((16, 64)), "bias": jnp.zeros(64)}}
        >>> lora = lorajax.lorafy(params, rank=4, where=["mlp"], key=jax.random.key(0))
        >>> specs = lorajax.partition_specs(lora, {"mlp": {"kernel": P("fsdp", "tp"), "bias": P("tp")}})
        >>> specs["mlp"]["kernel"].a, specs["mlp"]["kernel"].b, specs["mlp"]["bias"]
        (P('fsdp', None), P(None, 'tp'), P('tp',))
        >>> fc = {"fc": {"kernel": jax.ShapeDtypeStruct((128, 512), jnp.bfloat16)}}  # planning: no arrays
        >>> qlora = lorajax.lorafy(lorajax.quantize(fc, where=["fc"]), rank=4, where=["fc"])
        >>> node = lorajax.partition_specs(qlora, {"fc": {"kernel": P(None, "tp")}})["fc"]["kernel"]
        >>> node.base.codes, node.base.scales, node.a, node.b  # NF4 codes: (slices, out * in / 2)
        (P(None, 'tp'), P(None, 'tp'), P(None, None), P(None, 'tp'))
    """
    node_leaf = lambda x: is_lora(x) or _boxes.is_box(x) or is_quantized(x)
    pairs, treedef = jax.tree_util.tree_flatten_with_path(lorafied, is_leaf=node_leaf)
    bases = [x.base if is_lora(x) else x for _, x in pairs]
    stop = lambda x: _boxes.is_box(x) or is_quantized(x)
    want = jax.tree_util.tree_structure(jax.tree_util.tree_unflatten(treedef, bases), is_leaf=stop)
    specs, got = jax.tree_util.tree_flatten(base_specs, is_leaf=_is_spec_leaf)
    if got != want:  # type: ignore[operator]  # PyTreeDef's stub lacks __ne__
        raise ValueError(
            "lorajax.partition_specs: base_specs must have the structure of the params before lorafy "
            f"(lorajax.unlorafy(lorafied)), with a PartitionSpec, NamedSharding or None per leaf.\n"
            f"params before lorafy: {want}\nbase_specs:           {got}"
        )
    out = []
    for (path, x), spec in zip(pairs, specs):
        base = _boxes.unbox(x.base if is_lora(x) else x)
        what = f"lorajax.partition_specs: {_paths.path_str(path)} with shape {getattr(base, 'shape', None)}"
        base_spec = spec
        if is_quantized(base):
            if isinstance(spec, PartitionSpec):
                _padded(spec, len(base.shape), what)
            spec, placed = _quantized_entry(spec, base)
            base_spec = _boxes.rebox(x.base if is_lora(x) else x, placed)
        if not is_lora(x):
            out.append(base_spec)
            continue
        if isinstance(spec, PartitionSpec):
            _padded(spec, len(x.shape), what)
        sa, sb = _factor_shardings(spec, x.layout, x.per_example)
        sm = None if x.magnitude is None else magnitude_sharding(spec, x.layout)
        bias = magnitude_sharding(spec, x.layout) if x.spec.bias else None  # lora_bias: stacked and fan-out axes
        out.append(dataclasses.replace(x, base=base_spec, a=sa, b=sb, magnitude=sm, bias=bias))
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.lru_cache(maxsize=512)
def _jitted(fn: Callable[..., Any], static: tuple[int, ...], out: tuple[Any, Any]) -> Callable[..., Any]:
    return jax.jit(fn, static_argnums=static, out_shardings=out)


def init_placed(fn: Callable[..., tuple[Any, Any]], args: tuple[Any, ...], array: Any, layout: Layout) -> Any:
    """Run ``fn(*args)`` (a factor init) so that its ``(a, b)`` are born sharded like ``array``.

    ``args`` is ``(init, key, base, layout, rank, dtype)``. For a base with a
    ``NamedSharding`` the init runs under ``jit(out_shardings=...)``: every
    device creates only its own shard, nothing passes through the host and ``W``
    is never gathered (the base is an argument the init may ignore). Abstract
    bases (``ShapeDtypeStruct`` with a sharding) give abstract factors carrying
    the derived shardings. Tracers and unsharded arrays take the plain path. A
    quantized base places its factors after the dense kernel its codes stand for.
    """
    if is_quantized(array):
        codes = array.codes
        sharding = dense_sharding(array)
        if isinstance(codes, jax.ShapeDtypeStruct):
            array = jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=sharding)
        elif isinstance(codes, jax.core.Tracer):
            return fn(*args)
    else:
        sharding = getattr(array, "sharding", None)
    if isinstance(array, jax.core.Tracer) or sharding is None:
        return fn(*args)
    if isinstance(array, jax.ShapeDtypeStruct):
        a, b = fn(*args)
        if not isinstance(sharding, NamedSharding):
            return a, b
        sa, sb = _factor_shardings(sharding, layout)
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sa), jax.ShapeDtypeStruct(b.shape, b.dtype, sharding=sb)
    if isinstance(sharding, SingleDeviceSharding) and sharding == SingleDeviceSharding(jax.devices()[0]):
        return fn(*args)  # the common single-device case: no extra compile
    try:
        out = _factor_shardings(sharding, layout)
    except TypeError:
        return fn(*args)  # an exotic sharding: leave placement to JAX
    static = (0, 3, 4, 5)
    try:
        return _jitted(fn, static, out)(*args)
    except TypeError:  # an unhashable user init (a lambda over a list, say): jit it afresh
        return jax.jit(fn, static_argnums=static, out_shardings=out)(*args)


def shardings_of(params: Any) -> Any:
    """The sharding of every array leaf of ``params`` (LoRA nodes included).

    Handy to check that factors were placed where expected, or as ``out_shardings``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> shardings_of({"w": jnp.ones(2)})["w"].is_fully_replicated
        True
    """
    return jax.tree.map(lambda x: getattr(x, "sharding", None), params)


def _put(x: Any, sharding: Any) -> Any:
    """``x`` (a host or device array) on ``sharding``, in any process of a multi-process job.

    Every process holds the same value (it was read from one file), so each fills the shards its own devices hold:
    nothing is sent between processes. Boxes keep their metadata; tracers and abstract values are left alone.
    """
    if x is None or sharding is None:
        return x
    value = _boxes.unbox(x)
    if isinstance(value, (jax.core.Tracer, jax.ShapeDtypeStruct)) or getattr(value, "sharding", None) == sharding:
        return x
    if sharding.is_fully_addressable:
        placed = jax.device_put(value, sharding)
    else:
        host = value if not isinstance(value, jax.Array) else jax.device_get(value)
        placed = jax.make_array_from_callback(value.shape, sharding, lambda index: host[index])
    return _boxes.rebox(x, placed)


def place_factors(params: Any) -> Any:
    """Put every node's factors (and DoRA magnitude) on the shardings its base implies.

    Factors read from a file are host arrays; without this, the first jitted step would reshard them (on a pod, by
    gathering). A base with a ``NamedSharding`` (a quantized one: the sharding of the dense kernel its codes stand
    for) places ``a`` and ``b`` as :func:`factor_specs` says and the magnitude as :func:`magnitude_sharding` says.
    Nodes on one device or unsharded bases are returned as they are.

    Example:
        >>> import dataclasses, jax, jax.numpy as jnp, numpy as np, lorajax
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> mesh = jax.make_mesh((1,), ("tp",), axis_types=(jax.sharding.AxisType.Auto,))
        >>> base = jax.device_put(jnp.ones((4, 8)), NamedSharding(mesh, P(None, "tp")))
        >>> node = lorajax.lorafy({"q": {"kernel": base}}, rank=2, where=["q"])["q"]["kernel"]
        >>> node = dataclasses.replace(node, a=np.ones((4, 2), np.float32), b=np.zeros((2, 8), np.float32))
        >>> place_factors(node).b.sharding.spec
        P(None, 'tp')
    """

    def place(node: Any) -> Any:
        if not is_lora(node):
            return node
        base = node.base
        sharding = dense_sharding(base) if is_quantized(base) else getattr(_boxes.unbox(base), "sharding", None)
        if not isinstance(sharding, NamedSharding):
            return node
        sa, sb = _factor_shardings(sharding, node.layout)
        magnitude = node.magnitude
        if magnitude is not None:
            magnitude = _put(magnitude, magnitude_sharding(sharding, node.layout))
        bias = _put(node.bias, magnitude_sharding(sharding, node.layout)) if node.spec.bias else node.bias
        return dataclasses.replace(node, a=_put(node.a, sa), b=_put(node.b, sb), magnitude=magnitude, bias=bias)

    return jax.tree.map(place, params, is_leaf=is_lora)
