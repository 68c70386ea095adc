"""infer_layouts: every kernel's layout, read from how the model's computation uses it.

Names and shapes cannot always tell a kernel's axes apart (gemma's ``(heads, d_model,
head_dim)`` query kernel against Flax's ``(d_model, heads, head_dim)``), but the computation
can: a weight's fan-in axes are the ones a ``dot_general`` contracts with activations, its
fan-out axes the free ones, a stacked axis is scanned over, indexed away or a batch axis of
the product (an expert bank), and an embedding is gathered by row.

The function is traced once to a jaxpr (abstract values, no FLOPs) and the jaxpr is walked,
following each parameter through its views (convert, reshape, transpose, squeeze, slice,
broadcast of unit axes) into calls, scans, loops and branches, as
:mod:`lorajax._factored` does when it runs the factors. That interpreter needs each
kernel's layout before it can run, so the walk here is its abstract counterpart: it labels
kernel axes by their original position instead of by factor axis, and evaluates nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core as jcore

from lorajax import _boxes
from lorajax._expert_layouts import banks_alike
from lorajax._layout import Layout
from lorajax._paths import path_str, tree_paths
from lorajax._trainable import holds_nodes

Axes = tuple[tuple[int, ...], ...]  # for each axis of a view: the original axes of the parameter it covers


@dataclasses.dataclass(frozen=True)
class _View:
    leaf: int
    axes: Axes


class TracedLayouts(dict):
    """``{path: Layout}`` read from a model's computation; what :func:`lorajax.infer_layouts` returns.

    A plain dict for ``lorafy(..., layout=...)``, plus:

    * ``heads``: paths of the weights whose product is the traced function's (first) output
      (the output head; ``all_linear`` leaves them out),
    * ``unresolved``: ``{path: reason}`` for weights consumed in ways that give no single
      layout (e.g. one axis contracted in one use and free in another).

    >>> import jax.numpy as jnp, lorajax
    >>> p = {"body": {"kernel": jnp.ones((8, 8))}, "lm_head": {"kernel": jnp.ones((8, 5))}}
    >>> apply = lambda p, x: jnp.tanh(x @ p["body"]["kernel"]) @ p["lm_head"]["kernel"]
    >>> t = lorajax.infer_layouts(apply, p, jnp.ones(8))
    >>> dict(t), sorted(t.heads), t.unresolved
    ({'body/kernel': Layout('io'), 'lm_head/kernel': Layout('io')}, ['lm_head/kernel'], {})
    """

    heads: frozenset[str]
    unresolved: dict[str, str]


class _Walk:
    """The facts one walk gathers: axis roles per parameter, embedding lookups, products."""

    def __init__(self, ndims: list[int]) -> None:
        self.roles: list[list[set[str]]] = [[set() for _ in range(n)] for n in ndims]
        self.dotted: set[int] = set()
        self.looked_up: set[int] = set()
        self.odd: dict[int, str] = {}

    def mark(self, view: _View, dims: Any, role: str) -> None:
        for d in dims:
            for orig in view.axes[d]:
                self.roles[view.leaf][orig].add(role)

    # --- the walk -------------------------------------------------------
    def run(self, jaxpr: Any, views: list[_View | None], prods: list[frozenset]) -> tuple[list, list]:
        env: dict[Any, _View] = {}
        tags: dict[Any, frozenset] = {}

        def view(v: Any) -> _View | None:
            return None if isinstance(v, jcore.Literal) else env.get(v)

        def tag(v: Any) -> frozenset:
            return frozenset() if isinstance(v, jcore.Literal) else tags.get(v, frozenset())

        for k, v in enumerate(jaxpr.invars):
            given = views[k] if k < len(views) else None
            if given is not None:
                env[v] = given
            if k < len(prods) and prods[k]:
                tags[v] = prods[k]
        for eqn in jaxpr.eqns:
            ins = [view(v) for v in eqn.invars]
            in_tags = [tag(v) for v in eqn.invars]
            outs, out_tags = self.equation(eqn, ins, in_tags)
            for v, x, t in zip(eqn.outvars, outs, out_tags):
                if isinstance(v, jcore.DropVar):
                    continue
                if x is not None:
                    env[v] = x
                if t:
                    tags[v] = t
        return [view(v) for v in jaxpr.outvars], [tag(v) for v in jaxpr.outvars]

    def equation(self, eqn: Any, ins: list, in_tags: list) -> tuple[list, list]:
        name, p, n_out = eqn.primitive.name, eqn.params, len(eqn.outvars)
        none: list = [None] * n_out
        shape = lambda k: tuple(eqn.invars[k].aval.shape)
        if name == "scan":
            return self.scan(eqn, ins), [frozenset()] * n_out
        if name == "while":
            cn, bn = p["cond_nconsts"], p["body_nconsts"]
            self.run(p["cond_jaxpr"].jaxpr, ins[:cn], [])
            self.run(p["body_jaxpr"].jaxpr, ins[cn : cn + bn], [])
            self.carried(ins[cn + bn :], "a while-loop carry")
            return none, [frozenset()] * n_out
        if name == "cond":
            for branch in p["branches"]:
                self.run(branch.jaxpr, ins[1:], [])
            return none, [frozenset()] * n_out
        sub = _sub_jaxpr(eqn)
        if sub is not None:
            return self.run(sub, ins, in_tags)
        if name == "dot_general":
            return [None], [self.dot(eqn, ins)]
        if name == "conv_general_dilated" and ins[1] is not None and ins[0] is None:
            rhs = p["dimension_numbers"].rhs_spec
            self.mark(ins[1], rhs[:1], "o")
            self.mark(ins[1], rhs[1:2], "i")
            self.mark(ins[1], rhs[2:], "w")
            self.dotted.add(ins[1].leaf)
            return [None], [frozenset()]
        if name == "gather" and ins[0] is not None and ins[1] is None:
            return [self.gather(eqn, ins[0])], [frozenset()]
        if name == "ragged_dot_general" and any(v is not None for v in ins):
            return [None], [self.ragged_dot(eqn, ins)]
        x = ins[0] if ins else None
        out_shape = tuple(eqn.outvars[0].aval.shape) if n_out == 1 and hasattr(eqn.outvars[0].aval, "shape") else ()
        if x is not None and all(v is None for v in ins[1:]):
            new = self.view_of(name, p, x, shape(0), out_shape)
            if new is not None:
                return [new], [frozenset()]
        return none, [_passes(name, eqn, ins, in_tags)] + [frozenset()] * (n_out - 1)

    def view_of(self, name: str, p: dict, x: _View, old: tuple, new_shape: tuple) -> _View | None:
        """The view an equation makes of a parameter, or ``None`` when it is no view."""
        if name in _SAME:
            return x
        if name == "transpose":
            return _View(x.leaf, tuple(x.axes[k] for k in p["permutation"]))
        if name in ("slice", "dynamic_slice"):
            return x
        if name == "squeeze":
            dims = {d % len(old) for d in p["dimensions"]}
            self.indexed(x, dims)
            return _View(x.leaf, tuple(a for k, a in enumerate(x.axes) if k not in dims))
        if name == "reshape" and p.get("dimensions") is None:
            reshaped = _reshape(x.axes, old, new_shape)
            return None if reshaped is None else _View(x.leaf, reshaped)
        if name == "broadcast_in_dim":
            bdims = tuple(p["broadcast_dimensions"])
            if any(new_shape[d] != 1 for d in range(len(new_shape)) if d not in bdims):
                return None
            axes: list[tuple[int, ...]] = [()] * len(new_shape)
            for k, d in enumerate(bdims):
                axes[d] = x.axes[k]
            return _View(x.leaf, tuple(axes))
        return None

    def indexed(self, x: _View, dims: Any) -> None:
        # An axis indexed away (``experts[i]``, a layer picked in a loop) holds separate matrices: stacked.
        self.mark(x, dims, "s")

    def dot(self, eqn: Any, ins: list) -> frozenset:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lhs, rhs = ins
        if (lhs is None) == (rhs is None):
            for x in (lhs, rhs):
                if x is not None:
                    self.odd[x.leaf] = "multiplied by another weight"
            return frozenset()
        w, (wc, wb) = (rhs, (rc, rb)) if rhs is not None else (lhs, (lc, lb))
        assert w is not None
        self.mark(w, wc, "i")
        self.mark(w, wb, "s")
        self.mark(w, [d for d in range(len(w.axes)) if d not in wc and d not in wb], "o")
        self.dotted.add(w.leaf)
        return frozenset({w.leaf})

    def gather(self, eqn: Any, x: _View) -> _View | None:
        dn = eqn.params["dimension_numbers"]
        collapsed = tuple(dn.collapsed_slice_dims)
        out_rank = len(eqn.outvars[0].aval.shape)
        if out_rank == len(x.axes) - len(collapsed) and not dn.operand_batching_dims:
            # A scalar index (``w[i]``): a view with the indexed axes gone.
            self.indexed(x, collapsed)
            return _View(x.leaf, tuple(a for k, a in enumerate(x.axes) if k not in collapsed))
        expert = self.expert_gather(eqn, x)
        if expert is not None:
            return expert
        if len(x.axes) == 2 and len(collapsed) == 1:
            self.mark(x, collapsed, "e")
            self.mark(x, [d for d in range(2) if d not in collapsed], "o")
            self.looked_up.add(x.leaf)
        else:
            self.odd[x.leaf] = "gathered in a way that is neither an embedding lookup nor an index"
        return None

    def expert_gather(self, eqn: Any, x: _View) -> _View | None:
        """``W[idx]`` of an expert bank (``idx`` the experts of each token): the indexed axes stacked, the view on.

        An index array (not a scalar) picking whole slices of a weight of three axes or more; the index's axes
        cover no axis of the weight, so the product that follows marks the rest (its true fan-in and fan-out).
        """
        dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
        collapsed = tuple(dn.collapsed_slice_dims)
        shape = tuple(eqn.invars[0].aval.shape)
        whole = all(sizes[d] == shape[d] for d in range(len(shape)) if d not in collapsed)
        if len(x.axes) < 3 or not collapsed or dn.operand_batching_dims or not whole:
            return None
        if sorted(dn.start_index_map) != sorted(collapsed):
            return None
        self.indexed(x, collapsed)
        kept = [a for k, a in enumerate(x.axes) if k not in collapsed]
        axes: list[tuple[int, ...]] = [()] * len(eqn.outvars[0].aval.shape)
        for d, a in zip(dn.offset_dims, kept):
            axes[d] = a
        return _View(x.leaf, tuple(axes))

    def ragged_dot(self, eqn: Any, ins: list) -> frozenset:
        """``jax.lax.ragged_dot(x, W, group_sizes)``: W's group axis stacked (the experts), the rest as in a dot."""
        rdn = eqn.params["ragged_dot_dimension_numbers"]
        (_, rc), (_, rb) = rdn.dot_dimension_numbers
        lhs, rhs, sizes = ins
        if lhs is not None or sizes is not None or rhs is None:
            for v in (lhs, rhs, sizes):
                if v is not None:
                    self.odd[v.leaf] = "used by ragged_dot other than as the grouped right-hand side"
            return frozenset()
        groups = tuple(rdn.rhs_group_dimensions)
        self.mark(rhs, rc, "i")
        self.mark(rhs, tuple(rb) + groups, "s")
        self.mark(rhs, [d for d in range(len(rhs.axes)) if d not in rc and d not in rb and d not in groups], "o")
        self.dotted.add(rhs.leaf)
        return frozenset({rhs.leaf})

    def scan(self, eqn: Any, ins: list) -> list:
        p = eqn.params
        nc, ncar = p["num_consts"], p["num_carry"]
        body = []
        for k, x in enumerate(ins):
            if k >= nc + ncar and x is not None:
                self.mark(x, [0], "s")  # the scanned-over axis: one slice per step (nn.scan layers)
                x = _View(x.leaf, x.axes[1:])
            body.append(x)
        self.carried(ins[nc : nc + ncar], "a scan carry")
        self.run(p["jaxpr"].jaxpr, [x if not (nc <= k < nc + ncar) else None for k, x in enumerate(body)], [])
        return [None] * len(eqn.outvars)

    def carried(self, views: list, where: str) -> None:
        for x in views:
            if x is not None:
                self.odd[x.leaf] = f"carried through {where}"


