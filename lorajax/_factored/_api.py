"""lorajax.factored: run any JAX function on LoRA params without forming ``W`` or ``dW``.

How it works: ``fn`` is traced to a jaxpr with each LoRA node's *base* standing in for the
kernel. The jaxpr is then evaluated by a small interpreter (:mod:`lorajax._factored._interpreter`)
in which every value that derives from a base through a view (reshape, transpose, convert,
squeeze, slice, broadcast) is a symbolic :class:`~lorajax._factored._ref.KernelRef`, and each
consumer of such a value (``dot_general``, conv, embedding gather) is rewritten through the
factors by the rule registered for its primitive. Control flow is entered recursively. Anything
else forms the kernel for that one use (as :func:`lorajax.merge` would) and warns with
:class:`FallbackWarning`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lorajax import _boxes
from lorajax._factored._banked import node_rows, rows_key
from lorajax._factored._base import CUSTOM_VJPS, Base
from lorajax._factored._cache import TraceCache, static_key
from lorajax._factored._dora import extend_factors
from lorajax._factored._interpreter import FallbackWarning, Interpreter
from lorajax._factored._ref import KernelRef, NodeInfo, is_array
from lorajax._fit import check_nodes
from lorajax._lora_bias import fold_biases
from lorajax._node import LoRA, is_lora
from lorajax._paths import path_str
from lorajax._tokens import is_tokens, tokens_table
from lorajax._trainable import holds_nodes, is_node, is_trainable, stop_frozen
from lorajax.quant import dequantize, is_quantized
from lorajax.quant._api import typed_sharding

__all__ = ["FallbackWarning", "factored"]


def _prepare(arg: Any) -> Any:
    """``arg`` as ``fn`` sees it: frozen leaves' gradients stopped, Trainable nodes unwrapped.

    Only arguments that hold lorajax nodes are params; inputs and keys pass untouched (they may be
    differentiated). Gradients exist only under a trace, so a concrete call skips the stops.
    """
    if not holds_nodes(arg):
        return arg
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(arg)):
        arg = stop_frozen(arg)
    arg = fold_biases(arg, "factored")  # lora_bias: the model's own bias add carries it (_lora_bias.py)
    return jax.tree.map(
        lambda x: x.value if is_trainable(x) else tokens_table(x) if is_tokens(x) else x, arg, is_leaf=is_node
    )


def factored(
    fn: Callable[..., Any],
    *,
    dropout: float = 0.0,
    strict: bool = False,
    fuse: bool = True,
    flatten: bool = True,
    fast_weight_grads: bool = True,
) -> Callable[..., Any]:
    """Wrap ``fn`` so that LoRA nodes in its arguments run in factored form.

    Every use of a LoRA kernel inside ``fn`` becomes ``x @ W0 + scale * ((x @ A) @ B)``
    (convolutions and embedding lookups likewise), so neither ``W = W0 + scale*A@B`` nor
    the ``d x k`` weight gradient is ever formed. The result equals ``fn`` applied to
    :func:`lorajax.merge` of the arguments (up to float rounding), gradients included:
    in an argument that holds LoRA or :class:`lorajax.Trainable` nodes (the params), only
    the factors and the Trainable values train; every other leaf, LoRA bases included,
    gets exactly zero gradient. ``fn`` sees Trainable nodes as their plain values.
    Arguments without nodes (inputs, keys) are passed as they are.

    ``fn`` must be a pure JAX function; non-array leaves of the arguments (Python
    numbers, strings, config objects) are static: a new value retraces (they are compared
    by value; an unhashable one by ``==`` with a copy taken when it was traced). The
    wrapper traces and compiles once per structure (shapes, dtypes, static values),
    keeps the 64 most recently used traces, and works under ``jit``, ``grad``, ``vmap``
    and with ``nn.scan``/``nn.remat``/``nnx`` models.

    A use the transform cannot factor forms ``W`` for that use only and warns with
    :class:`FallbackWarning` naming the primitive and the parameter path, once per pair and
    trace (``strict=True`` raises ``ValueError`` instead). Nodes with ``per_example=True`` (mixed-adapter batches
    from ``lorajax.select``) run in ``dot_general`` and embedding gathers, one adapter per
    example along the activations' leading axis.

    Args:
        fn: the function to wrap (``model.apply``, an NNX/Equinox call, any function).
        dropout: LoRA dropout rate on the adapter input, as PEFT's ``lora_dropout``.
            The wrapped function then takes ``lora_rng=`` (a PRNG key) for training, or
            ``lora_deterministic=True`` for evaluation.
        strict: raise instead of forming ``W`` where a use cannot be factored.
        fuse: compute ``x @ A`` once for sibling targets that share an input (q/k/v,
            gate/up) as one rank-``(n*r)`` matmul. Off while dropout is active (each
            target draws its own mask).
        flatten: run rank-``r`` products as one 2-D matmul over flattened leading dims.
        fast_weight_grads: compute the gradient of ``a`` (``xᵀ·g``, fan-in × r) rank-major by a
            custom VJP: XLA:CPU runs autodiff's orientation of that product 2.6-6x slower
            (``benchmarks/rank_products.py``); same values. A custom VJP has no forward mode:
            pass ``False`` to take ``jax.jvp``/``jax.jacfwd``/``jax.hessian`` through the wrapper.

    Returns:
        ``wrapped(*args, lora_rng=None, lora_deterministic=False, **kwargs)``, which returns
        what ``fn`` returns.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> fn = lambda p, x: x @ p["dense"]["kernel"]
        >>> p = lorajax.lorafy({"dense": {"kernel": jnp.ones((4, 3))}}, rank=2, where=["dense"], key=jax.random.key(0))
        >>> y = lorajax.factored(fn)(p, jnp.ones((2, 4)))
        >>> bool(jnp.allclose(y, fn(lorajax.merge(p), jnp.ones((2, 4)))))
        True
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lorajax.factored: dropout={dropout!r} must be in [0, 1).")
    cache = TraceCache()

    @functools.wraps(fn)
    def wrapped(*args: Any, lora_rng: Any = None, lora_deterministic: bool = False, **kwargs: Any) -> Any:
        active = dropout > 0.0 and not lora_deterministic
        if active and lora_rng is None:
            raise ValueError(
                f"lorajax.factored(dropout={dropout}): pass lora_rng=<PRNG key> to train with LoRA dropout, "
                "or lora_deterministic=True to evaluate without it."
            )
        args = tuple(_prepare(a) for a in args)
        kwargs = {k: _prepare(v) for k, v in kwargs.items()}
        leaves, treedef = jax.tree_util.tree_flatten_with_path((args, kwargs), is_leaf=is_lora)
        check_nodes("lorajax.factored", ((p, x) for p, x in leaves if is_lora(x)), _node_name)  # before tracing
        dyn: list[Any] = []
        factors: list[Any] = []
        spec: list[Any] = []
        infos: list[Any] = []
        norm_done: tuple = ()  # DoRA norms one after another (extend_factors)
        for n, (path, leaf) in enumerate(leaves):
            if is_lora(leaf):
                node: LoRA = leaf
                base = _boxes.unbox(node.base)
                a, b = _boxes.unbox(node.a), _boxes.unbox(node.b)
                if node.spec.variant == "dora":  # g = m / n rides in the factors (lorajax/_factored/_dora.py)
                    mag = _boxes.unbox(node.magnitude)
                    a, b, done = extend_factors(base, a, b, mag, node.spec, _node_name(path), norm_done)
                    norm_done = (done,)
                infos.append((n, _node_name(path), node))
                dyn.append(base)
                factors.extend([a, b, node_rows(node)])
                spec.append(("lora", node.spec, node.per_example, rows_key(node_rows(node))))
                spec.append(_aval_key(base))
                spec.extend([_aval_key(a), _aval_key(b), jax.tree_util.tree_structure(node.base)])
            elif is_array(leaf):
                dyn.append(leaf)
                spec.append(_aval_key(leaf))
            else:
                spec.append(static_key(leaf))
        key = (treedef, tuple(spec), active)
        entry = cache.get(
            key,
            lambda: _build(fn, leaves, treedef, infos, dyn, strict, fuse, flatten, dropout, active, fast_weight_grads),
        )
        rng = lora_rng if active else None
        return entry(dyn, factors, rng)

    wrapped.cache = cache  # type: ignore[attr-defined]  # handy for tests and debugging
    return wrapped


