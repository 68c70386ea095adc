"""The factored products behind the consumer rules: a kernel's use as ``x @ W0 + s * ((x @ A) @ B)`` and kin.

:class:`DotPlan` (how one dot_general splits into ``x @ F1`` then ``@ F2``), the rank products and their fast
weight gradient (:func:`first_matmul`), and the general forms :func:`dot_lora_einsum`, :func:`conv_lora` and
:func:`gather_lora`. They know nothing of the interpreter or the rule registry: the plain rules
(``_consumers.py``), their DoRA variants (``_dora.py``), banks (``_banked.py``) and sibling fusion (``_fusion.py``)
all build on them.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lorajax._factored._base import CUSTOM_VJPS
from lorajax._factored._ref import KernelRef, factor_in_kernel_layout, normalize, prod

_LETTERS = "abcdefghijklmnopqstuvwxyzABCDEFGHIJKLMNOPQSTUVWXYZ"  # no 'r'/'R': reserved for the rank


def _cast(f: jax.Array, dtype: Any) -> jax.Array:
    return f if f.dtype == dtype else f.astype(dtype)


def matmul(x: jax.Array, y: jax.Array, params: dict) -> jax.Array:
    """``x @ y`` over the last axis of ``x``, with the precision settings of the dot it replaces."""
    return lax.dot_general(
        x,
        y,
        (((x.ndim - 1,), (0,)), ((), ())),
        precision=params.get("precision"),
        preferred_element_type=params.get("preferred_element_type"),
    )


def _explicit_out(lhs: jax.Array, rhs: jax.Array, lhs_free: int, rhs_free: int) -> Any:
    """The output sharding of a 2-D product of ``lhs``'s axis ``lhs_free`` by ``rhs``'s axis ``rhs_free`` on a mesh
    with explicit axes (each output axis sharded like the axis it comes from; an axis name used by both is kept on
    the first only): a contraction over a sharded axis needs it spelled out. ``None`` elsewhere.
    """
    sharding = jax.typeof(lhs).sharding
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or jax.sharding.AxisType.Explicit not in tuple(getattr(mesh, "axis_types", ())):
        return None

    def entry(x: jax.Array, axis: int) -> Any:
        spec = tuple(jax.typeof(x).sharding.spec)
        return spec[axis] if axis < len(spec) else None

    names = lambda e: set() if e is None else {e} if isinstance(e, str) else set(e)
    first, second = entry(lhs, lhs_free), entry(rhs, rhs_free)
    if names(first) & names(second):
        second = None
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(first, second))


def _rank_dot(lhs: jax.Array, rhs: jax.Array, dims: tuple, precision: Any, preferred: Any) -> jax.Array:
    """``lax.dot_general`` of two 2-D arrays with one contracted axis each, its output sharding given on explicit
    meshes (:func:`_explicit_out`)."""
    (lc,), (rc,) = dims
    out = _explicit_out(lhs, rhs, 1 - lc, 1 - rc)
    kw = {} if out is None else {"out_sharding": out}
    return lax.dot_general(lhs, rhs, (dims, ((), ())), precision=precision, preferred_element_type=preferred, **kw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rank_product(x: jax.Array, f: jax.Array, precision: Any, preferred: Any) -> jax.Array:
    return _rank_dot(x, f, ((1,), (0,)), precision, preferred)


def _rank_product_fwd(x: jax.Array, f: jax.Array, precision: Any, preferred: Any) -> tuple[jax.Array, tuple]:
    return _rank_product(x, f, precision, preferred), (x, f)


def _rank_product_bwd(precision: Any, preferred: Any, res: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, f = res
    dx = _rank_dot(g, f, ((1,), (1,)), precision, preferred)
    # dF = xᵀ g has shape (fan_in, r). Autodiff lets XLA:CPU fold the transpose into that dot, which then runs in a
    # slow orientation (2.6-6x slower in isolation, benchmarks/rank_products.py). Computing gᵀ x (r, fan_in) behind
    # an optimization barrier keeps it rank-major; the transpose after it moves only fan_in × r numbers.
    dft = _rank_dot(g, x, ((0,), (0,)), precision, preferred)
    df = jnp.transpose(lax.optimization_barrier(dft))
    return _like(dx.astype(x.dtype), x), _like(df.astype(f.dtype), f)


def _like(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """``ct`` resharded to ``primal``'s sharding where they differ on an explicit mesh (a cotangent's type is its
    primal's)."""
    want = jax.typeof(primal).sharding
    if _explicit_out(primal, primal, 0, 1) is None or jax.typeof(ct).sharding.spec == want.spec:
        return ct
    return jax.sharding.reshard(ct, want)