# Views that keep every axis as it is.
_SAME = frozenset(
    {"convert_element_type", "copy", "copy_p", "reduce_precision", "sharding_constraint", "optimization_barrier"}
)
# Operations through which "the product of weight W" stays W's product (for the output head).
_UNARY = frozenset(
    {"convert_element_type", "copy", "reshape", "transpose", "squeeze", "broadcast_in_dim", "tanh", "logistic"}
    | {"reduce_precision", "sharding_constraint", "neg"}
)
_SCALE = frozenset({"add", "sub", "mul", "div"})


def _passes(name: str, eqn: Any, ins: list, in_tags: list) -> frozenset:
    tagged = [t for t in in_tags if t]
    if len(tagged) != 1:
        return frozenset()
    if name in _UNARY:
        return tagged[0]
    if name in _SCALE:
        # A bias (a parameter) or a scalar (softcapping, temperature) keeps the product; a residual stream does not.
        others = [k for k, t in enumerate(in_tags) if not t]
        if all(ins[k] is not None or not getattr(eqn.invars[k].aval, "shape", ()) for k in others):
            return tagged[0]
    return frozenset()


def _sub_jaxpr(eqn: Any) -> Any:
    """The body of a call-like equation (jit, custom derivatives, remat, shard_map) taking its inputs as they are."""
    for v in eqn.params.values():
        j = v.jaxpr if isinstance(v, jcore.ClosedJaxpr) else v
        if isinstance(j, jcore.Jaxpr) and len(j.invars) == len(eqn.invars):
            return j
    return None


