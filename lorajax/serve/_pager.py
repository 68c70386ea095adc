"""Adapter paging: many adapters on the host, a few device slots, least-recently-used eviction."""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

from lorajax.adapters._adapter import Adapter, as_adapter
from lorajax.adapters._slots import AdapterSlots, adapter_slots


class SlotPager:
    """Registered adapters (host-side) paged into the fixed :class:`lorajax.AdapterSlots` of a bank.

    Every adapter lives in :attr:`store`; up to ``capacity`` of them sit in device slots. :meth:`acquire`
    pages one in on demand, evicting the least recently used slot that no running request holds (a slot
    change never retraces: the bank keeps its shapes). A request holds its adapter's slot from
    :meth:`acquire` to :meth:`release`. Not thread-safe: the engine calls it under its lock.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lorajax import lorafy
        >>> base = {"q": {"kernel": jnp.ones((4, 4))}}
        >>> ads = {f"a{k}": lorafy(base, rank=2, where=".*", key=jax.random.key(k)) for k in range(3)}
        >>> pager = SlotPager(ads, capacity=2, rank=2)
        >>> pager.acquire("a2"), pager.slots.names  # a0 was least recently used
        (0, ('a2', 'a1'))
    """

    def __init__(self, adapters: Mapping[str, Any], capacity: int, *, rank: int = 0, base: Any = None):
        if not adapters:
            raise ValueError("SlotPager: give at least one adapter (it sets the slots' targets).")
        self.store: dict[str, Adapter] = {n: as_adapter(p, caller="SlotPager") for n, p in adapters.items()}
        first = dict(list(adapters.items())[:capacity])  # as given: lorafied params carry their base
        self.slots: AdapterSlots = adapter_slots(first, capacity, rank=rank, base=base)
        self.recent: collections.OrderedDict[str, None] = collections.OrderedDict((n, None) for n in first)
        self.holds: collections.Counter[str] = collections.Counter()
        self.page_ins = 0

    def check(self, name: str, adapter: Any) -> Adapter:
        """``adapter`` as an :class:`lorajax.Adapter` that fits the slots (ValueError listing what does not)."""
        ad = as_adapter(adapter, caller="SlotPager")
        slots = self.slots  # an immutable value: put/evict return new slots, so this changes nothing
        if None not in slots.names:
            slots = slots.evict(next(n for n in slots.names if n is not None))
        slots.put(name, ad)  # raises with every problem listed
        return ad

    def register(self, name: str, adapter: Any) -> None:
        """Add ``adapter`` to the host-side store (checked against the slots; paged in on first use)."""
        self.store[name] = self.check(name, adapter)

    def unregister(self, name: str) -> None:
        """Drop ``name`` from the store; its slot is freed once no request holds it (:meth:`sweep`)."""
        del self.store[name]
        self.sweep()

    def sweep(self) -> None:
        """Evict slots whose adapter was unregistered and that no request holds."""
        for name in [n for n in self.slots.names if n is not None and n not in self.store and not self.holds[n]]:
            self.slots = self.slots.evict(name)
            self.recent.pop(name, None)

    def acquire(self, name: str) -> int | None:
        """The slot id of ``name``, paged in if needed, and held; ``None`` while every slot is held."""
        if name not in self.slots.names:
            free = None in self.slots.names
            victim = next((n for n in self.recent if not self.holds[n]), None)
            if not free and victim is None:
                return None
            slots = self.slots if free else self.slots.evict(victim)  # type: ignore[arg-type]
            if not free:
                del self.recent[victim]  # type: ignore[arg-type]
            self.slots = slots.put(name, self.store[name])
            self.page_ins += 1
        self.recent[name] = None
        self.recent.move_to_end(name)
        self.holds[name] += 1
        return self.slots.names.index(name)

    def release(self, name: str) -> None:
        """A request on ``name`` finished or was cancelled."""
        self.holds[name] -= 1
        if self.holds[name] <= 0:
            del self.holds[name]
        self.sweep()
