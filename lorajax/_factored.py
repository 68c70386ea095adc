"""lorajax.factored: run any JAX function on LoRA params without forming ``W`` or ``dW``.

How it works: ``fn`` is traced to a jaxpr with each LoRA node's *base* standing in for the
kernel. The jaxpr is then evaluated by a small interpreter in which every value that derives
from a base (through reshape, transpose, convert_element_type, broadcast_in_dim, squeeze) is a
symbolic :class:`~lorajax._factored_ref.KernelRef`. Each consumer of such a value is rewritten:

* ``dot_general``:  ``x @ W0 + s * ((x @ A) @ B)`` (or ``(x @ Bᵀ) @ Aᵀ`` when the fan-out axis is
  contracted, as in ``Embed.attend``);
* ``conv_general_dilated``: the base conv plus a conv to ``rank`` channels with A and a 1x1 conv with B;
* ``gather`` (embedding lookup): rows of the base plus ``rows of A @ B``.

Control flow (jit, remat, scan, cond, while, custom_jvp/vjp) is entered recursively, and a stacked
kernel that is scanned over is sliced factor by factor. Anything else materialises the kernel for that
one use (as :func:`lorajax.merge` would) and warns with :class:`FallbackWarning`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from lorajax import _boxes
from lorajax._factored_ref import (
    KernelRef,
    NodeInfo,
    drop_unit,
    is_array,
    materialize,
    normalize,
    reshape_factors,
    slice_factors,
)
from lorajax._factored_rules import DotPlan, _matmul, conv_lora, dot_lora_einsum, gather_lora
from lorajax._node import LoRA, is_lora
from lorajax._targets import path_str


class FallbackWarning(UserWarning):
    """A LoRA kernel reached an operation that lorajax.factored cannot factor; W was formed for that use."""


_CALLS = ("pjit", "jit", "closed_call", "core_call")
_CUSTOM = ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")
_REMAT = ("remat2", "checkpoint", "remat")
_PASS = ("copy", "copy_p")


class _Interpreter:
    def __init__(self, *, strict: bool, fuse: bool, flatten: bool, rate: float, active: bool):
        self.strict = strict
        self.fuse = fuse
        self.flatten = flatten
        self.rate = rate
        self.active = active
        self.uses = 0

    # --- helpers ---------------------------------------------------------------
    def fallback(self, ref: KernelRef, where: str) -> jax.Array:
        msg = (
            f"lorajax.factored: the LoRA kernel {ref.info.path!r} (view shape {ref.shape}) reaches `{where}`, "
            "which cannot be factored"
        )
        if ref.info.per_example:
            raise ValueError(
                msg + ". It holds per-example factors (from lorajax.select), so no single W exists; only dot_general "
                "and embedding gathers (with the examples on the activations' leading axis) can run it."
            )
        if self.strict:
            raise ValueError(msg + "; strict=True forbids forming W. Pass strict=False to allow it for this use.")
        warnings.warn(FallbackWarning(msg + "; W = base + scale*A@B is formed for this one use."), stacklevel=2)
        return materialize(ref)

    def dropout(self, ref: KernelRef, x: jax.Array) -> jax.Array:
        if not self.active or ref.key is None:
            return x
        self.uses += 1
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(jax.random.fold_in(ref.key, self.uses), keep, x.shape)
        return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))

    def arrays(self, vals: list, where: str) -> list:
        return [self.fallback(v, where) if isinstance(v, KernelRef) else v for v in vals]

    # --- the evaluator ---------------------------------------------------------
    def eval(self, jaxpr: Any, consts: list, args: list, *, arrays_out: bool = False, where: str = "") -> list:
        env: dict[Any, Any] = {}

        def read(v: Any) -> Any:
            return v.val if isinstance(v, jcore.Literal) else env[v]

        def write(v: Any, val: Any) -> None:
            if not isinstance(v, jcore.DropVar):
                env[v] = val

        for v, val in zip(jaxpr.constvars, consts):
            write(v, val)
        for v, val in zip(jaxpr.invars, args):
            write(v, val)
        pre: dict[int, jax.Array] = {}
        eqns = jaxpr.eqns
        for idx, eqn in enumerate(eqns):
            invals = [read(v) for v in eqn.invars]
            if any(isinstance(v, KernelRef) for v in invals):
                outs = self.rule(eqn, invals, env, eqns, idx, pre)
            else:
                with eqn.ctx.manager:
                    outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
                if not eqn.primitive.multiple_results:
                    outs = [outs]
            for v, val in zip(eqn.outvars, outs):
                write(v, val)
        outs = [read(v) for v in jaxpr.outvars]
        return self.arrays(outs, where or "output") if arrays_out else outs

    def rule(self, eqn: Any, invals: list, env: dict, eqns: list, idx: int, pre: dict) -> list:
        name = eqn.primitive.name
        p = eqn.params
        if name == "dot_general":
            return [self.dot(eqn, invals, env, eqns, idx, pre)]
        if name == "conv_general_dilated" and isinstance(invals[1], KernelRef) and not isinstance(invals[0], KernelRef):
            return [self.conv(eqn, invals)]
        if name == "gather" and isinstance(invals[0], KernelRef) and not isinstance(invals[1], KernelRef):
            return [self.gather(eqn, invals)]
        if len(invals) == 1 and not eqn.primitive.multiple_results:
            out = self.view(name, p, invals[0], eqn)
            if out is not None:
                return [out]
        if name == "dynamic_slice" and isinstance(invals[0], KernelRef):
            out = self.dynamic_slice(eqn, invals)
            if out is not None:
                return [out]
        if name in _CALLS:
            closed = p.get("jaxpr", p.get("call_jaxpr"))
            return self.eval(*_open(closed), invals)
        if name in _CUSTOM:
            # The kernel flows into a custom-derivative function: run its primal body factored (the body's
            # own autodiff replaces the custom rule for this call; results are exact).
            return self.eval(*_open(p["call_jaxpr"]), invals)
        if name in _REMAT:
            return self.remat(p, invals)
        if name == "scan":
            return self.scan(p, invals)
        if name == "cond":
            return self.cond(p, invals)
        if name == "while":
            return self.while_(p, invals)
        vals = self.arrays(invals, name)
        outs = eqn.primitive.bind(*vals, **eqn.primitive.get_bind_params(p))
        return outs if eqn.primitive.multiple_results else [outs]

    # --- views -----------------------------------------------------------------
    def view(self, name: str, p: dict, ref: KernelRef, eqn: Any) -> KernelRef | None:
        if name == "convert_element_type":
            return ref.replace(dtype=jnp.dtype(p["new_dtype"]))
        if name in _PASS:
            return ref
        if name == "transpose":
            perm = p["permutation"]
            return ref.replace(base=jnp.transpose(ref.base, perm), labels=tuple(ref.labels[k] for k in perm))
        if name == "reshape":
            if p.get("dimensions") is not None:
                return None
            new = reshape_factors(ref, tuple(p["new_sizes"]))
            if new is None:
                return None
            return new.replace(base=jnp.reshape(ref.base, p["new_sizes"]))
        if name == "squeeze":
            dims = [d % len(ref.labels) for d in p["dimensions"]]
            for d in dims:
                ref = drop_unit(ref, d)
            labels = tuple(lab for k, lab in enumerate(ref.labels) if k not in dims)
            return ref.replace(base=lax.squeeze(ref.base, dims), labels=labels)
        if name == "slice":
            start, limit, strides = p["start_indices"], p["limit_indices"], p["strides"] or (1,) * len(ref.shape)
            base = eqn.primitive.bind(ref.base, **p)
            for ax, (lo, hi, st) in enumerate(zip(start, limit, strides)):
                if (lo, hi, st) != (0, ref.shape[ax], 1) and ref.labels[ax][0] != "u":
                    ref = slice_factors(ref, ax, lambda f, k, lo=lo, hi=hi, st=st: lax.slice_in_dim(f, lo, hi, st, k))
            return ref.replace(base=base)
        if name == "broadcast_in_dim":
            shape, bdims = tuple(p["shape"]), tuple(p["broadcast_dimensions"])
            if any(ref.shape[k] != shape[d] for k, d in enumerate(bdims)):
                return None
            if any(shape[d] != 1 for d in range(len(shape)) if d not in bdims):
                return None
            new_labels: list[tuple[str, int]] = [("u", 0)] * len(shape)
            for k, d in enumerate(bdims):
                new_labels[d] = ref.labels[k]
            return ref.replace(base=jnp.reshape(ref.base, shape), labels=tuple(new_labels))
        return None

    def dynamic_slice(self, eqn: Any, invals: list) -> KernelRef | None:
        ref, idx = invals[0], invals[1:]
        if any(isinstance(i, KernelRef) for i in idx):
            return None
        sizes = eqn.params["slice_sizes"]
        base = eqn.primitive.bind(ref.base, *idx, **eqn.params)
        for ax, (i, n) in enumerate(zip(idx, sizes)):
            if n != ref.shape[ax] and ref.labels[ax][0] != "u":
                # Same clamping as dynamic_slice: the factor axis has the kernel axis's length.
                ref = slice_factors(ref, ax, lambda f, k, i=i, n=n: lax.dynamic_slice_in_dim(f, i, n, k))
        return ref.replace(base=base)

    # --- consumers ---------------------------------------------------------------
    def dot(self, eqn: Any, invals: list, env: dict, eqns: list, idx: int, pre: dict) -> jax.Array:
        p = eqn.params
        if isinstance(invals[0], KernelRef) and isinstance(invals[1], KernelRef):
            invals = [invals[0], self.fallback(invals[1], "dot_general (kernel times kernel)")]
        k_side = 0 if isinstance(invals[0], KernelRef) else 1
        ref: KernelRef = invals[k_side]
        x = invals[1 - k_side]
        dn = p["dimension_numbers"]
        base_vals = list(invals)
        base_vals[k_side] = ref.base.astype(ref.dtype)
        y0 = eqn.primitive.bind(*base_vals, **p)
        xd = self.dropout(ref, x)
        lora = None
        if self.flatten and x.ndim >= 1:
            plan = DotPlan(ref, k_side, dn, x.ndim)
            if plan.ok:
                t = pre.pop(idx, None)
                if t is None:
                    t = self.first_product(plan, ref, xd, eqn, k_side, env, eqns, idx, pre)
                lora = plan.finish(t, ref, x, y0.shape, p)
        if lora is None:
            lora = dot_lora_einsum(xd, ref, k_side, dn, p, y0.shape)
        if lora is None:
            w = self.fallback(ref, "dot_general")
            base_vals[k_side] = w
            return eqn.primitive.bind(*base_vals, **p)
        return y0 + lora.astype(y0.dtype)

    def first_product(self, plan: DotPlan, ref: KernelRef, x: jax.Array, eqn: Any, k_side: int, env, eqns, idx, pre):
        """``x2 @ F1`` scaled; with ``fuse``, siblings sharing ``x`` (q, k, v) get theirs from the same matmul."""
        x2 = plan.x_2d(x)
        f1s = [plan.first_2d(ref, x.dtype)]
        scales = [ref.info.scale]
        later: list[int] = []
        xvar = eqn.invars[1 - k_side]
        if self.fuse and not self.active and plan.first == "a" and isinstance(xvar, jcore.Var):
            for j in range(idx + 1, len(eqns)):
                e = eqns[j]
                if e.primitive is not eqn.primitive or e.params != eqn.params or e.invars[1 - k_side] is not xvar:
                    continue
                kv = e.invars[k_side]
                other = None if isinstance(kv, jcore.Literal) else env.get(kv)
                if not isinstance(other, KernelRef):
                    continue
                p2 = DotPlan(other, k_side, eqn.params["dimension_numbers"], x.ndim)
                if p2.ok and p2.first == "a":
                    f1s.append(p2.first_2d(other, x.dtype))
                    scales.append(other.info.scale)
                    later.append(j)
        f1 = f1s[0] if len(f1s) == 1 else jnp.concatenate(f1s, axis=1)
        t_all = _matmul(x2, f1, eqn.params)
        outs, start = [], 0
        for f, s in zip(f1s, scales):
            outs.append(t_all[:, start : start + f.shape[1]] * jnp.asarray(s, t_all.dtype))
            start += f.shape[1]
        for j, t in zip(later, outs[1:]):
            pre[j] = t
        return outs[0]

    def conv(self, eqn: Any, invals: list) -> jax.Array:
        x, ref = invals
        y0 = eqn.primitive.bind(x, ref.base.astype(ref.dtype), **eqn.params)
        lora = conv_lora(self.dropout(ref, x), ref, eqn.params, y0.shape)
        if lora is None:
            return eqn.primitive.bind(x, self.fallback(ref, "conv_general_dilated"), **eqn.params)
        return y0 + lora.astype(y0.dtype)

    def gather(self, eqn: Any, invals: list) -> jax.Array:
        ref, idx = invals
        y0 = eqn.primitive.bind(ref.base.astype(ref.dtype), idx, **eqn.params)
        lora = gather_lora(idx, ref, eqn.params, y0.shape)
        if lora is None:
            return eqn.primitive.bind(self.fallback(ref, "gather"), idx, **eqn.params)
        return y0 + lora.astype(y0.dtype)

    # --- control flow ------------------------------------------------------------
    def remat(self, p: dict, invals: list) -> list:
        refs = {k: v for k, v in enumerate(invals) if isinstance(v, KernelRef)}
        plain = [v for v in invals if not isinstance(v, KernelRef)]
        jaxpr, consts = _open(p["jaxpr"])

        def body(plain_in: list, refs_in: dict) -> list:
            it = iter(plain_in)
            vals = [refs_in[k] if k in refs_in else next(it) for k in range(len(invals))]
            return self.eval(jaxpr, consts, vals, arrays_out=True, where="remat output")

        return jax.checkpoint(body, prevent_cse=p.get("prevent_cse", True), policy=p.get("policy"))(plain, refs)

    def scan(self, p: dict, invals: list) -> list:
        nc, ncar = p["num_consts"], p["num_carry"]
        consts = invals[:nc]
        init = self.arrays(invals[nc : nc + ncar], "scan carry")
        xs_in = invals[nc + ncar :]
        length = p["length"]
        xs: list[Any] = []
        sliced: dict[int, KernelRef] = {}
        for k, v in enumerate(xs_in):
            if isinstance(v, KernelRef) and v.labels and v.labels[0][0] == "s":
                v = normalize(v)
                a, b = v.a, v.b
                if v.info.per_example:  # stacked axis sits behind the per-example axis
                    a, b = jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)
                keys = None if v.key is None else jax.random.split(v.key, length)
                xs.append((v.base, a, b, keys))
                sliced[k] = v
            elif isinstance(v, KernelRef):
                xs.append(self.fallback(v, "scan xs (not sliced along a stacked axis)"))
            else:
                xs.append(v)
        closed = p["jaxpr"]

        def body(carry: list, x: list) -> tuple[list, list]:
            vals = []
            for k, v in enumerate(x):
                if k in sliced:
                    ref = sliced[k]
                    base, a, b, key = v
                    labels = tuple((g, j - 1) if g == "s" else (g, j) for g, j in ref.labels[1:])
                    vals.append(ref.replace(base=base, a=a, b=b, key=key, labels=labels))
                else:
                    vals.append(v)
            outs = self.eval(closed.jaxpr, closed.consts, consts + list(carry) + vals, arrays_out=True, where="scan")
            return outs[:ncar], outs[ncar:]

        carry, ys = lax.scan(body, init, xs, length=length, reverse=p["reverse"], unroll=p["unroll"])
        return list(carry) + list(ys)

    def cond(self, p: dict, invals: list) -> list:
        index, ops = invals[0], invals[1:]
        refs = {k: v for k, v in enumerate(ops) if isinstance(v, KernelRef)}
        plain = [v for v in ops if not isinstance(v, KernelRef)]

        def branch(closed: Any) -> Callable:
            def run(*plain_in: Any) -> list:
                it = iter(plain_in)
                vals = [refs[k] if k in refs else next(it) for k in range(len(ops))]
                return self.eval(closed.jaxpr, closed.consts, vals, arrays_out=True, where="cond")

            return run

        return list(lax.switch(index, [branch(b) for b in p["branches"]], *plain))

    def while_(self, p: dict, invals: list) -> list:
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cconsts, bconsts = invals[:cn], invals[cn : cn + bn]
        init = self.arrays(invals[cn + bn :], "while carry")
        cj, bj = p["cond_jaxpr"], p["body_jaxpr"]

        def cond_fun(c: Any) -> Any:
            return self.eval(cj.jaxpr, cj.consts, list(cconsts) + list(c), arrays_out=True, where="while")[0]

        def body_fun(c: Any) -> Any:
            return tuple(self.eval(bj.jaxpr, bj.consts, list(bconsts) + list(c), arrays_out=True, where="while"))

        return list(lax.while_loop(cond_fun, body_fun, tuple(init)))


def _open(j: Any) -> tuple[Any, list]:
    if isinstance(j, jcore.ClosedJaxpr):
        return j.jaxpr, list(j.consts)
    return j, []


def _hashable(x: Any) -> Any:
    try:
        hash(x)
        return x
    except TypeError:
        return ("id", id(x))


def factored(
    fn: Callable[..., Any],
    *,
    dropout: float = 0.0,
    strict: bool = False,
    fuse: bool = True,
    flatten: bool = True,
) -> Callable[..., Any]:
    """Wrap ``fn`` so that LoRA nodes in its arguments run in factored form.

    Every use of a LoRA kernel inside ``fn`` becomes ``x @ W0 + scale * ((x @ A) @ B)``
    (convolutions and embedding lookups likewise), so neither ``W = W0 + scale*A@B`` nor
    the ``d x k`` weight gradient is ever formed; ``W0`` is under ``stop_gradient``. The
    result equals ``fn`` applied to :func:`lorajax.merge` of the arguments (up to float
    rounding). ``fn`` must be a pure JAX function; non-array leaves of the arguments
    (Python numbers, strings) are static: a new value retraces. The wrapper traces and
    compiles once per structure (shapes, dtypes, static values) and works under ``jit``,
    ``grad``, ``vmap`` and with ``nn.scan``/``nn.remat``/``nnx`` models.

    A use the transform cannot factor forms ``W`` for that use only and warns with
    :class:`FallbackWarning` naming the primitive and the parameter path (``strict=True``
    raises ``ValueError`` instead). Nodes with ``per_example=True`` (mixed-adapter batches
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
    cache: dict[Any, Any] = {}

    @functools.wraps(fn)
    def wrapped(*args: Any, lora_rng: Any = None, lora_deterministic: bool = False, **kwargs: Any) -> Any:
        active = dropout > 0.0 and not lora_deterministic
        if active and lora_rng is None:
            raise ValueError(
                f"lorajax.factored(dropout={dropout}): pass lora_rng=<PRNG key> to train with LoRA dropout, "
                "or lora_deterministic=True to evaluate without it."
            )
        leaves, treedef = jax.tree_util.tree_flatten_with_path((args, kwargs), is_leaf=is_lora)
        dyn: list[Any] = []
        factors: list[Any] = []
        spec: list[Any] = []
        infos: list[Any] = []
        for n, (path, leaf) in enumerate(leaves):
            if is_lora(leaf):
                node: LoRA = leaf
                base = _boxes.unbox(node.base)
                a, b = _boxes.unbox(node.a), _boxes.unbox(node.b)
                name = path_str(path[2:] if path and getattr(path[0], "idx", None) == 0 else path[1:])
                name = name or f"argument {getattr(path[1], 'idx', getattr(path[1], 'key', '?'))}"
                infos.append((n, name, node, jax.tree_util.tree_structure(node.base)))
                dyn.append(base)
                factors.extend([a, b])
                spec.append(("lora", node.spec, node.per_example))
                spec.append(_aval_key(base))
                spec.extend([_aval_key(a), _aval_key(b), jax.tree_util.tree_structure(node.base)])
            elif is_array(leaf):
                dyn.append(leaf)
                spec.append(_aval_key(leaf))
            else:
                spec.append(("static", type(leaf), _hashable(leaf)))  # type too: True == 1 must not share a trace
        key = (treedef, tuple(spec), active)
        entry = cache.get(key)
        if entry is None:
            entry = _build(fn, leaves, treedef, infos, dyn, strict, fuse, flatten, dropout, active)
            cache[key] = entry
        rng = lora_rng if active else None
        return entry(dyn, factors, rng)

    wrapped.cache = cache  # type: ignore[attr-defined]  # handy for tests and debugging
    return wrapped


def _aval_key(x: Any) -> tuple:
    return (tuple(x.shape), str(x.dtype), bool(getattr(getattr(x, "aval", None), "weak_type", False)))


def _build(fn, leaves, treedef, infos, dyn, strict, fuse, flatten, rate, active) -> Callable:
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
        a, kw = jax.tree_util.tree_unflatten(treedef, rebuilt)
        return fn(*a, **kw)

    shapes = [jax.ShapeDtypeStruct(v.shape, v.dtype, weak_type=_aval_key(v)[2]) for v in dyn]
    closed, out_shape = jax.make_jaxpr(call, return_shape=True)(*shapes)
    out_tree = jax.tree_util.tree_structure(out_shape)
    node_at = {
        dyn_pos.index(n): (k, name, node.scale, node.per_example, node.layout)
        for k, (n, name, node, _) in enumerate(infos)
    }

    def run(dyn_vals: list, factor_vals: list, rng: Any) -> Any:
        interp = _Interpreter(strict=strict, fuse=fuse, flatten=flatten, rate=rate, active=active)
        args = []
        for i, v in enumerate(dyn_vals):
            if i in node_at:
                k, name, scale, per_example, layout = node_at[i]
                info = NodeInfo(name, k, scale, per_example, jnp.dtype(v.dtype))
                key = None if rng is None else jax.random.fold_in(rng, k)
                labels = tuple((c if c in "so" else "i", 0) for c in layout.axes)
                counts = {"s": 0, "i": 0, "o": 0}
                numbered = []
                for g, _ in labels:
                    numbered.append((g, counts[g]))
                    counts[g] += 1
                args.append(
                    KernelRef(
                        base=lax.stop_gradient(v),
                        a=factor_vals[2 * k],
                        b=factor_vals[2 * k + 1],
                        key=key,
                        labels=tuple(numbered),
                        dtype=jnp.dtype(v.dtype),
                        info=info,
                    )
                )
            else:
                args.append(v)
        outs = interp.eval(closed.jaxpr, list(closed.consts), args, arrays_out=True)
        return jax.tree_util.tree_unflatten(out_tree, outs)

    jitted = jax.jit(run)

    def entry(dyn_vals: list, factor_vals: list, rng: Any) -> Any:
        # Under an outer trace (jit/grad/vmap) run inline: a nested jit boundary would make autodiff save the
        # frozen bases as fresh residual outputs (a copy of every target kernel). Called eagerly, compile once.
        if any(isinstance(v, jax.core.Tracer) for v in [*dyn_vals, *factor_vals, rng]):
            return run(dyn_vals, factor_vals, rng)
        return jitted(dyn_vals, factor_vals, rng)

    return entry
