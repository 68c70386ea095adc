"""The serving engine: adapter slots, a KV cache, one jitted decode step, continuous batching in a thread."""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorajax._factored import factored
from lorajax._merge import merge
from lorajax.adapters._adapter import Adapter
from lorajax.adapters._attach import attach
from lorajax.adapters._bank import select
from lorajax.serve._pager import SlotPager
from lorajax.serve._text import TextStream


@dataclasses.dataclass(frozen=True)
class CachedLM:
    """What the engine needs of a model with a KV cache.

    Attributes:
        apply: ``(params, tokens, start, cache) -> (logits, cache)``: ``tokens`` ``(batch, T)`` int32 at absolute
            positions ``start[b] + t`` write their keys/values into ``cache`` (a position ``>= seq_len`` writes
            nothing) and attend over the row; logits ``(batch, T, vocab)``.
        init_cache: ``batch -> cache``, a pytree whose leaves have the batch as leading axis.
        seq_len: the model's context window (a longer sequence slides its window and is recomputed).
        encode: text to token ids.
        decode: token ids to text.
    """

    apply: Callable[..., Any]
    init_cache: Callable[[int], Any]
    seq_len: int
    encode: Callable[[str], Sequence[int]]
    decode: Callable[[Sequence[int]], str]


@dataclasses.dataclass(eq=False)
class Request:
    """One completion in the engine. ``emit(text, finish_reason)`` is called from the engine thread."""

    adapter: str | None
    tokens: list[int]
    max_tokens: int
    emit: Callable[[str, str | None], Any]
    temperature: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    out: list[int] = dataclasses.field(default_factory=list)
    row: int = -1
    slot: int = -1
    cancelled: bool = False
    finish: str | None = None
    text: TextStream | None = None

    @property
    def length(self) -> int:
        return len(self.tokens) + len(self.out)


def window(tokens: Sequence[int], seq_len: int) -> tuple[np.ndarray, int]:
    """The last ``seq_len`` tokens (right-padded while shorter) and the position whose logits predict the next.

    >>> window([5, 6, 7], 4)
    (array([5, 6, 7, 0], dtype=int32), 2)
    """
    start = max(len(tokens) - seq_len, 0)
    w = np.zeros(seq_len, np.int32)
    piece = list(tokens[start:])
    w[: len(piece)] = piece
    return w, len(tokens) - 1 - start


