"""merge, unlorafy and delta: from LoRA nodes back to plain kernels."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from lorajax import _boxes, _dora  # _dora as a module: docs/architecture.md, "Import order"
from lorajax._fit import check_tree
from lorajax._lora_bias import fold_biases
from lorajax._node import LoRA, LoRASpec, compute_dtype, is_lora, lora_delta
from lorajax._paths import path_str, tree_paths
from lorajax._problems import Problems
from lorajax._tokens import is_tokens, tokens_table
from lorajax._trainable import is_node, is_trainable, stop_frozen
from lorajax.quant._api import dense_base, dequantize, walk_stop


def delta(node: LoRA, dtype: Any = None) -> jax.Array:
    """What the node adds to its base kernel, in the kernel's layout: ``merge = base + delta``.

    For a LoRA node that is the update ``scale * a @ b``. For a DoRA node it is the effective update
    ``(m / n) ⊙ (W + scale * a @ b) − W`` (``n = ‖W + scale * a @ b‖`` per output feature, detached),
    which needs the base and is not linear in the factors: summing or subtracting DoRA deltas of
    different adapters does not combine the adapters (which is why :func:`lorajax.swap` and
    :func:`lorajax.combine_adapters` refuse DoRA). Its gradient reaches ``a``, ``b`` and the magnitude, never the
    base. Computed at ``Precision.HIGHEST`` in float32 (or ``dtype``), so TPUs and GPUs do not round it through
    bf16/TF32 passes.

    Args:
        node: a :class:`LoRA` node (not a per-example one from :func:`lorajax.select`).
        dtype: the dtype to compute and return in (default: float32, or the base's if wider).

    Returns:
        An array of the kernel's shape.

    Raises:
        ValueError: for per-example nodes, and for DoRA nodes without their magnitude.

    Example:
        >>> import jax.numpy as jnp
        >>> from lorajax import LoRA, LoRASpec, Layout
        >>> node = LoRA(jnp.zeros((2, 3)), jnp.ones((2, 1)), jnp.ones((1, 3)), LoRASpec(1, 2.0, Layout("io")))
        >>> delta(node).tolist()
        [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
        >>> w, dora = jnp.array([[3.0], [4.0]]), LoRASpec(1, 1.0, Layout("io"), variant="dora")
        >>> delta(LoRA(w, jnp.zeros((2, 1)), jnp.zeros((1, 1)), dora, magnitude=jnp.array([10.0]))).tolist()
        [[3.0], [4.0]]
    """
    if node.per_example:
        raise ValueError(
            "This LoRA node holds per-example factors (from lorajax.select); it has no single delta. Run it through "
            "lorajax.factored, or merge each adapter of the bank separately."
        )
    dt = dtype or compute_dtype(node.dtype)
    if node.spec.variant == "dora":
        return _dora.node_update(node, dt)
    return lora_delta(_boxes.unbox(node.a), _boxes.unbox(node.b), node.spec, dt)


def merged_kernel(node: LoRA) -> jax.Array:
    """``base + delta`` for one node, computed in float32 and rounded once to the base dtype.

    A DoRA node gives ``(m / n) ⊙ (base + delta)`` (``lorajax/_dora.py``).
    """
    if node.spec.variant == "dora":
        return _dora.node_kernel(node)
    base = jax.lax.stop_gradient(dense_base(_boxes.unbox(node.base)))  # a quantized base: dense in float32
    dt = compute_dtype(base.dtype)
    return (base.astype(dt) + delta(node, dt)).astype(node.dtype)


def merge(params: Any, *, donate: bool = False, check_finite: bool = False) -> Any:
    """Fold every LoRA node into a plain kernel: ``base + scale * a @ b``.

    The sum is computed in float32 (at least) and cast once to the base dtype,
    so a bf16 base is rounded once, not at every add. The result has the
    structure, shapes and dtypes of the params before :func:`lorafy` (Flax boxes
    included; :class:`lorajax.Trainable` nodes are unwrapped). A quantized base
    comes back dense (dequantized, plus the update), and so does a quantized kernel
    that no adapter trains, so the model can run on the result; use
    :func:`lorajax.requantize` to serve a quantized model. Pure and jit-able.

    Gradients of a loss on ``merge(params)`` reach only what trains: the factors
    ``a`` and ``b`` and the leaves declared trainable (``lorafy(..., also=...)``,
    :func:`lorajax.trainable`). Every other leaf, LoRA bases and plain leaves alike,
    is under ``stop_gradient``, so its gradient is exactly zero and no optimizer
    (``optax.masked`` included, weight decay included) can move it.

    ``donate=True`` is for models near the size of device memory: each target
    is merged by its own small compiled program that *donates* the base, so the
    merged kernel is written into the base's buffer (same sharding, no gather),
    and the node's factors are freed right after. Peak memory stays at one copy
    of the model plus one kernel's temporaries, where ``jax.jit(merge)`` without
    donation holds the lorafied and the merged model at once. It runs eagerly
    (not under ``jit``) and consumes ``params``: its LoRA bases and factors are
    deleted and must not be used again (the other leaves are passed through).

    Args:
        params: a pytree with :class:`LoRA` nodes.
        donate: merge target by target into the donated base buffers (see above).
        check_finite: raise if any merged kernel holds NaN or Inf, naming every such
            target (PEFT's ``safe_merge``). It reads the values, so it runs eagerly,
            not under ``jit``.

    Returns:
        The same pytree with each node replaced by its merged kernel.

    Raises:
        ValueError: with ``check_finite=True``, listing the targets whose merged kernel is not finite.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> p = lorajax.lorafy({"q": {"kernel": jnp.eye(4)}}, rank=2, where=["q"])
        >>> lorajax.merge(p, check_finite=True)["q"]["kernel"].shape
        (4, 4)
        >>> lorajax.merge(p, donate=True)["q"]["kernel"].shape  # p's LoRA buffers are consumed
        (4, 4)
    """
    check_tree("merge", params)  # factors that do not fit their base: named here, not deep inside einsum
    if check_finite:
        _check_finite(params)
    if donate:
        return _merge_donated(params)

    return merge_nodes(stop_frozen(params))


def merge_nodes(params: Any, *, keep_quantized: bool = False) -> Any:
    """:func:`merge`'s walk: LoRA nodes merged, Trainable nodes unwrapped, quantized kernels that no adapter
    trains dequantized (kept as they are with ``keep_quantized``, as :func:`lorajax.requantize` serves them).
    """

    params = fold_biases(params, "merge")  # lora_bias: scale * bias into the layer's bias leaf (_lora_bias.py)

    def one(x: Any) -> Any:
        if is_lora(x):
            return _boxes.rebox(x.base, merged_kernel(x))
        if is_trainable(x):
            return x.value
        if is_tokens(x):  # trainable tokens: the table with its trained rows
            return tokens_table(x)
        return x if keep_quantized else dequantize(x)

    return jax.tree.map(one, params, is_leaf=walk_stop)


def _check_finite(params: Any) -> None:
    problems = Problems("merge")
    for path, x in tree_paths(params, is_leaf=is_node):
        if is_lora(x):
            kernel = merged_kernel(x)
            if isinstance(kernel, jax.core.Tracer):
                raise ValueError("merge(check_finite=True) reads the merged values; call it outside jax.jit.")
            bad = int(jnp.size(kernel) - jnp.isfinite(kernel).sum())
            if bad:
                problems.add(f"{path_str(path)}: {bad} of {kernel.size} merged weights are NaN or Inf")
    problems.raise_if_any(
        "the merged model would hold non-finite weights",
        "Check the adapter's factors (lorajax.adapter(params)) and the training run that produced them.",
    )


def _merge_arrays(base: jax.Array, a: jax.Array, b: jax.Array, spec: LoRASpec, magnitude: Any = None) -> jax.Array:
    return merged_kernel(LoRA(base, a, b, spec, magnitude=magnitude))


@functools.lru_cache(maxsize=256)
def merge_program(sharding: Any) -> Any:
    """The jitted per-target program ``merge(donate=True)`` runs: ``(base, a, b, spec)`` -> merged, base donated.

    One compiled program per (shape, dtype, sharding, spec): a model's repeated layers share it. Public inside
    the package so tests and benchmarks can inspect its HLO and memory.
    """
    return jax.jit(_merge_arrays, static_argnums=(3,), donate_argnums=(0,), out_shardings=sharding)


def _merge_donated(params: Any) -> Any:
    params = fold_biases(params, "merge")  # lora_bias (_lora_bias.py); a bias leaf is small: not donated

    def one(path: Any, x: Any) -> Any:
        if is_tokens(x):
            return tokens_table(x)
        if not is_lora(x):
            return x.value if is_trainable(x) else dequantize(x)
        base, a, b, m = (_boxes.unbox(v) for v in (x.base, x.a, x.b, x.magnitude))
        if any(isinstance(v, jax.core.Tracer) or not isinstance(v, jax.Array) for v in (base, a, b)):
            raise ValueError(
                f"merge(donate=True) needs concrete jax.Arrays and runs outside jax.jit; {path_str(path)} holds "
                f"{type(base).__name__}. Inside jit use lorajax.merge(params) with jax.jit(..., donate_argnums=0)."
            )
        with warnings.catch_warnings():
            # Backends without donation (or a layout change) copy instead; the result is the same.
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            merged = merge_program(base.sharding)(base, a, b, x.spec, m)
        for factor in (a, b) if m is None else (a, b, m):
            factor.delete()  # free the factors now, not when the caller drops the tree
        return _boxes.rebox(x.base, merged)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=walk_stop)


def unlorafy(params: Any) -> Any:
    """Drop the adapters: every LoRA node becomes its untouched base, every Trainable its value.

    >>> import jax, jax.numpy as jnp, lorajax
    >>> w = jnp.eye(4)
    >>> p = lorajax.lorafy({"q": {"kernel": w}}, rank=2, where=["q"], key=jax.random.key(0))
    >>> lorajax.unlorafy(p)["q"]["kernel"] is w
    True
    """
    return jax.tree.map(
        lambda x: x.base if is_lora(x) or is_tokens(x) else x.value if is_trainable(x) else x, params, is_leaf=is_node
    )