def _reshape(axes: Axes, old: tuple, new: tuple) -> Axes | None:
    """Original axes of each axis after a reshape; ``None`` where the reshape interleaves axes."""
    out: list[tuple[int, ...]] = [()] * len(new)
    o = [k for k, s in enumerate(old) if s != 1]
    n = [k for k, s in enumerate(new) if s != 1]
    i = j = 0
    while i < len(o) and j < len(n):
        bo, bn = [o[i]], [n[j]]
        po, pn = old[o[i]], new[n[j]]
        while po != pn:
            if po < pn:
                i += 1
                if i >= len(o):
                    return None
                bo.append(o[i])
                po *= old[o[i]]
            else:
                j += 1
                if j >= len(n):
                    return None
                bn.append(n[j])
                pn *= new[n[j]]
        merged = tuple(sorted({a for k in bo for a in axes[k]}))
        for q in bn:
            out[q] = merged
        i, j = i + 1, j + 1
    return tuple(out) if i == len(o) and j == len(n) else None


def _layout_of(roles: list[set[str]], shape: tuple, looked_up: bool) -> tuple[Layout | None, str]:
    if looked_up:
        return (Layout("".join("e" if "e" in r else "o" for r in roles)), "") if len(shape) == 2 else (None, "")
    codes = []
    for k, r in enumerate(roles):
        r = r - {"e"}
        if "s" in r:
            codes.append("s")
        elif r == {"i"} or r == {"w"} or r == {"o"}:
            codes.append(r.pop())
        elif not r and shape[k] == 1:
            codes.append("s")  # a unit axis no use touches: one slice
        elif not r:
            return None, f"axis {k} (size {shape[k]}) is never contracted, kept or scanned"
        else:
            return None, f"axis {k} (size {shape[k]}) is contracted in one use and kept in another"
    if not set(codes) & {"i", "w"} or "o" not in codes:
        return None, ""  # no matrix use (a scale multiplied through an einsum): not a kernel
    return Layout("".join(codes)), ""