def pick(logits: jax.Array, temps: jax.Array, seeds: jax.Array, counts: jax.Array) -> jax.Array:
    """Next tokens: argmax where ``temps == 0``, else sampled with the key ``fold_in(key(seed), count)``.

    >>> int(pick(jnp.asarray([[0.0, 3.0, 1.0]]), jnp.zeros(1), jnp.zeros(1, jnp.uint32), jnp.zeros(1, jnp.int32))[0])
    1
    """
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counts)
    scaled = logits / jnp.where(temps > 0, temps, 1.0)[:, None]
    sampled = jax.vmap(jax.random.categorical)(keys, scaled)
    return jnp.where(temps > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def _pad_to(n: int, cap: int) -> int:
    return min(cap, 1 << (n - 1).bit_length())


def prefill_lengths(seq_len: int, shortest: int = 16) -> list[int]:
    """The prompt lengths a prefill is padded to: ``seq_len``, then each a quarter of the last, down to ``shortest``.

    A prompt runs in the shortest bucket that holds it (one compiled shape per bucket and per row count): a short
    prompt no longer pays for a whole window of padding, and none pays for more than 4x its length (or
    ``shortest``), with few shapes to compile.

    >>> prefill_lengths(128), prefill_lengths(4096)
    ([32, 128], [16, 64, 256, 1024, 4096])
    """
    out = [seq_len]
    while out[-1] // 4 >= shortest:
        out.append(out[-1] // 4)
    return out[::-1]


class Engine:
    """Continuous batching over a KV cache for one base model and many LoRA adapters.

    ``mode="bank"``: every decode step is ONE jitted call over the busy prefix of the cache rows, each row running its
    own adapter's slot (:func:`lorajax.select` + :func:`lorajax.factored`); adapters are paged into ``slots``
    device slots by a :class:`SlotPager` (least recently used out). ``mode="loop"`` (a baseline): each step runs
    the rows of one adapter with its merged weights. Without adapters, :attr:`mode` is ``"base"``: the bank's
    steps over the base model alone (what a server without LoRA does). Prompts are prefilled in calls of at most
    ``prefill_chunk``, each padded to the shortest of :attr:`lengths` that holds it. The engine thread owns the
    cache; :meth:`submit` and :meth:`cancel` are thread-safe.
    """

    def __init__(
        self,
        model: CachedLM,
        base: Any,
        adapters: Mapping[str, Any],
        *,
        slots: int = 8,
        rank: int = 0,
        max_batch: int = 16,
        max_model_len: int = 256,
        prefill_chunk: int = 16,
        form: str = "auto",
        mode: str = "bank",
    ):
        if mode not in ("bank", "loop"):
            raise ValueError(f"Engine: mode must be 'bank' or 'loop', not {mode!r}.")
        self.model, self.base = model, base
        self.mode = mode if adapters else "base"  # no adapters: the base model alone, bank-style steps over it
        self.seq_len, self.max_batch, self.max_model_len = model.seq_len, max_batch, max_model_len
        self.prefill_chunk = min(prefill_chunk, max_batch)
        self.lengths = prefill_lengths(model.seq_len)
        self.pager = SlotPager(adapters, slots, rank=rank, base=base) if adapters else None
        self.merged: dict[str, Any] = {}
        if mode == "loop" and self.pager is not None:
            self.merged = {n: merge(attach(base, ad)) for n, ad in self.pager.store.items()}
        self.lock = threading.Condition()
        self.pending: collections.deque[Request] = collections.deque()
        self.cache = model.init_cache(max_batch)
        self.free_rows = list(range(max_batch - 1, -1, -1))  # popped lowest first: busy rows stay in a prefix
        self.traces: collections.Counter[str] = collections.Counter()
        self.steps = 0
        # Counters for load tests (GET /health shows them): calls, rows computed (padding included) and rows used,
        # prompt tokens computed, seconds in steps (host work included).
        keys = ("decode_calls", "decode_rows", "decode_rows_used", "prefill_calls", "prefill_rows",
                "prefill_rows_used", "prefill_tokens", "call_s", "step_s")  # fmt: skip
        self.stats: dict[str, float] = dict.fromkeys(keys, 0)  # fixed keys: readable from other threads
        self.active: list[Request] = []
        run = factored(model.apply)

        def with_bank(bank: Any, ids: jax.Array) -> Callable[..., Any]:
            if self.mode == "base":  # ids are all -1: the base model's own forward, no LoRA
                return lambda *a: model.apply(bank, *a)
            return lambda *a: run(select(bank, ids, form=form), *a)

        def decode(fwd: Any, cache: Any, tokens: jax.Array, pos: jax.Array, sample: Any) -> Any:
            logits, cache = fwd(tokens[:, None], pos, cache)  # pos == seq_len: a row not decoding; write dropped
            return pick(logits[:, 0], *sample), cache

        def prefill(fwd: Any, cache: Any, rows: jax.Array, windows: jax.Array, last: jax.Array, sample: Any) -> Any:
            b = windows.shape[0]  # a whole window into a fresh cache, scattered into the rows (max_batch: dropped)
            logits, sub = fwd(windows, jnp.zeros(b, jnp.int32), model.init_cache(b))
            cache = jax.tree.map(lambda c, s: c.at[rows].set(s, mode="drop"), cache, sub)
            return pick(logits[jnp.arange(b), last], *sample), cache

        def bank_decode(bank: Any, ids: Any, cache: Any, rows: Any, tokens: Any, pos: Any, sample: Any) -> Any:
            self.traces["decode"] += 1  # the first len(tokens) rows (rows are handed out lowest first)
            n = tokens.shape[0]
            sub = jax.tree.map(lambda c: c[:n], cache)
            nxt, sub = decode(with_bank(bank, ids), sub, tokens, pos, sample)
            return nxt, jax.tree.map(lambda c, s: c.at[:n].set(s), cache, sub)

        def bank_prefill(bank: Any, ids: Any, cache: Any, rows: Any, windows: Any, last: Any, sample: Any) -> Any:
            self.traces["prefill"] += 1
            return prefill(with_bank(bank, ids), cache, rows, windows, last, sample)

        def loop_decode(params: Any, ids: Any, cache: Any, rows: Any, tokens: Any, pos: Any, sample: Any) -> Any:
            sub = jax.tree.map(lambda c: c.at[rows].get(mode="clip"), cache)  # only this adapter's rows
            nxt, sub = decode(lambda *a: model.apply(params, *a), sub, tokens, pos, sample)
            return nxt, jax.tree.map(lambda c, s: c.at[rows].set(s, mode="drop"), cache, sub)

        def loop_prefill(params: Any, ids: Any, cache: Any, rows: Any, windows: Any, last: Any, sample: Any) -> Any:
            return prefill(lambda *a: model.apply(params, *a), cache, rows, windows, last, sample)

        # The cache is donated: each step updates it in place instead of copying max_batch rows.
        self._decode = jax.jit(loop_decode if self.mode == "loop" else bank_decode, donate_argnums=2)
        self._prefill = jax.jit(loop_prefill if self.mode == "loop" else bank_prefill, donate_argnums=2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lorajax-engine", daemon=True)

    # ------------------------------------------------------------------------------------------- adapters
    def names(self) -> list[str]:
        """The registered adapters' names."""
        with self.lock:
            return [] if self.pager is None else list(self.pager.store)

    def check(self, name: str, adapter: Any) -> Adapter:
        """``adapter`` checked against the slots (ValueError naming every problem); thread-safe, changes nothing."""
        if self.pager is None:
            raise ValueError("this engine serves the base model only: it has no adapter slots")
        return self.pager.check(name, adapter)

    def register(self, name: str, adapter: Any) -> None:
        """Add an adapter (checked first); requests may name it at once. ValueError if the name is taken."""
        ad = self.check(name, adapter)
        merged = merge(attach(self.base, ad)) if self.mode == "loop" else None
        with self.lock:
            assert self.pager is not None
            if name in self.pager.store:
                raise ValueError(f"an adapter named {name!r} is already loaded; unload it first")
            self.pager.register(name, ad)
            if merged is not None:
                self.merged[name] = merged

    def unregister(self, name: str) -> None:
        """Remove an adapter: queued requests for it fail, running ones finish. KeyError if unknown."""
        with self.lock:
            if self.pager is None or name not in self.pager.store:
                raise KeyError(name)
            self.pager.unregister(name)
            for r in [r for r in self.pending if r.adapter == name]:
                self.pending.remove(r)
                r.emit("", "error: the adapter was unloaded")

    # ------------------------------------------------------------------------------------------- requests
    def submit(self, req: Request) -> None:
        """Queue a request (validated by the caller); tokens come back through ``req.emit``."""
        req.text = TextStream(self.model.decode, req.stop)
        with self.lock:
            self.pending.append(req)
            self.lock.notify()

    def cancel(self, req: Request) -> None:
        """Stop a request (a client went away): its row and slot are freed before the next step."""
        with self.lock:
            req.cancelled = True
            if req in self.pending:
                self.pending.remove(req)
            self.lock.notify()

    def warmup(self) -> float:
        """Compile every step shape the engine will run (prefills of 1, 2, 4, ... prompts for each of
        :attr:`lengths`, decode steps of 1, 2, 4, ... rows) on dropped rows, so no request waits for a compile.
        Returns seconds.
        """
        t0 = time.perf_counter()
        params = self.pager.slots.bank if self.mode == "bank" else self.base  # type: ignore[union-attr]
        drop = lambda n: np.full(n, self.max_batch, np.int32)  # row max_batch: every write is dropped
        sizes = lambda cap: sorted({_pad_to(n, cap) for n in range(1, cap + 1)})
        ids = lambda n: np.full(n, -1, np.int32)
        for n in sizes(self.prefill_chunk):
            for length in self.lengths:
                windows, last = np.zeros((n, length), np.int32), np.zeros(n, np.int32)
                out, self.cache = self._prefill(
                    params, ids(n), self.cache, drop(n), windows, last, self._sample([None] * n)
                )
        for n in sizes(self.max_batch):
            tokens, pos = np.zeros(n, np.int32), np.full(n, self.seq_len, np.int32)
            out, self.cache = self._decode(params, ids(n), self.cache, drop(n), tokens, pos, self._sample([None] * n))
        jax.block_until_ready(out)
        return time.perf_counter() - t0

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        with self.lock:
            self.lock.notify()
        if self._thread.is_alive():
            self._thread.join()

    # ------------------------------------------------------------------------------------------- batcher
    def _admit(self) -> None:
        """Move pending requests into free rows; a request whose adapter has no slot now waits for one."""
        with self.lock:
            for r in list(self.pending):
                if not self.free_rows:
                    break
                if r.adapter is not None and (self.pager is None or r.adapter not in self.pager.store):
                    self.pending.remove(r)  # unloaded between the request's check and now
                    r.emit("", "error: the adapter was unloaded")
                    continue
                if r.adapter is not None and self.mode == "bank":
                    assert self.pager is not None
                    slot = self.pager.acquire(r.adapter)
                    if slot is None:
                        continue
                    r.slot = slot
                self.pending.remove(r)
                r.row = self.free_rows.pop()
                self.active.append(r)
            if not self.active and not self._stop.is_set():
                self.lock.wait(0.05)

    def _retire(self, r: Request) -> None:
        with self.lock:
            self.free_rows.append(r.row)
            self.free_rows.sort(reverse=True)
            if r.adapter is not None and self.mode == "bank" and self.pager is not None:
                self.pager.release(r.adapter)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._admit()
            for r in [r for r in self.active if r.cancelled]:
                self._retire(r)
            self.active = [r for r in self.active if not r.cancelled]
            if not self.active:
                continue
            t0 = time.perf_counter()
            try:
                advanced = self._advance(self.active)
            except Exception as e:  # a failed step fails its requests, never the server
                for r in self.active:
                    self._retire(r)
                    r.emit("", f"error: {type(e).__name__}: {e}")
                self.active = []
                self.cache = self.model.init_cache(self.max_batch)  # a failed call may have consumed it
                continue
            for r in list(advanced):  # advanced may be self.active itself, which this loop shrinks
                assert r.text is not None
                delta, stopped = r.text.feed(r.out[-1])
                if stopped or len(r.out) >= r.max_tokens or r.cancelled:
                    r.finish = "stop" if stopped else "length"
                    self._retire(r)
                    self.active.remove(r)
                    r.emit(delta + r.text.flush(), r.finish)
                elif delta:
                    r.emit(delta, None)
            self.stats["step_s"] += time.perf_counter() - t0

    def _count(self, **counts: float) -> None:
        for k, v in counts.items():
            self.stats[k] += v

    def _sample(self, members: Sequence[Request | None]) -> tuple[np.ndarray, ...]:
        n = len(members)
        temps, seeds, counts = np.zeros(n, np.float32), np.zeros(n, np.uint32), np.zeros(n, np.int32)
        for k, r in enumerate(members):
            if r is not None:
                temps[k], seeds[k], counts[k] = r.temperature, r.seed, len(r.out)
        return temps, seeds, counts

    def _advance(self, active: list[Request]) -> list[Request]:
        """One token for every active request (bank), or for those of the oldest request's adapter (loop).

        Rows whose cache holds all but their last token decode one token; new requests, and sequences longer
        than the window (whose positions all shifted), run a prefill of their window instead.
        """
        rows = [r for r in active if r.adapter == active[0].adapter] if self.mode == "loop" else active
        prefill = [r for r in rows if not r.out or r.length > self.seq_len]
        decode = [r for r in rows if r.out and r.length <= self.seq_len]
        with self.lock:
            if self.mode != "loop":
                params = self.base if self.pager is None else self.pager.slots.bank
            else:
                params = self.merged.get(rows[0].adapter, self.base)  # type: ignore[arg-type]
        nxt: dict[int, int] = {}
        if decode:
            if self.mode != "loop":  # the prefix of rows up to the last busy one, padded to a power of two
                n = _pad_to(max(r.row for r in decode) + 1, self.max_batch)
                members: list[Request | None] = [None] * n
                for r in decode:
                    members[r.row] = r
            else:
                n = _pad_to(len(decode), self.max_batch)
                members = [*decode, *[None] * (n - len(decode))]
            tokens, ids = np.zeros(n, np.int32), np.full(n, -1, np.int32)
            pos, rows_at = np.full(n, self.seq_len, np.int32), np.full(n, self.max_batch, np.int32)
            for k, m in enumerate(members):
                if m is not None:
                    tokens[k], pos[k], ids[k], rows_at[k] = m.out[-1], m.length - 1, m.slot, m.row
            t0 = time.perf_counter()
            out, self.cache = self._decode(params, ids, self.cache, rows_at, tokens, pos, self._sample(members))
            out = np.asarray(out)  # the step's one device-to-host transfer
            self.stats["call_s"] += time.perf_counter() - t0
            nxt.update({m.row: int(out[k]) for k, m in enumerate(members) if m is not None})
            self._count(decode_calls=1, decode_rows=n, decode_rows_used=len(decode))
        prefill.sort(key=lambda r: r.length)  # prompts of like length share a chunk and its padding
        for at in range(0, len(prefill), self.prefill_chunk):
            chunk = prefill[at : at + self.prefill_chunk]
            n = _pad_to(len(chunk), self.prefill_chunk)
            length = next(t for t in self.lengths if t >= min(chunk[-1].length, self.seq_len))
            windows, last = np.zeros((n, length), np.int32), np.zeros(n, np.int32)
            ids, rows_at = np.full(n, -1, np.int32), np.full(n, self.max_batch, np.int32)
            for k, r in enumerate(chunk):
                w, last[k] = window(r.tokens + r.out, self.seq_len)
                windows[k] = w[:length]  # a window is right-padded: its tokens fit in the bucket
                ids[k], rows_at[k] = r.slot, r.row
            members = [*chunk, *[None] * (n - len(chunk))]
            t0 = time.perf_counter()
            out, self.cache = self._prefill(params, ids, self.cache, rows_at, windows, last, self._sample(members))
            out = np.asarray(out)
            self.stats["call_s"] += time.perf_counter() - t0
            nxt.update({r.row: int(out[k]) for k, r in enumerate(chunk)})
            self._count(prefill_calls=1, prefill_rows=n, prefill_rows_used=len(chunk), prefill_tokens=n * length)
        self.steps += 1
        for r in rows:
            r.out.append(nxt[r.row])
        return rows
