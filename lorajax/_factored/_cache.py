"""The trace cache of a factored function: one traced runner per call structure, bounded, keyed by value.

A call's key is its tree structure, the shape and dtype of every array, and the value of every
static (non-array) leaf. Hashable statics are keyed by hash and equality, and the key holds them,
so an object hashed by identity stays alive (its id cannot be recycled) while its trace is cached.
An unhashable static (a mutable config object) is keyed by a deep copy taken when its trace was
made and compared by ``==``: mutating it in place or passing an equal new one is seen by value.
A static that can be neither hashed nor copied is not cached (the call traces again).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

MAXSIZE = 64


class Uncacheable(Exception):
    """A static argument that can be neither hashed nor copied: the call is traced without caching."""


class ByValue:
    """An unhashable static, hashed by its type and compared by ``==`` with another's value."""

    def __init__(self, obj: Any):
        self.obj = obj

    def __hash__(self) -> int:
        return hash(type(self.obj))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ByValue) or type(other.obj) is not type(self.obj):
            return False
        try:
            same = self.obj == other.obj
            return same if isinstance(same, bool) else False
        except Exception:  # an __eq__ that raises (arrays inside) cannot vouch for equality
            return False

    def snapshot(self) -> ByValue:
        """A copy that later mutations of the caller's object do not reach."""
        try:
            return ByValue(copy.deepcopy(self.obj))
        except Exception as err:
            raise Uncacheable from err


def static_key(leaf: Any) -> Any:
    """The cache-key entry of a static leaf (its type too: ``True == 1`` must not share a trace).

    >>> static_key(3) == static_key(3), static_key(True) == static_key(1)
    (True, False)
    >>> static_key([1]) == static_key([1]), static_key([1]) == static_key([2])
    (True, False)
    """
    try:
        hash(leaf)
    except TypeError:
        return ("static", type(leaf), ByValue(leaf))
    return ("static", type(leaf), leaf)


def _frozen(key: Any) -> Any:
    if isinstance(key, ByValue):
        return key.snapshot()
    if isinstance(key, tuple):
        return tuple(_frozen(k) for k in key)
    return key


class TraceCache:
    """A least-recently-used map from call keys to traced runners, at most ``maxsize`` of them.

    >>> cache = TraceCache(maxsize=2)
    >>> [cache.get(k, lambda k=k: k * 10) for k in (1, 2, 1, 3)]
    [10, 20, 10, 30]
    >>> len(cache), list(cache.keys())
    (2, [1, 3])
    """

    def __init__(self, maxsize: int = MAXSIZE):
        self.maxsize = maxsize
        self._entries: OrderedDict[Any, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list:
        """The cached keys, least recently used first."""
        return list(self._entries)

    def clear(self) -> None:
        """Forget every trace."""
        self._entries.clear()

    def get(self, key: Any, build: Callable[[], Any]) -> Any:
        """The runner cached under ``key``, or ``build()``'s, cached under a snapshot of ``key``."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        try:
            stored = _frozen(key)
        except Uncacheable:
            return build()
        entry = build()
        self._entries[stored] = entry
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)
        return entry