def _node_name(path: Any) -> str:
    """The parameter path of a node, without the leading (args, kwargs) and argument-0 keys."""
    name = path_str(path[2:] if path and getattr(path[0], "idx", None) == 0 else path[1:])
    return name or f"argument {getattr(path[1], 'idx', getattr(path[1], 'key', '?'))}"


def _aval_key(x: Any) -> tuple:
    weak = bool(getattr(getattr(x, "aval", None), "weak_type", False))
    return (tuple(x.shape), str(x.dtype), weak, _typed_sharding(x))


def _typed_sharding(x: Any) -> Any:
    """The sharding ``x``'s type carries (mesh axes of type ``Explicit``), or ``None``.

    ``fn`` is traced with it, so that a ``jax.shard_map`` inside sees its inputs' specs as JAX would.
    """
    if is_quantized(x):  # a quantized base stands in as its dense kernel: sharded like it
        return typed_sharding(x)
    if not isinstance(x, (jax.Array, jax.core.Tracer)):
        return None
    sharding = getattr(jax.typeof(x), "sharding", None)
    if sharding is None or all(entry is None for entry in getattr(sharding, "spec", ())):
        return None
    return sharding


def _build(fn, leaves, treedef, infos, dyn, strict, fuse, flatten, rate, active, fast_weight_grads) -> Callable:
    """Trace ``fn`` once for this structure and return a jitted factored runner."""
    lora_pos = {n: k for k, (n, *_rest) in enumerate(infos)}
    dyn_pos: list[int] = []  # leaf index of each dynamic value
    for n, (_, leaf) in enumerate(leaves):
        if is_lora(leaf) or is_array(leaf):
            dyn_pos.append(n)
    # Keep no reference to the first call's arrays (the cache outlives them); boxes are kept as templates.
    static_leaves = [None if n in dyn_pos else leaf for n, (_, leaf) in enumerate(leaves)]
    box_of = {n: leaf.base for n, (_, leaf) in enumerate(leaves) if is_lora(leaf) and _boxes.is_box(leaf.base)}

    def call(*vals: Any) -> Any:
        rebuilt = list(static_leaves)
        for n, v in zip(dyn_pos, vals):
            if n in lora_pos:
                rebuilt[n] = _boxes.rebox(box_of[n], v) if n in box_of else v
            else:
                rebuilt[n] = v
        # A quantized kernel no adapter trains is dequantized where fn reads it (targets' bases never reach here).
        a, kw = dequantize(jax.tree_util.tree_unflatten(treedef, rebuilt))
        return fn(*a, **kw)

    shapes = [
        jax.ShapeDtypeStruct(v.shape, v.dtype, weak_type=_aval_key(v)[2], sharding=_typed_sharding(v)) for v in dyn
    ]
    closed, out_shape = jax.make_jaxpr(call, return_shape=True)(*shapes)
    out_tree = jax.tree_util.tree_structure(out_shape)
    # Only static facts of the nodes: the cache must not keep the first call's arrays alive.
    node_at = {dyn_pos.index(n): (k, name, node.spec, node.per_example) for k, (n, name, node) in enumerate(infos)}

    def run(dyn_vals: list, factor_vals: list, rng: Any) -> Any:
        interp = Interpreter(strict=strict, fuse=fuse, flatten=flatten, rate=rate, active=active)
        args = []
        for i, v in enumerate(dyn_vals):
            if i in node_at:
                k, name, spec, per_example = node_at[i]
                info = NodeInfo(name, k, spec, per_example, jnp.dtype(v.dtype))
                key = None if rng is None else jax.random.fold_in(rng, k)
                labels = tuple((c if c in "so" else "i", 0) for c in spec.layout.axes)
                counts = {"s": 0, "i": 0, "o": 0}
                numbered = []
                for g, _ in labels:
                    numbered.append((g, counts[g]))
                    counts[g] += 1
                args.append(
                    KernelRef(
                        base=Base.of(jax.tree.map(lax.stop_gradient, v)),  # as stored: read only by products
                        a=factor_vals[3 * k],
                        b=factor_vals[3 * k + 1],
                        key=key,
                        labels=tuple(numbered),
                        dtype=jnp.dtype(v.dtype),
                        info=info,
                        rows=factor_vals[3 * k + 2],  # a bank's per-row adapter ids, or None
                    )
                )
            else:
                args.append(v)
        token = CUSTOM_VJPS.set(fast_weight_grads)
        try:
            outs = interp.eval(closed.jaxpr, list(closed.consts), args, arrays_out=True)
        finally:
            CUSTOM_VJPS.reset(token)
        return jax.tree_util.tree_unflatten(out_tree, outs)

    jitted = jax.jit(run)

    def entry(dyn_vals: list, factor_vals: list, rng: Any) -> Any:
        # Under an outer trace (jit/grad/vmap) run inline: a nested jit boundary would make autodiff save the
        # frozen bases as fresh residual outputs (a copy of every target kernel). Called eagerly, compile once.
        if any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves([*dyn_vals, *factor_vals, rng])):
            return run(dyn_vals, factor_vals, rng)
        return jitted(dyn_vals, factor_vals, rng)

    return entry
