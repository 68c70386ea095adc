"""lorafy: replace targeted kernels by frozen base + low-rank factors."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp

from lorajax import _boxes, _names, _paths, _sharding, _targets
from lorajax._config import check_config, prng_key, target_config
from lorajax._dora import with_magnitude
from lorajax._layout import (
    LAYOUT_HINT,
    AmbiguousLayout,
    Layout,
    LayoutArg,
    attention_shapes,
    factor_names,
    known_kernels,
    resolve_layout,
)
from lorajax._lora_bias import check_lora_bias, check_siblings, with_lora_bias
from lorajax._node import LoRA, LoRASpec, is_lora
from lorajax._paths import KeyPath, mutable_variable_hint, rebuild
from lorajax._problems import Problems
from lorajax._token_rows import trainable_tokens as declare_tokens
from lorajax._trainable import declare_trainable, is_node, is_trainable
from lorajax.inits._factors import check_init, init_factors, init_problem, is_residual, residual_base
from lorajax.quant import is_quantized, kernel_view, walk_stop

InitFn: TypeAlias = Callable[[jax.Array, jax.Array, Layout, int, Any], tuple[jax.Array, jax.Array]]


def path_key(key: jax.Array, path: KeyPath) -> jax.Array:
    """A key for one target, derived from its path alone.

    Adding or removing other targets never changes this target's init.
    """
    return jax.random.fold_in(key, zlib.crc32(_paths.path_str(path).encode()) & 0x7FFFFFFF)


def lorafy(
    params: Any,
    *,
    rank: int,
    where: Any,
    key: jax.Array | None = None,
    also: Any = None,
    alpha: float | None = None,
    rslora: bool = False,
    init: str | InitFn = "kaiming",
    dtype: Any = jnp.float32,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    layout: LayoutArg = None,
    dora: bool = False,
    lora_bias: bool = False,
    trainable_tokens: Mapping[str, Sequence[int]] | None = None,
) -> Any:
    """Replace each targeted kernel of ``params`` by a :class:`LoRA` node.

    The base is kept as the very same array; ``a`` starts random and ``b`` at
    zero (embeddings: ``a`` zero, ``b`` normal, as in PEFT), so
    ``merge(lorafy(p)) == p`` bit for bit. Works on concrete arrays, under
    ``jax.jit`` and ``jax.eval_shape``, and directly on ``ShapeDtypeStruct``
    trees (the factors come back as ``ShapeDtypeStruct`` too).

    Args:
        params: any pytree: Flax linen params, an NNX ``State``, an Equinox module, a dict.
        rank: rank ``r`` of every target unless ``rank_pattern`` says otherwise.
        where: which kernels: a preset (``lorajax.attn_qv``, ``attn_qkv``, ``attn_all``,
            ``mlp``, ``all_linear``), a regex (full match on the '/'-joined path, e.g.
            ``r".*/query/kernel"``), a list of module names (PEFT's ``target_modules``
            rule), or a callable ``(path, leaf) -> bool`` over JAX key paths.
        key: PRNG key (typed or raw) or an integer seed; each target's key is folded from its path.
            ``None`` (the default) means ``jax.random.key(0)``: the same call always gives the same
            factors. Pass a key or seed for other draws. Ranks, alphas, their patterns and the key are
            checked first, every bad value listed in one ``ValueError``.
        also: extra leaves to train beside the factors (biases, norms, a head), as a ``where``
            (a module list picks every leaf of those modules); they are wrapped in
            :class:`lorajax.Trainable`, see :func:`lorajax.trainable`. Every other leaf is frozen.
        alpha: LoRA alpha; ``None`` means each target's own rank (scale 1).
        rslora: scale by ``alpha / sqrt(rank)`` (rsLoRA) instead of ``alpha / rank``.
        init: ``"kaiming"`` (PEFT's default), ``"gaussian"`` (std ``1/rank``), ``"pissa"``,
            ``"pissa_niter_<k>"`` (randomized SVD with ``k`` subspace iterations: the choice for
            large kernels), ``"olora"``, or a callable ``(key, base, layout, rank, dtype) -> (a, b)``.
            PiSSA and OLoRA read ``a`` and ``b`` off the kernel and replace the node's ``base`` by
            the residual ``W - scale * a @ b`` (so ``merge`` at init returns ``W`` and ``unlorafy``
            returns the residual); see the initialisations guide and :func:`lorajax.to_plain_lora`.
            ``"loftq"`` / ``"loftq_iter_<k>"`` (LoftQ, ``k`` rounds; ``_nodq``, ``_int8`` or ``_fp8`` at
            the end picks the storage) replace the float base by a :class:`lorajax.QuantizedKernel` ``Q``
            fitted with ``a`` and ``b``, so ``merge`` at init gives ``Q + scale * a @ b ≈ W``.
        dtype: factor dtype, float32 by default even for a bf16 base.
        rank_pattern: ``{name or regex: rank}`` per-target overrides (PEFT's ``rank_pattern``).
        alpha_pattern: ``{name or regex: alpha}`` per-target overrides.
        layout: ``{name or regex: spec}`` or ``(path, leaf) -> spec | None`` where a spec is a
            :class:`Layout` or its string (``"sio"``; ``"s..."`` = one stacked axis, infer the rest).
            Needed where names and shape cannot settle the layout; every such target is listed in
            one error. ``lorajax.infer_layouts(apply, params, *inputs)`` gives every kernel's layout
            from the model's computation: its exact paths are looked up (never read as regexes) and
            count as kernels for the presets whatever their names (bare arrays included).
        dora: DoRA (Liu et al. 2024; PEFT's ``use_dora``): each node also gets a trainable
            ``magnitude``, one entry per output feature (in ``dtype``), set to the norms of
            ``W + scale * a @ b`` over the fan-in axes, so the model starts at the base. See the DoRA guide.
        lora_bias: PEFT's ``lora_bias``: each node also gets a trainable ``bias`` on ``b``'s output (zeros,
            shaped like the layer's bias), which ``merge`` and ``factored`` add as ``scale * bias`` to the
            ``bias`` leaf of the kernel's module. Every target needs such a leaf (as PEFT needs one to merge);
            not for embeddings, DoRA or inits that rewrite the base (PEFT's rules).
        trainable_tokens: PEFT's ``trainable_token_indices``: ``{module name: [row indices]}`` of embedding
            tables whose named rows train (new tokens of a chat template) while the rest of the table stays
            frozen; see :func:`lorajax.trainable_tokens`. A table cannot be a LoRA target as well.

    Returns:
        A pytree of the same structure with :class:`LoRA` nodes at the targets.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> params = {"query": {"kernel": jnp.ones((16, 16))}, "key": {"kernel": jnp.ones((16, 16))}}
        >>> lora = lorajax.lorafy(params, rank=4, where=lorajax.attn_qv)
        >>> lora["query"]["kernel"].a.shape, lora["query"]["kernel"].b.shape
        ((16, 4), (4, 16))
        >>> bool((lorajax.merge(lora)["query"]["kernel"] == params["query"]["kernel"]).all())
        True
    """
    check_config("lorafy", rank=rank, alpha=alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, key=key)
    check_init(init)
    check_lora_bias("lorafy", lora_bias, dora, init)
    key = prng_key(key)
    leaves = _paths.tree_paths(params, is_leaf=walk_stop)  # a quantized base is one kernel
    # Exact paths in layout= (lorajax.infer_layouts) are kernels for the presets whatever their names.
    known = known_kernels(layout, leaves)
    attention = attention_shapes(leaves)  # where q/k/v sizes alone do not say which axis is d_model
    match = _targets.compile_where(where, known)
    chosen: dict[int, Any] = {}
    unresolved = Problems("lorafy")
    unfit = Problems("lorafy")  # kernels the init cannot read (LoftQ: too small, already quantized, NaN/Inf)
    for n, (path, leaf) in enumerate(leaves):
        array = _boxes.unbox(leaf.base if is_lora(leaf) else leaf.value if is_trainable(leaf) else leaf)
        if not hasattr(array, "shape") or not match(path, array):
            continue
        name = _paths.path_str(path)
        if is_node(leaf):
            what = "a LoRA node" if is_lora(leaf) else "declared trainable (lorajax.Trainable)"
            raise ValueError(f"lorafy: {name} is already {what}; merge or unlorafy it first, or leave it out of where.")
        shape = tuple(array.shape)
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise TypeError(f"lorafy: {name} with shape {shape} has dtype {array.dtype}; LoRA needs a float kernel.")
        try:
            lay = array.layout if is_quantized(array) else resolve_layout(layout, path, array, attention=attention)
        except AmbiguousLayout as e:  # every unresolved kernel in one error, not one per run
            unresolved.add(e.item)
            continue
        r, a_alpha = target_config(path, rank, alpha, rank_pattern, alpha_pattern)
        problem = init_problem(init, array, lay)
        if problem:
            unfit.add(f"{name} with shape {shape}: {problem}")
            continue
        fan_in, fan_out = lay.sizes(shape)
        if r > min(fan_in, fan_out):
            raise ValueError(
                f"lorafy: rank {r} for {name} with shape {shape} (layout {lay.axes!r}, fan-in {fan_in}, fan-out "
                f"{fan_out}) exceeds min(fan_in, fan_out) = {min(fan_in, fan_out)}; use a smaller rank or rank_pattern."
                + _router_hint(path, array, min(fan_in, fan_out))
            )
        spec = LoRASpec(rank=r, alpha=a_alpha, layout=lay, rslora=rslora)
        # Factors are born sharded like the base (lorajax/_sharding.py): no host round trip, no gather of W.
        args = (init, path_key(key, path), kernel_view(array), lay, r, dtype, spec.scale)
        a, b = _sharding.init_placed(init_factors, args, array, lay)
        base = leaf
        if is_residual(init):  # PiSSA/OLoRA: the frozen base becomes W - scale * a @ b (lorajax/inits/)
            spec = spec.replace(init=init)
            base = _boxes.rebox(leaf, residual_base(array, a, b, spec))
        names_a, names_b = factor_names(leaf, lay)
        chosen[n] = LoRA(base=base, a=_boxes.rebox(leaf, a, names_a), b=_boxes.rebox(leaf, b, names_b), spec=spec)
        if dora:
            chosen[n] = with_magnitude(chosen[n], dtype)
        if lora_bias and lay.kind == "embed":
            unfit.add(f"{name} with shape {shape}: an embedding; PEFT has no lora_bias on embeddings")
        elif lora_bias:
            chosen[n] = with_lora_bias(chosen[n], dtype)
    unresolved.raise_if_any("names and shapes do not settle the layout of every target", LAYOUT_HINT)
    unfit.raise_if_any(f"init={init!r} cannot read every target", "Leave them out of where, or use another init.")
    if not chosen:
        candidates = [
            _paths.path_str(p)
            for p, x in leaves
            if not is_trainable(x) and _targets.is_kernel(p, x.base if is_lora(x) else x, known)
        ]
        shown = ", ".join(candidates[:8]) + (", ..." if len(candidates) > 8 else "")
        raise ValueError(
            f"lorafy: where={where!r} matched no parameter. Kernel paths available: {shown or 'none'}."
            + (mutable_variable_hint(leaves) or ("" if known else _BARE_HINT))
        )
    out = rebuild(params, leaves, chosen, walk_stop)
    if lora_bias:
        check_siblings(out, "lorafy")  # every LoRA bias needs its layer's bias leaf, as merge does
    if trainable_tokens is not None:
        out = declare_tokens(out, trainable_tokens, caller="lorafy")
    return out if also is None else declare_trainable(out, also, caller="lorafy", arg="also")


_BARE_HINT = (
    " Weights stored as bare arrays under other names are found by tracing the model: "
    "layout=lorajax.infer_layouts(apply_fn, params, *inputs)."
)


def _router_hint(path: KeyPath, array: Any, most: int) -> str:
    """What to do when a mixture of experts' router (fan-out: the number of experts) is narrower than the rank."""
    module = _targets.kernel_module(path, array) or _paths.module_path(path)
    if not _names.is_router(module):
        return ""
    name = module.rsplit("/", 1)[-1]
    return (
        f" {module} is a router (its fan-out is the number of experts): give it rank_pattern={{{name!r}: {most}}}, "
        "or leave it plain with where=lorajax.attn_all | lorajax.mlp (lorajax.mlp adapts the experts, "
        "not the router)."
    )