def infer_layouts(fn: Callable[..., Any], params: Any, *args: Any, **kwargs: Any) -> TracedLayouts:
    """The layout of every weight ``fn`` consumes, read from its computation: ``{path: Layout}``.

    ``fn(params, *args, **kwargs)`` is traced once with abstract values (no FLOPs, no
    memory for activations). A parameter multiplied with activations in a ``dot_general``
    or convolution is a kernel: the axes the product contracts are its fan-in (``i``),
    the ones it keeps its fan-out (``o``), and an axis scanned over (``nn.scan`` layers),
    indexed away (``experts[i]``, ``experts[idx]`` for each token's top-k experts), shared
    as a batch axis of the product or the group axis of ``jax.lax.ragged_dot`` (an expert
    bank) is stacked (``s``); a 2-D table gathered by row is an embedding (``eo``). Every
    expert bank of one block gets one LoRA per expert: a leading axis a product keeps
    free (``td,edf->tef``) is stacked where a sibling bank is stacked over it.
    Parameters followed through casts, reshapes, transposes, slices, ``jit``, remat,
    custom derivatives, ``scan``, ``while`` and ``cond``.

    Pass the result as ``lorafy(..., layout=...)``: each layout is then the model's own,
    and the presets see every kernel it names, bare arrays under any name included
    (gemma's ``mlp/gating_einsum``, tunix's expert banks), while the output head (the
    weight whose product ``fn`` returns) is left out of ``all_linear``.

    Args:
        fn: the model's apply function, taking ``params`` first.
        params: its parameters (a Flax/NNX state, an Equinox module, a dict; plain arrays,
            not yet lorafied).
        *args: the inputs ``fn`` takes after ``params`` (arrays or ``jax.ShapeDtypeStruct``).
        **kwargs: keyword inputs.

    Returns:
        A :class:`TracedLayouts` dict ``{"/"-joined path: Layout}`` with ``.heads`` and
        ``.unresolved``.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> params = {"q_einsum": {"w": jnp.ones((4, 32, 8))}, "mlp": {"gating_einsum": jnp.ones((2, 32, 64))}}
        >>> def apply(p, x):
        ...     q = jnp.einsum("btd,ndh->btnh", x, p["q_einsum"]["w"])
        ...     return jnp.einsum("btd,cdf->btcf", x, p["mlp"]["gating_einsum"]), q
        >>> layouts = lorajax.infer_layouts(apply, params, jnp.ones((1, 3, 32)))
        >>> layouts["q_einsum/w"], layouts["mlp/gating_einsum"]
        (Layout('oio'), Layout('oio'))
    """
    if holds_nodes(params):
        raise ValueError(
            "infer_layouts: params already hold LoRA or Trainable nodes; trace the plain model "
            "(lorajax.unlorafy or lorajax.merge first)."
        )
    leaves = tree_paths(params)
    arrays = [_boxes.unbox(x) for _, x in leaves]
    kept = [k for k, a in enumerate(arrays) if hasattr(a, "shape") and hasattr(a, "dtype")]
    treedef = jax.tree_util.tree_structure(params, is_leaf=_boxes.is_box)
    inputs, in_def = jax.tree_util.tree_flatten((args, kwargs))
    dyn_in = [k for k, x in enumerate(inputs) if hasattr(x, "shape") and hasattr(x, "dtype")]

    def call(weights: list, xs: list) -> Any:
        rebuilt = [leaf for _, leaf in leaves]
        for k, w in zip(kept, weights):
            rebuilt[k] = _boxes.rebox(leaves[k][1], w)
        flat = list(inputs)
        for k, x in zip(dyn_in, xs):
            flat[k] = x
        a, kw = jax.tree_util.tree_unflatten(in_def, flat)
        return fn(jax.tree_util.tree_unflatten(treedef, rebuilt), *a, **kw)

    spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    closed = jax.make_jaxpr(call)([spec(arrays[k]) for k in kept], [spec(inputs[k]) for k in dyn_in])
    shapes = [tuple(arrays[k].shape) for k in kept]
    walk = _Walk([len(s) for s in shapes])
    views: list[_View | None] = [_View(j, tuple((a,) for a in range(len(s)))) for j, s in enumerate(shapes)]
    views += [None] * len(dyn_in)
    _, out_tags = walk.run(closed.jaxpr, views, [])
    out = TracedLayouts()
    out.unresolved = {}
    names = [path_str(leaves[k][0]) for k in kept]
    for j, name in enumerate(names):
        if j not in walk.dotted and j not in walk.looked_up:
            continue
        layout, why = _layout_of(walk.roles[j], shapes[j], j in walk.looked_up)
        if j in walk.odd and j not in walk.looked_up:
            layout, why = None, walk.odd[j]
        if layout is not None:
            out[name] = layout
        elif why:
            out.unresolved[name] = f"shape {shapes[j]}: {why}"
    banks_alike(out, dict(zip(names, shapes)))  # every expert bank of a block per expert
    # The first output is the model's (logits, cache) by the libraries' convention: its weights are the head.
    first = out_tags[0] if out_tags else frozenset()
    out.heads = frozenset(names[j] for j in first if names[j] in out)
    return out
