"""Hot-swappable adapter slots: a bank of fixed capacity whose adapters change without retracing."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from lorajax._paths import path_str, rebuild, tree_paths
from lorajax._problems import Problems
from lorajax.adapters._adapter import as_adapter
from lorajax.adapters._attach import factor_problems
from lorajax.adapters._bank import (
    AdapterBank,
    BankNode,
    bank_row,
    is_bank_node,
    is_dora,
    refuse_trainables,
    stack_adapters,
    with_dora_rows,
)


def _nodes(bank: AdapterBank) -> list[Any]:
    return [x for _, x in tree_paths(bank.params, is_leaf=is_bank_node)]


@dataclasses.dataclass(frozen=True)
class AdapterSlots:
    """A bank of ``capacity`` slots plus the host-side map from adapter names to slots.

    :attr:`bank` is an :class:`AdapterBank` whose shapes, dtypes and static metadata never change:
    its names are the fixed slot labels ``"slot0"``, ``"slot1"``, ... and the adapters' own names live
    here, outside the pytree, in :attr:`names`. So :meth:`put` and :meth:`evict` (functional: they return
    new slots) never retrace nor recompile a jitted function that takes ``slots.bank``; give it ids from
    :meth:`ids`. Build with :func:`adapter_slots`.

    Attributes:
        bank: the slots' bank (pass it to ``jax.jit``-ed functions and :func:`lorajax.select`).
        names: the adapter in each slot, ``None`` for a free slot.
    """

    bank: AdapterBank
    names: tuple[str | None, ...]

    @property
    def capacity(self) -> int:
        return len(self.names)

    def ids(self, names: Sequence[str | None]) -> np.ndarray:
        """Slot ids for a batch given by adapter names (``None`` = base model, id -1).

        >>> import jax, jax.numpy as jnp, lorajax
        >>> base = {"q": {"kernel": jnp.ones((4, 4))}}
        >>> slots = lorajax.adapter_slots({"x": lorajax.lorafy(base, rank=2, where=".*", key=jax.random.key(0))}, 3)
        >>> slots.ids(["x", None]).tolist()
        [0, -1]
        """
        pos = {n: k for k, n in enumerate(self.names) if n is not None}
        unknown = sorted({str(n) for n in names if n is not None and n not in pos})
        if unknown:
            raise ValueError(
                f"AdapterSlots.ids: unknown adapter names {unknown}; the slots hold {sorted(pos)}. "
                "Load it first with AdapterSlots.put."
            )
        return np.asarray([-1 if n is None else pos[n] for n in names], np.int32)

    def put(self, name: str, adapter: Any) -> AdapterSlots:
        """New slots with ``adapter`` in the slot of ``name`` (replaced) or else in the first free slot.

        The adapter's factors are padded to the slots' rank and scale-folded like
        :func:`lorajax.stack_adapters`; targets of the slots that it does not adapt get zeros. A DoRA
        adapter's magnitudes go into the slot as well (DoRA-capable slots: ``adapter_slots(..., dora=True)``),
        a plain adapter's slot is marked plain (gain 1): a slot changes kind without retracing.

        Raises:
            ValueError: no free slot; the adapter targets a kernel that has no slot, has a rank above the
                slot rank, another layout or base shape there; it is a DoRA adapter and the slots were
                built without DoRA rows; or it carries trained leaves (``lorafy(..., also=...)``), which
                slots cannot hold per adapter.

        >>> import jax, jax.numpy as jnp, lorajax
        >>> base = {"q": {"kernel": jnp.ones((4, 4))}}
        >>> lora = lambda k, r: lorajax.lorafy(base, rank=r, where=".*", key=jax.random.key(k))
        >>> slots = lorajax.adapter_slots({"x": lora(0, 2)}, 2, rank=4).put("y", lora(1, 3))
        >>> slots.names, slots.bank.params["q"]["kernel"].a.shape
        (('x', 'y'), (3, 4, 4))
        """
        caller = "AdapterSlots.put"
        ad = as_adapter(adapter, caller=caller)
        refuse_trainables([ad], caller)
        slot = (
            self.names.index(name)
            if name in self.names
            else next((k for k, n in enumerate(self.names) if n is None), None)
        )
        if slot is None:
            raise ValueError(
                f"{caller}: all {self.capacity} slots are taken ({list(self.names)}); evict one first "
                "(AdapterSlots.evict) or build larger slots (adapter_slots(capacity=...))."
            )
        leaves = tree_paths(self.bank.params, is_leaf=is_bank_node)
        index = {path_str(p): n for n, (p, leaf) in enumerate(leaves) if is_bank_node(leaf)}
        problems = Problems(caller)
        for target, f in sorted(ad.factors.items()):
            if target not in index:
                problems.add(f"missing: {target}: no slot holds this kernel (slot targets: {sorted(index)})")
                continue
            node: BankNode = leaves[index[target]][1]
            shape = tuple(int(d) for d in node.base.shape)
            if f.layout != node.layout or f.shape != shape:
                problems.add(
                    f"shape: {target}: the adapter has layout {f.layout.axes!r} for a base of shape {f.shape}, "
                    f"the slot {node.layout.axes!r} for {shape}"
                )
            if f.rank > node.rank:
                problems.add(f"rank: {target}: rank {f.rank} is larger than the slot rank {node.rank}")
            if is_dora(f):
                problems.extend(factor_problems(target, f))
                if node.magnitude is None:
                    problems.add(
                        f"dora: {target}: a DoRA entry (kernel shape {f.shape}), but these slots hold plain LoRA only; "
                        "build them with adapter_slots(..., dora=True)"
                    )
        problems.raise_if_any(
            f"cannot load {name!r}", "Build the slots with a larger rank=, these targets, or dora=True as needed."
        )
        replaced = {}
        for target, n in index.items():
            node = leaves[n][1]
            entry = ad.factors.get(target)
            if entry is not None:
                a_row, b_row = bank_row(entry, node.rank, node.a.dtype)
            else:
                a_row, b_row = jnp.zeros_like(node.a[slot]), jnp.zeros_like(node.b[slot])
            new = dataclasses.replace(node, a=node.a.at[slot].set(a_row), b=node.b.at[slot].set(b_row))
            if node.magnitude is not None:  # the slot's kind: DoRA where the entry is, plain (gain 1) elsewhere
                dora = entry is not None and is_dora(entry)
                m_row = jnp.asarray(entry.magnitude, node.magnitude.dtype) if entry is not None and dora else 0
                magnitude, flags = node.magnitude.at[slot].set(m_row), node.dora.at[slot].set(dora)
                new = dataclasses.replace(new, magnitude=magnitude, dora=flags)
            replaced[n] = new
        params = rebuild(self.bank.params, leaves, replaced, is_bank_node)
        names = self.names[:slot] + (name,) + self.names[slot + 1 :]
        return AdapterSlots(AdapterBank(params, self.bank.names), names)

    def evict(self, name: str) -> AdapterSlots:
        """New slots with ``name``'s slot zeroed and free.

        >>> import jax, jax.numpy as jnp, lorajax
        >>> base = {"q": {"kernel": jnp.ones((4, 4))}}
        >>> slots = lorajax.adapter_slots({"x": lorajax.lorafy(base, rank=2, where=".*", key=jax.random.key(0))}, 2)
        >>> slots.evict("x").names
        (None, None)
        """
        if name not in self.names:
            raise ValueError(f"AdapterSlots.evict: no adapter {name!r} in the slots; they hold {list(self.names)}.")
        slot = self.names.index(name)

        def clear(node: Any) -> Any:
            if not is_bank_node(node):
                return node
            node = dataclasses.replace(node, a=node.a.at[slot].set(0), b=node.b.at[slot].set(0))
            if node.magnitude is None:
                return node
            return dataclasses.replace(
                node, magnitude=node.magnitude.at[slot].set(0), dora=node.dora.at[slot].set(False)
            )

        leaves = tree_paths(self.bank.params, is_leaf=is_bank_node)
        params = rebuild(self.bank.params, leaves, {n: clear(x) for n, (_, x) in enumerate(leaves)}, is_bank_node)
        names = self.names[:slot] + (None,) + self.names[slot + 1 :]
        return AdapterSlots(AdapterBank(params, self.bank.names), names)


def adapter_slots(
    adapters: Mapping[str, Any],
    capacity: int,
    *,
    rank: int = 0,
    base: Any = None,
    dtype: Any = None,
    dora: bool | None = None,
) -> AdapterSlots:
    """Hot-swappable slots for up to ``capacity`` adapters of one base (vLLM's ``max_loras``).

    The slots' targets are those of the given adapters (load a template adapter and evict it to
    start empty); every target's rank is ``rank`` or the largest given rank there. Later
    :meth:`AdapterSlots.put` / :meth:`AdapterSlots.evict` keep every shape and dtype, so a jitted
    serving function over ``slots.bank`` compiles once.

    Args:
        adapters: ``{name: lorafied params or Adapter}`` for the first slots.
        capacity: number of slots (at least ``len(adapters)``).
        rank: the slot rank (default: the largest given rank at each target).
        base: the base params (default: from the first lorafied params), as in :func:`lorajax.stack_adapters`.
        dtype: factor dtype of the slots.
        dora: whether the slots can hold DoRA adapters (default: whether any given adapter is DoRA). DoRA-capable
            slots keep a magnitude and a DoRA flag per slot at every target, and :func:`lorajax.select` computes
            each slot's gain ``m / ‖W + s·A·B‖`` (1 for plain slots) per call: a small cost, one rank-``r``
            contraction of each kernel per slot, that plain-only slots do not pay.

    Returns:
        An :class:`AdapterSlots`.

    Example:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> base = {"q": {"kernel": jnp.ones((4, 4))}}
        >>> slots = lorajax.adapter_slots({"x": lorajax.lorafy(base, rank=2, where=".*", key=jax.random.key(0))}, 4)
        >>> slots.names, slots.bank.params["q"]["kernel"].a.shape  # 4 slots + the zero row
        (('x', None, None, None), (5, 4, 2))
    """
    if not isinstance(adapters, Mapping) or not adapters:
        raise ValueError("adapter_slots: give the first adapters as a non-empty dict {name: adapter}.")
    if capacity < len(adapters):
        raise ValueError(f"adapter_slots: capacity={capacity} is below the {len(adapters)} adapters given.")
    bank = stack_adapters(adapters, base=base, dtype=dtype, rank=rank)
    extra = capacity - len(adapters)
    if dora is None:
        dora = any(isinstance(x, BankNode) and x.magnitude is not None for x in _nodes(bank))

    def widen(node: Any) -> Any:  # free slots (zeros, plain) go before the bank's final zero row
        if not is_bank_node(node):
            return node
        if dora and node.magnitude is None:
            node = with_dora_rows(node, {})
        grow = lambda v: jnp.concatenate([v[:-1], jnp.zeros((extra, *v.shape[1:]), v.dtype), v[-1:]])
        if node.magnitude is None:
            return dataclasses.replace(node, a=grow(node.a), b=grow(node.b))
        return dataclasses.replace(
            node, a=grow(node.a), b=grow(node.b), magnitude=grow(node.magnitude), dora=grow(node.dora)
        )

    leaves = tree_paths(bank.params, is_leaf=is_bank_node)
    params = rebuild(bank.params, leaves, {n: widen(x) for n, (_, x) in enumerate(leaves)}, is_bank_node)
    labels = tuple(f"slot{k}" for k in range(capacity))
    return AdapterSlots(AdapterBank(params, labels), tuple(bank.names) + (None,) * extra)