_rank_product.defvjp(_rank_product_fwd, _rank_product_bwd)


def first_matmul(x2: jax.Array, f1: jax.Array, params: dict) -> jax.Array:
    """``x2 @ F1`` for 2-D ``x2`` (rows × fan-in) and ``F1`` (fan-in × r), with a rank-major weight gradient.

    The same values and gradients as :func:`matmul`; only the backward's ``dF1`` is laid out so that XLA
    computes it fast (see ``_rank_product_bwd``). A custom VJP has no forward mode, so
    ``factored(fast_weight_grads=False)`` turns it off for ``jax.jvp``/``jax.hessian`` users.
    """
    if not CUSTOM_VJPS.get():
        return matmul(x2, f1, params)
    return _rank_product(x2, f1, params.get("precision"), params.get("preferred_element_type"))


def _einsum(spec: str, x: jax.Array, y: jax.Array, params: dict) -> jax.Array:
    return jnp.einsum(
        spec, x, y, precision=params.get("precision"), preferred_element_type=params.get("preferred_element_type")
    )


class DotPlan:
    """How one dot_general with a kernel operand splits into ``x @ F1`` then ``@ F2`` (the 2-D fast path)."""

    def __init__(self, ref: KernelRef, k_side: int, dn: Any, x_ndim: int):
        (lc, rc), (lb, rb) = dn
        self.k_side = k_side
        self.kc = list(rc if k_side == 1 else lc)
        self.xc = list(lc if k_side == 1 else rc)
        kb = rb if k_side == 1 else lb
        self.ok = False
        if kb or ref.info.per_example or ref.count("s"):
            return
        kfree = [p for p in range(len(ref.labels)) if p not in self.kc]
        cgroups = {ref.labels[p][0] for p in self.kc} - {"u"}
        fgroups = {ref.labels[p][0] for p in kfree} - {"u"}
        if cgroups == {"i"} and fgroups <= {"o"}:
            self.first, self.second = "a", "b"
        elif cgroups == {"o"} and fgroups <= {"i"}:
            self.first, self.second = "b", "a"  # Embed.attend: contract over fan-out
        else:
            return
        g1 = "i" if self.first == "a" else "o"
        if sum(1 for p in self.kc if ref.labels[p][0] == g1) != ref.count(g1):
            return
        self.kfree = kfree
        self.xfree = [q for q in range(x_ndim) if q not in self.xc]
        self.ok = True

    def first_2d(self, ref: KernelRef, dtype: Any) -> jax.Array:
        f = ref.a if self.first == "a" else ref.b
        axes = [ref.factor_axis(self.first, ref.labels[p]) for p in self.kc if ref.labels[p][0] != "u"]
        f = jnp.transpose(f, axes + [ref.rank_axis(self.first)])
        return _cast(jnp.reshape(f, (prod(f.shape[:-1]), f.shape[-1])), dtype)

    def second_2d(self, ref: KernelRef, dtype: Any) -> jax.Array:
        f = ref.b if self.second == "b" else ref.a
        axes = [ref.factor_axis(self.second, ref.labels[p]) for p in self.kfree if ref.labels[p][0] != "u"]
        f = jnp.transpose(f, [ref.rank_axis(self.second)] + axes)
        return _cast(jnp.reshape(f, (f.shape[0], prod(f.shape[1:]))), dtype)

    def x_2d(self, x: jax.Array) -> jax.Array:
        xt = jnp.transpose(x, self.xfree + self.xc)
        return jnp.reshape(xt, (prod(xt.shape[: len(self.xfree)]), prod(xt.shape[len(self.xfree) :])))

    def first_product(self, ref: KernelRef, x: jax.Array, params: dict) -> jax.Array:
        """``x2 @ F1``, scaled: the rank-``r`` intermediate that :meth:`finish` completes."""
        t = first_matmul(self.x_2d(x), self.first_2d(ref, x.dtype), params)
        return t * jnp.asarray(ref.info.scale, t.dtype)

    def finish(self, t: jax.Array, ref: KernelRef, x: jax.Array, out_shape: tuple[int, ...], params: dict):
        """``t`` is ``x2 @ F1`` (already scaled); returns the LoRA term in dot_general's output layout."""
        return self.lay_out(matmul(t, self.second_2d(ref, t.dtype), params), ref, x, out_shape)

    def lay_out(self, y: jax.Array, ref: KernelRef, x: jax.Array, out_shape: tuple[int, ...]) -> jax.Array:
        """The 2-D LoRA term ``y`` (rows of ``x``, kernel free axes) in dot_general's output layout."""
        xs = [x.shape[q] for q in self.xfree]
        ks = [ref.shape[p] for p in self.kfree]
        y = jnp.reshape(y, xs + ks)
        if self.k_side == 0:  # output is (kernel free..., x free...)
            nx = len(xs)
            y = jnp.transpose(y, list(range(nx, nx + len(ks))) + list(range(nx)))
        return jnp.reshape(y, out_shape)


