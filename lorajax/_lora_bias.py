"""PEFT's ``lora_bias``: a trained bias on the output of ``b``, folded into the layer's own bias.

PEFT's ``LoraConfig(lora_bias=True)`` gives ``lora_B`` a bias: the layer computes
``x @ W + bias + scale * (x @ A @ B + lora_bias)`` (dropout acts on ``x`` only), and merging adds
``scale * lora_bias`` to the base layer's bias (PEFT refuses to merge a layer without one). In
lorajax the trained bias is the LoRA node's ``bias`` child (``spec.bias`` says it is there), shaped
like ``b`` without its rank axis, which is the shape of the layer's bias (``(out,)``, ``(heads, dim)``
for a multi-head kernel, ``(layers, out)`` for a stacked one). :func:`fold_biases` adds
``scale * bias`` to the sibling ``bias`` leaf of the kernel's module (``dense/kernel`` ->
``dense/bias``, an Equinox ``weight`` -> ``bias``): ``merge`` calls it so the merged tree keeps its
structure, and ``factored`` calls it before running the model, whose own bias add then carries the
LoRA bias (the same sum, and the gradient reaches the LoRA bias through it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from lorajax import _boxes
from lorajax._layout import Layout
from lorajax._node import LoRA, compute_dtype, is_lora
from lorajax._paths import KeyPath, path_parts, path_str, rebuild, tree_paths
from lorajax._problems import Problems
from lorajax._trainable import Trainable, is_node, is_trainable

__all__ = [
    "bias_shape",
    "bias_sharding",
    "check_lora_bias",
    "check_siblings",
    "fold_biases",
    "has_bias",
    "lora_bias_names",
    "sibling_bias",
    "with_lora_bias",
]

#: The name of a module's bias leaf, in every framework lorajax reads (Flax, NNX, Equinox, PyTorch-style dicts).
BIAS_NAME = "bias"


def has_bias(x: Any) -> bool:
    """True for a LoRA node that carries a LoRA bias (``spec.bias``)."""
    return is_lora(x) and x.spec.bias


def bias_shape(node: LoRA) -> tuple[int, ...]:
    """The LoRA bias's shape: ``b``'s without its rank axis (``(*stacked, *fan_out)``).

    >>> import jax.numpy as jnp
    >>> from lorajax._node import LoRASpec
    >>> node = LoRA(jnp.ones((4, 2, 3)), jnp.ones((4, 1)), jnp.ones((1, 2, 3)), LoRASpec(1, 1.0, Layout("ioo")))
    >>> bias_shape(node)
    (2, 3)
    """
    b = tuple(_boxes.unbox(node.b).shape)
    k = len(node.layout.stack)
    return b[:k] + b[k + 1 :]


def lora_bias_names(box: Any, layout: Layout) -> tuple | None:
    """The Flax axis names of a LoRA bias for a kernel boxed as ``box``: its stacked and fan-out entries."""
    names = _boxes.names(box)
    return None if names is None else tuple(names[k] for k in layout.stack + layout.fan_out)


def bias_sharding(b: Any, layout: Layout) -> Any:
    """Where a LoRA bias goes for a node whose (unboxed) ``b`` is placed as it is: ``b``'s sharding less the rank axis.

    A ``NamedSharding`` loses its rank entry (``P(None, "tp")`` -> ``P("tp")``); a one-device sharding or an
    unplaced ``b`` (a tracer, a host array) gives ``None``: JAX's default placement.

    >>> import jax
    >>> mesh = jax.make_mesh((1,), ("tp",), axis_types=(jax.sharding.AxisType.Auto,))
    >>> b = jax.device_put(jnp.zeros((2, 4)), NamedSharding(mesh, PartitionSpec(None, "tp")))
    >>> bias_sharding(b, Layout("io")).spec
    P('tp',)
    """
    if isinstance(b, jax.core.Tracer):
        return None
    sharding = getattr(b, "sharding", None)
    if isinstance(sharding, NamedSharding):
        k = len(layout.stack)
        entries = (tuple(sharding.spec) + (None,) * len(b.shape))[: len(b.shape)]
        return NamedSharding(sharding.mesh, PartitionSpec(*entries[:k], *entries[k + 1 :]))
    if isinstance(sharding, jax.sharding.Sharding) and sharding.is_fully_replicated and len(sharding.device_set) > 1:
        return sharding
    return None


def with_lora_bias(node: LoRA, dtype: Any) -> LoRA:
    """``node`` with a zero LoRA bias in ``dtype`` (PEFT's init), boxed like the base's fan-out entries.

    The bias is born where ``b`` is (:func:`bias_sharding`): sharded like ``b``'s output axes.
    """
    sharding = bias_sharding(_boxes.unbox(node.b), node.layout)
    zeros = jnp.zeros(bias_shape(node), dtype, device=sharding)
    bias = _boxes.rebox(node.base, zeros, lora_bias_names(node.base, node.layout))
    return dataclasses.replace(node, bias=bias, spec=node.spec.replace(bias=True))


def sibling_bias(path: KeyPath) -> tuple[str, ...]:
    """The path parts of the bias leaf beside a kernel: its module's ``bias``.

    >>> from jax.tree_util import DictKey
    >>> sibling_bias((DictKey("params"), DictKey("fc"), DictKey("kernel")))
    ('params', 'fc', 'bias')
    """
    return path_parts(path)[:-1] + (BIAS_NAME,)


def _added(sibling: Any, node: LoRA) -> Any:
    """``sibling + scale * node.bias`` in float32 (at least), rounded once to the sibling's dtype, boxed as it was."""
    inner = sibling.value if is_trainable(sibling) else sibling
    base = _boxes.unbox(inner)
    dt = compute_dtype(base.dtype)
    bias = jnp.asarray(_boxes.unbox(node.bias)).astype(dt)
    out = _boxes.rebox(inner, (base.astype(dt) + bias * jnp.asarray(node.spec.scale, dt)).astype(base.dtype))
    return Trainable(out) if is_trainable(sibling) else out


def check_lora_bias(caller: str, lora_bias: Any, dora: bool, init: Any) -> None:
    """Raise one ValueError listing why ``lora_bias`` cannot be used with these arguments (PEFT's rules).

    >>> check_lora_bias("lorafy", True, False, "kaiming")
    >>> try:
    ...     check_lora_bias("lorafy", True, True, "pissa")
    ... except ValueError as e:
    ...     print(e)
    lorafy: invalid lora_bias (2 problems):
      - lora_bias=True with dora=True: PEFT has no DoRA with a LoRA bias
      - lora_bias=True with init='pissa': the init rewrites the base; PEFT allows lora_bias with its default init
    Use lora_bias=True with plain LoRA (init 'kaiming', 'gaussian' or a callable), or train the layer's bias with also=.
    """
    problems = Problems(caller)
    if not isinstance(lora_bias, bool):
        problems.add(f"lora_bias must be True or False, got {lora_bias!r}")
    elif lora_bias:
        if dora:
            problems.add("lora_bias=True with dora=True: PEFT has no DoRA with a LoRA bias")
        if isinstance(init, str) and init not in ("kaiming", "gaussian"):
            problems.add(
                f"lora_bias=True with init={init!r}: the init rewrites the base; PEFT allows lora_bias with its "
                "default init"
            )
    problems.raise_if_any(
        "invalid lora_bias",
        "Use lora_bias=True with plain LoRA (init 'kaiming', 'gaussian' or a callable), or train the layer's bias "
        "with also=.",
    )


def _pairs(params: Any, caller: str) -> tuple[list, dict[int, list[LoRA]]]:
    """The leaves of ``params`` and, for each sibling bias leaf, the nodes whose LoRA bias goes there.

    Raises ValueError listing every node whose bias has nowhere to go.
    """
    leaves = tree_paths(params, is_leaf=is_node)
    nodes = [(kpath, x) for kpath, x in leaves if has_bias(x)]
    targets: dict[int, list[LoRA]] = {}
    if not nodes:
        return leaves, targets
    index = {path_parts(kpath): n for n, (kpath, _) in enumerate(leaves)}
    problems = Problems(caller)
    for kpath, node in nodes:
        name, where = path_str(kpath), sibling_bias(kpath)
        m = index.get(where)
        target = None if m is None else leaves[m][1]
        value = None if target is None or is_lora(target) else target.value if is_trainable(target) else target
        value = _boxes.unbox(value)
        if node.per_example:
            problems.add(
                f"{name}: a per-example node (lorajax.select) with a LoRA bias; banks do not carry LoRA biases"
            )
        elif m is None or not hasattr(value, "shape"):
            problems.add(
                f"{name}: has a LoRA bias (lora_bias) but its module has no {'/'.join(where)} leaf to add it to "
                "(PEFT cannot merge such a layer either); give the layer a bias (use_bias=True, zeros)"
            )
        elif tuple(value.shape) != bias_shape(node):
            problems.add(
                f"{name}: LoRA bias of shape {bias_shape(node)} but {'/'.join(where)} has shape {tuple(value.shape)}"
            )
        else:
            targets.setdefault(m, []).append(node)
    problems.raise_if_any("LoRA biases (lora_bias) that cannot be added to their layer's bias")
    return leaves, targets


def check_siblings(params: Any, caller: str) -> None:
    """Raise where a node's LoRA bias has no bias leaf of its shape beside it (see :func:`fold_biases`)."""
    _pairs(params, caller)


def fold_biases(params: Any, caller: str) -> Any:
    """``params`` with ``scale * bias`` of every LoRA node with a LoRA bias added to its module's ``bias`` leaf.

    The LoRA nodes themselves are returned as they are (their kernels are still to be merged or run).
    Trees without such a node come back unchanged. A ``bias`` leaf declared trainable (``also=``)
    stays a :class:`lorajax.Trainable` with the sum as its value.

    Raises:
        ValueError: listing every node whose module has no ``bias`` leaf (PEFT cannot merge those either:
            give the layer a zero bias, ``use_bias=True``), whose LoRA bias's shape differs from that
            leaf's, or that holds per-example factors.

    Example:
        >>> import jax.numpy as jnp, lorajax
        >>> p = lorajax.lorafy({"fc": {"kernel": jnp.eye(2), "bias": jnp.ones(2)}}, rank=1, where=["fc"],
        ...                    lora_bias=True, alpha=2.0)
        >>> p["fc"]["kernel"] = dataclasses.replace(p["fc"]["kernel"], bias=jnp.array([1.0, -1.0]))
        >>> fold_biases(p, "merge")["fc"]["bias"].tolist()
        [3.0, -1.0]
    """
    leaves, targets = _pairs(params, caller)
    if not targets:
        return params
    replaced: dict[int, Any] = {}
    for m, nodes in targets.items():
        out = leaves[m][1]
        for node in nodes:
            out = _added(out, node)
        replaced[m] = out
    return rebuild(params, leaves, replaced, is_node)
