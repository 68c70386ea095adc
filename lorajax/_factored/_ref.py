"""KernelRef: the symbolic value that stands for a LoRA kernel inside the factored interpreter.

A ``KernelRef`` is "the kernel ``base + scale * a @ b``, seen through some reshapes and
transposes". It keeps the (viewed) base and the two factors separately, plus a label
for every axis of the current view saying which factor axis it is:

* ``("s", j)`` stacked axis ``j`` (present in both factors),
* ``("i", j)`` fan-in axis ``j`` of ``a`` (fan-in, conv window, embedding rows),
* ``("o", j)`` fan-out axis ``j`` of ``b``,
* ``("u", 0)`` a unit axis that exists in neither factor (added by a reshape or broadcast).

Factor layouts: ``a`` is ``(*[n], *stack, *fan_in, r)`` and ``b`` is ``(*[n], *stack, r, *fan_out)``,
where ``n`` is the per-example axis of mixed-adapter nodes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorajax._layout import Layout
from lorajax._node import LoRASpec, compute_dtype, lora_delta


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    """Static facts about one LoRA node, shared by every view of it."""

    path: str
    index: int
    spec: LoRASpec
    per_example: bool
    orig_dtype: Any

    @property
    def scale(self) -> float:
        return self.spec.scale


Label = tuple[str, int]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KernelRef:
    base: Any  # the viewed base, in the base's original dtype, under stop_gradient
    a: Any
    b: Any
    key: Any  # dropout key for this node (None when dropout is off)
    labels: tuple[Label, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: Any = dataclasses.field(metadata=dict(static=True))  # dtype of the current view
    info: NodeInfo = dataclasses.field(metadata=dict(static=True))
    rows: Any = None  # a bank's per-row adapter ids (lorajax/_factored/_banked.py); None for other nodes

    # --- factor geometry -------------------------------------------------
    @property
    def n_off(self) -> int:
        return 1 if self.info.per_example else 0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    def count(self, group: str) -> int:
        return sum(1 for g, _ in self.labels if g == group)

    def factor_axis(self, which: str, label: Label) -> int:
        """Position of the axis ``label`` inside factor ``which`` ("a" or "b")."""
        g, j = label
        ns = self.count("s")
        if g == "s":
            return self.n_off + j
        if which == "a" and g == "i":
            return self.n_off + ns + j
        if which == "b" and g == "o":
            return self.n_off + ns + 1 + j
        raise ValueError(f"axis {label} is not in factor {which}")

    def rank_axis(self, which: str) -> int:
        return self.a.ndim - 1 if which == "a" else self.n_off + self.count("s")

    def replace(self, **kw: Any) -> KernelRef:
        return dataclasses.replace(self, **kw)


def normalize(ref: KernelRef) -> KernelRef:
    """Reorder the factor axes of each group to follow the current kernel axis order."""
    new_labels = list(ref.labels)
    perms: dict[str, list[int]] = {}
    for g in "sio":
        order = [j for (gg, j) in ref.labels if gg == g]
        perms[g] = order
        k = 0
        for p, (gg, _) in enumerate(ref.labels):
            if gg == g:
                new_labels[p] = (g, k)
                k += 1
    if all(perms[g] == sorted(perms[g]) for g in "sio"):
        return ref.replace(labels=tuple(new_labels))
    n, ns = ref.n_off, len(perms["s"])
    lead = list(range(n))
    st = [n + j for j in perms["s"]]
    a_perm = lead + st + [n + ns + j for j in perms["i"]] + [ref.a.ndim - 1]
    b_perm = lead + st + [n + ns] + [n + ns + 1 + j for j in perms["o"]]
    return ref.replace(a=jnp.transpose(ref.a, a_perm), b=jnp.transpose(ref.b, b_perm), labels=tuple(new_labels))


def drop_unit(ref: KernelRef, p: int) -> KernelRef:
    """Turn kernel axis ``p`` (size 1) into a unit axis that no factor holds."""
    g, j = ref.labels[p]
    if g == "u":
        return ref
    a, b = ref.a, ref.b
    if g in "si":
        a = jnp.squeeze(a, ref.factor_axis("a", (g, j)))
    if g in "so":
        b = jnp.squeeze(b, ref.factor_axis("b", (g, j)))
    labels = [(gg, jj - 1 if (gg == g and jj > j) else jj) for gg, jj in ref.labels]
    labels[p] = ("u", 0)
    return ref.replace(a=a, b=b, labels=tuple(labels))


def reshape_factors(ref: KernelRef, new_shape: tuple[int, ...]) -> KernelRef | None:
    """Follow a reshape of the kernel in the factors; ``None`` when the reshape mixes groups."""
    ref = normalize(ref)
    for p, size in enumerate(ref.shape):
        if size == 1:
            ref = drop_unit(ref, p)
    old = [p for p, s in enumerate(ref.shape) if s != 1]
    new = [q for q, s in enumerate(new_shape) if s != 1]
    labels: list[Label] = [("u", 0)] * len(new_shape)
    sizes: dict[str, list[int]] = {"s": [], "i": [], "o": []}
    i = j = 0
    while i < len(old) or j < len(new):
        if i >= len(old) or j >= len(new):
            return None
        bo, bn = [old[i]], [new[j]]
        po, pn = ref.shape[old[i]], new_shape[new[j]]
        while po != pn:
            if po < pn:
                i += 1
                if i >= len(old):
                    return None
                bo.append(old[i])
                po *= ref.shape[old[i]]
            else:
                j += 1
                if j >= len(new):
                    return None
                bn.append(new[j])
                pn *= new_shape[new[j]]
        i += 1
        j += 1
        groups = {ref.labels[p][0] for p in bo}
        if len(groups) != 1:
            return None
        g = groups.pop()
        for q in bn:
            labels[q] = (g, len(sizes[g]))
            sizes[g].append(new_shape[q])
    lead = list(ref.a.shape[: ref.n_off])
    r = ref.a.shape[-1]
    a = jnp.reshape(ref.a, lead + sizes["s"] + sizes["i"] + [r])
    b = jnp.reshape(ref.b, lead + sizes["s"] + [r] + sizes["o"])
    return ref.replace(a=a, b=b, labels=tuple(labels))


def factor_in_kernel_layout(ref: KernelRef, which: str) -> jax.Array:
    """Factor ``which`` laid out like the current kernel, its other group's (single) axis replaced by rank.

    For ``a`` of a conv kernel ``(kh, kw, cin, cout)`` this is ``(kh, kw, cin, r)``: the A side
    of PEFT's conv construction. Needs exactly one axis in the replaced group and no stack axes.
    """
    other = "o" if which == "a" else "i"
    f = ref.a if which == "a" else ref.b
    order, shape = [], []
    for p, lab in enumerate(ref.labels):
        if lab[0] == "u":
            shape.append(1)
        elif lab[0] == other:
            order.append(ref.rank_axis(which))
            shape.append(f.shape[ref.rank_axis(which)])
        else:
            order.append(ref.factor_axis(which, lab))
            shape.append(ref.shape[p])
    lead = list(range(ref.n_off))
    f = jnp.transpose(f, lead + order)
    return jnp.reshape(f, list(f.shape[: ref.n_off]) + shape)


def materialize(ref: KernelRef) -> jax.Array:
    """``base + scale * a @ b`` in the current view, like ``lorajax.merge`` (float32 sum, one rounding).

    The factors are first brought to the normal layout ``s..si..io..o`` (stacked, fan-in, fan-out
    groups, each in the view's axis order), so the delta is :func:`lorajax._node.lora_delta`'s, then
    laid out like the view.
    """
    if ref.info.per_example:
        raise ValueError(
            f"lorajax.factored: {ref.info.path} holds per-example factors (from lorajax.select) and reaches an "
            "operation that cannot be factored, so it cannot be materialised as one kernel. Only dot_general "
            "and embedding gathers can run per-example adapters."
        )
    ref = normalize(ref)
    dt = compute_dtype(ref.info.orig_dtype)
    d = _view_product(ref, ref.a, ref.b, ref.info.spec, dt)
    w = ref.base.dense(dt) + d
    if ref.info.spec.variant == "dora":
        # a carries a zero rank column and b the row g = m/n (lorajax/_factored/_dora.py): d is the plain
        # delta, and the last column/row alone lay g out over the view (ones over the fan-in axes).
        r = ref.a.shape[-1] - 1
        ones = jnp.ones(ref.a.shape[:-1] + (1,), dt)
        g_row = jax.lax.slice_in_dim(ref.b, r, r + 1, axis=ref.rank_axis("b"))
        g = _view_product(ref, ones, g_row, ref.info.spec.replace(rank=1, alpha=1.0, rslora=False), dt)
        axes = ref.base.norm_axes(ref.labels, ref.info.path)
        if axes is not None:  # a quantized base: the row holds m, and n is the norm of the w formed here
            g = g / jax.lax.stop_gradient(jnp.sqrt(jnp.sum(jnp.square(w), axis=axes, keepdims=True)))
        w = w * g
    return w.astype(ref.info.orig_dtype).astype(ref.dtype)


def _view_product(ref: KernelRef, a: Any, b: Any, spec: LoRASpec, dt: Any) -> jax.Array:
    """``spec.scale * a @ b`` laid out like the (normalized) view ``ref``."""
    ns, ni, no = ref.count("s"), ref.count("i"), ref.count("o")
    # A view may have squeezed away every fan-in (or fan-out) axis; a unit axis keeps the layout valid.
    if ni == 0:
        a = jnp.expand_dims(a, -2)
    if no == 0:
        b = jnp.expand_dims(b, -1)
    layout = Layout("s" * ns + "i" * max(ni, 1) + "o" * max(no, 1))
    d = lora_delta(a, b, spec.replace(layout=layout), dt)
    if ni == 0:
        d = jnp.squeeze(d, ns)
    if no == 0:
        d = jnp.squeeze(d, -1)
    # After normalize, group g's j-th factor axis is the view's j-th axis of that group, in view order.
    offset = {"s": 0, "i": ns, "o": ns + ni}
    order = [offset[g] + j for g, j in ref.labels if g != "u"]
    return jnp.reshape(jnp.transpose(d, order), ref.shape)


def prod(xs: Any) -> int:
    return int(math.prod(int(x) for x in xs))


def is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def slice_factors(ref: KernelRef, axis: int, cut: Any) -> KernelRef:
    """Apply ``cut(factor, factor_axis)`` to whichever factors hold kernel axis ``axis``."""
    g, j = ref.labels[axis]
    a, b = ref.a, ref.b
    if g in "si":
        a = cut(a, ref.factor_axis("a", (g, j)))
    if g in "so":
        b = cut(b, ref.factor_axis("b", (g, j)))
    return ref.replace(a=a, b=b)