def dot_lora_einsum(x: jax.Array, ref: KernelRef, k_side: int, dn: Any, params: dict, out_shape) -> jax.Array | None:
    """General factored dot_general by two einsums; ``None`` if it cannot be factored."""
    (lc, rc), (lb, rb) = dn
    xc, kc = (lc, rc) if k_side == 1 else (rc, lc)
    xb, kb = (lb, rb) if k_side == 1 else (rb, lb)
    xl = list(_LETTERS[: x.ndim])
    kl: list[str] = [""] * len(ref.labels)
    for q, p in zip(xc, kc):
        kl[p] = xl[q]
    for q, p in zip(xb, kb):
        kl[p] = xl[q]
    nxt = x.ndim
    for p in range(len(kl)):
        if not kl[p]:
            kl[p] = _LETTERS[nxt]
            nxt += 1
    # Stacked axes of the kernel need their own letter in both factors; a batch axis pairs it with x.
    ns, ni, no = ref.count("s"), ref.count("i"), ref.count("o")
    s_l, i_l, o_l = [""] * ns, [""] * ni, [""] * no
    for p, (g, j) in enumerate(ref.labels):
        if g == "s":
            s_l[j] = kl[p]
        elif g == "i":
            i_l[j] = kl[p]
        elif g == "o":
            o_l[j] = kl[p]
    lead = []
    if ref.info.per_example:
        if 0 in xc:
            return None
        lead = [xl[0]]
    a_l = "".join(lead + s_l + i_l) + "R"
    b_l = "".join(lead + s_l) + "R" + "".join(o_l)
    # Output letters: dot_general's order (batch, lhs free, rhs free), leaving out the kernel's unit axes.
    lhs_l, rhs_l = (xl, kl) if k_side == 1 else (kl, xl)
    lhs_n, rhs_n = (x.ndim, len(kl)) if k_side == 1 else (len(kl), x.ndim)
    lcs, rcs = dn[0]
    lbs, rbs = dn[1]
    out_l = [lhs_l[q] for q in lbs]
    out_l += [lhs_l[q] for q in range(lhs_n) if q not in lcs and q not in lbs]
    out_l += [rhs_l[q] for q in range(rhs_n) if q not in rcs and q not in rbs]
    kunit = {kl[p] for p, (g, _) in enumerate(ref.labels) if g == "u"} - set(xl)
    out_e = "".join(c for c in out_l if c not in kunit)
    contracted = {kl[p] for p in kc}
    first_is_a = bool(contracted & set(i_l)) or not (contracted & set(o_l))
    f1, f1_l, f2, f2_l = (ref.a, a_l, ref.b, b_l) if first_is_a else (ref.b, b_l, ref.a, a_l)
    # The kernel's unit axes contracted with x are summed out of x by einsum (size 1); keep what F2 or out needs.
    need = set(f2_l) | set(out_e)
    t_l = "".join(c for c in dict.fromkeys("".join(xl) + f1_l) if c in need)
    t = _einsum(f"{''.join(xl)},{f1_l}->{t_l}", x, _cast(f1, x.dtype), params)
    t = t * jnp.asarray(ref.info.scale, t.dtype)
    y = _einsum(f"{t_l},{f2_l}->{out_e}", t, _cast(f2, t.dtype), params)
    return jnp.reshape(y, out_shape)


def conv_lora(x: jax.Array, ref: KernelRef, params: dict, out_shape) -> jax.Array | None:
    """PEFT's conv construction: a conv to ``rank`` channels with A, then a 1x1 conv (matmul) with B."""
    dn = params["dimension_numbers"]
    if params.get("batch_group_count", 1) != 1 or ref.count("s") or ref.info.per_example:
        return None
    rhs_spec, out_spec = dn.rhs_spec, dn.out_spec
    if ref.labels[rhs_spec[0]][0] != "o" or ref.count("o") != 1:
        return None
    if any(g == "o" for p, (g, _) in enumerate(ref.labels) if p != rhs_spec[0]):
        return None
    ref = normalize(ref)
    groups = params["feature_group_count"]
    a_k = factor_in_kernel_layout(ref, "a")
    if groups > 1:
        a_k = jnp.concatenate([a_k] * groups, axis=rhs_spec[0])
    t = lax.conv_general_dilated_p.bind(x, _cast(a_k, x.dtype), **params)
    t = jnp.moveaxis(t, out_spec[1], -1)
    t = t * jnp.asarray(ref.info.scale, t.dtype)
    r = ref.a.shape[-1]
    b = _cast(ref.b, t.dtype)  # (r, cout)
    cout = b.shape[-1]
    if groups > 1:
        t = jnp.reshape(t, t.shape[:-1] + (groups, r))
        y = _einsum("...gR,Rgo->...go", t, jnp.reshape(b, (r, groups, cout // groups)), params)
        y = jnp.reshape(y, y.shape[:-2] + (cout,))
    else:
        lead = t.shape[:-1]
        y = jnp.reshape(matmul(jnp.reshape(t, (-1, r)), b, params), lead + (cout,))
    return jnp.reshape(jnp.moveaxis(y, -1, out_spec[1]), out_shape)


def gather_lora(indices: jax.Array, ref: KernelRef, params: dict, out_shape, mask: Any = None) -> jax.Array | None:
    """Embedding lookup: gather rows of A, then multiply by B (``mask``: applied to the gathered rows of A)."""
    dn = params["dimension_numbers"]
    if ref.count("s") or ref.count("i") != 1 or ref.count("o") != 1 or dn.operand_batching_dims:
        return None
    p_in = next(p for p, (g, _) in enumerate(ref.labels) if g == "i")
    p_out = next(p for p, (g, _) in enumerate(ref.labels) if g == "o")
    if tuple(dn.collapsed_slice_dims) != (p_in,) or tuple(dn.start_index_map) != (p_in,):
        return None
    sizes = list(params["slice_sizes"])
    if sizes[p_out] != ref.shape[p_out]:
        return None
    ref = normalize(ref)
    r = ref.a.shape[-1]
    sizes[p_out] = r
    kept = [p for p in range(len(ref.labels)) if p not in dn.collapsed_slice_dims]
    out_axis = dn.offset_dims[kept.index(p_out)]
    gp = dict(params, slice_sizes=tuple(sizes))
    b = ref.b
    if ref.info.per_example:
        if 0 in dn.offset_dims or indices.ndim < 2:
            return None
        a_k = _cast(factor_in_kernel_layout(ref, "a"), ref.dtype)  # (n, V, r) in kernel layout
        pdn = dn._replace(offset_dims=tuple(d - 1 for d in dn.offset_dims))
        pgp = dict(gp, dimension_numbers=pdn)
        t = jax.vmap(lambda a1, i1: lax.gather_p.bind(a1, i1, **pgp))(a_k, indices)
        t = jnp.moveaxis(t, out_axis, -1) * jnp.asarray(ref.info.scale, t.dtype)
        y = jnp.einsum("n...R,nRo->n...o", t, _cast(b, t.dtype))
    else:
        a_k = _cast(factor_in_kernel_layout(ref, "a"), ref.dtype)
        t = lax.gather_p.bind(a_k, indices, **gp)
        t = jnp.moveaxis(t, out_axis, -1) * jnp.asarray(ref.info.scale, t.dtype)
        if mask is not None:
            t = mask(t)
        lead = t.shape[:-1]
        y = jnp.reshape(jnp.reshape(t, (-1, r)) @ _cast(b, t.dtype), lead + (b.shape[-1],))
    return jnp.reshape(jnp.moveaxis(y, -1, out_axis), out_shape)
