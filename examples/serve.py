"""A small multi-adapter text server: one frozen base, many LoRA adapters, mixed in every decode step.

Run (loopback only):  python examples/serve.py --port 8000
    curl -s localhost:8000/generate -d '{"adapter": "demo3", "prompt": "def read(", "max_tokens": 32}'
    curl -s localhost:8000/adapters -d '{"name": "mine", "path": "mine.safetensors"}'  # docs/guide/serving.md writes it
    curl -s localhost:8000/adapters                                                   # what is loaded

The base is the demo's byte-level GPT (``assets/base_prose.safetensors``, see ``textlm.py``). Adapters come
from ``--adapter NAME=FILE`` (files written by ``lorajax.save_adapter`` for this base) or, without any,
``--demo-adapters`` random ones (stand-ins for trained adapters, so the server runs in one command). They
live in ``lorajax.adapter_slots`` of fixed capacity: ``POST /adapters`` puts a file into a free slot and
the jitted decode step never recompiles.

A micro-batcher thread runs greedy decoding for up to ``--max-batch`` requests at once, with a KV cache
(``textlm.CachedGPT``): requests join and leave between steps (continuous batching), and each joins by taking a
free row of a fixed-capacity cache ``(max_batch, n_layers, seq_len, n_heads, head_dim)`` for keys and values.
A joining request is *prefilled* (its prompt, one ``seq_len`` window, in one call that writes its row and gives
its first token); every later token is one *decode step*: ONE jitted call over all ``max_batch`` cache rows
that feeds each row its last token, writes that token's keys/values into the row and attends over the row.
Each row's adapter is given by its slot id (``lorajax.select(bank, ids)`` + ``lorajax.factored``), so the
keys and values written to the cache carry each row's own adapter. Shapes never change, so the decode step
compiles once; prefills run in chunks of at most ``--prefill-chunk`` prompts, padded to a power of two rows (a
few compiled shapes).

The base model has learned absolute positions and a ``seq_len`` (128) window. Past it, ``textlm.make_generate``
slides the window (the last 128 bytes at positions 0..127), so every cached key is at the wrong position: a
request whose sequence has outgrown the window is recomputed in full (a prefill of its last 128 bytes) at
every step instead. Outputs are therefore those of no-cache greedy decoding with the window, for any length
(logits equal to float32 rounding); the cache pays for the first 128 bytes of each sequence.

Bad requests (malformed JSON, unknown adapter, oversized prompt, bad max_tokens) get a 4xx with a message and
never reach the batcher. ``--mode loop`` serves one adapter at a time instead (each step runs only the
requests of one adapter, with that adapter's merged weights, on the same cache): the baseline for
``serve_load.py``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import queue
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import textlm  # examples/textlm.py

import lorajax


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 256  # the listen backlog: a burst of concurrent clients must not be refused
    daemon_threads = True


class BadRequest(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class Request:
    slot: int  # slot id (-1: the base model)
    adapter: str | None
    tokens: list[int]
    max_tokens: int
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    out: list[int] = dataclasses.field(default_factory=list)
    error: str | None = None
    row: int = -1  # its KV-cache row while it is active

    @property
    def length(self) -> int:
        return len(self.tokens) + len(self.out)


def demo_adapters(base: Any, count: int, rank: int = 16) -> dict[str, Any]:
    """``count`` stand-in adapters on all linear layers (ranks ``rank`` / ``rank // 2``), with random B."""
    out = {}
    for k in range(count):
        r = rank if k % 2 == 0 else rank // 2
        lp = lorajax.lorafy(base, rank=r, where=lorajax.all_linear, key=jax.random.key(100 + k), alpha=2.0 * r)
        rng = np.random.default_rng(k)
        out[f"demo{k}"] = jax.tree.map(
            lambda x: (
                dataclasses.replace(x, b=jnp.asarray(0.05 * rng.normal(size=x.b.shape), x.b.dtype))
                if lorajax.is_lora(x)
                else x
            ),
            lp,
            is_leaf=lorajax.is_lora,
        )
    return out


def window(tokens: list[int], seq_len: int) -> tuple[np.ndarray, int]:
    """The last ``seq_len`` tokens (right-padded while shorter) and the position whose logits predict the next."""
    start = max(len(tokens) - seq_len, 0)
    w = np.zeros(seq_len, np.int32)
    piece = tokens[start:]
    w[: len(piece)] = piece
    return w, len(tokens) - 1 - start


def greedy(apply: Any, params: Any, tokens: list[int], n: int, seq_len: int) -> list[int]:
    """Reference greedy decoding of one sequence with ``apply(params, windows, last) -> next tokens``."""
    toks = list(tokens)
    for _ in range(n):
        w, last = window(toks, seq_len)
        toks.append(int(apply(params, w[None], np.asarray([last], np.int32))[0]))
    return toks[len(tokens) :]


def make_apply(model: Any) -> Any:
    """Jitted ``(params, windows, last) -> greedy next tokens`` for plain or merged params."""

    @jax.jit
    def apply(params: Any, windows: jax.Array, last: jax.Array) -> jax.Array:
        logits = model.apply(params, windows)
        return jnp.argmax(logits[jnp.arange(windows.shape[0]), last], axis=-1)

    return apply


def pad_to(n: int, cap: int) -> int:
    """Rows to run for ``n`` requests: the next power of two, at most ``cap`` (a few compiled shapes)."""
    return min(cap, 1 << (n - 1).bit_length())


class Server:
    """The model state, the KV cache, the micro-batcher thread and the HTTP front end."""

    def __init__(
        self,
        base: Any,
        config: Any,
        adapters: dict[str, Any],
        *,
        slots: int,
        rank: int,
        max_batch: int,
        max_prompt: int,
        max_tokens: int,
        form: str = "auto",
        mode: str = "bank",
        prefill_chunk: int = 16,
    ):
        self.model = textlm.TinyGPT(config)
        self.seq_len = config.seq_len
        self.base = base
        self.max_batch, self.max_prompt, self.max_tokens, self.mode = max_batch, max_prompt, max_tokens, mode
        self.prefill_chunk = min(prefill_chunk, max_batch)
        self.slots = lorajax.adapter_slots(adapters, slots, rank=rank, base=base)
        self.merged = {name: lorajax.merge(p) for name, p in adapters.items()} if mode == "loop" else {}
        self.lock = threading.Lock()  # guards self.slots / self.merged (POST /adapters vs the batcher)
        self.queue: queue.Queue[Request] = queue.Queue()
        self.apply = make_apply(self.model)  # the no-cache reference (tests, greedy)

        # The cache and the free rows belong to the batcher thread alone.
        self.cache = textlm.init_cache(config, max_batch)
        self.free_rows = list(range(max_batch))
        self.traces: collections.Counter[str] = collections.Counter()  # traces per jitted step (counted while tracing)

        cached = textlm.CachedGPT(config)
        run = lorajax.factored(cached.apply)

        def forward(bank: Any, ids: jax.Array, tokens: jax.Array, start: jax.Array, cache: Any) -> Any:
            """Mixed adapters over the cache: row n runs slot ``ids[n]``; the K/V it writes include that adapter."""
            return run(lorajax.select(bank, ids, form=form), tokens, start, cache)

        self.forward = forward  # (bank, ids, tokens, start, cache) -> (logits, cache); tests compare its logits

        def decode(fwd: Any, cache: Any, tokens: jax.Array, pos: jax.Array) -> Any:
            # One token per row at position pos (pos == seq_len: a row not decoding now; its write is dropped).
            logits, cache = fwd(tokens[:, None], pos, cache)
            return jnp.argmax(logits[:, 0], axis=-1), cache

        def prefill(fwd: Any, cache: Any, rows: jax.Array, windows: jax.Array, last: jax.Array) -> Any:
            # A whole window from position 0 into a fresh cache, then scattered into the rows (index max_batch: a
            # padding row, dropped). A prefill writes every position before reading it: old K/V never matter.
            b = windows.shape[0]
            logits, sub = fwd(windows, jnp.zeros(b, jnp.int32), textlm.init_cache(config, b))
            cache = jax.tree.map(lambda c, s: c.at[rows].set(s, mode="drop"), cache, sub)
            return jnp.argmax(logits[jnp.arange(b), last], axis=-1), cache

        def bank_decode(bank: Any, ids: jax.Array, cache: Any, tokens: jax.Array, pos: jax.Array) -> Any:
            self.traces["decode"] += 1
            return decode(lambda *a: forward(bank, ids, *a), cache, tokens, pos)

        def bank_prefill(bank: Any, ids: jax.Array, cache: Any, rows: jax.Array, windows: jax.Array, last: Any) -> Any:
            self.traces["prefill"] += 1
            return prefill(lambda *a: forward(bank, ids, *a), cache, rows, windows, last)

        def loop_decode(params: Any, cache: Any, rows: jax.Array, tokens: jax.Array, pos: jax.Array) -> Any:
            # Only this adapter's rows (padded to a power of two): gather them, decode, put them back.
            sub = jax.tree.map(lambda c: c.at[rows].get(mode="clip"), cache)
            nxt, sub = decode(lambda *a: cached.apply(params, *a), sub, tokens, pos)
            return nxt, jax.tree.map(lambda c, s: c.at[rows].set(s, mode="drop"), cache, sub)

        def loop_prefill(params: Any, cache: Any, rows: jax.Array, windows: jax.Array, last: jax.Array) -> Any:
            return prefill(lambda *a: cached.apply(params, *a), cache, rows, windows, last)

        # The cache is donated: each step updates it in place instead of copying max_batch rows.
        self.bank_decode = jax.jit(bank_decode, donate_argnums=2)
        self.bank_prefill = jax.jit(bank_prefill, donate_argnums=2)
        self.loop_decode = jax.jit(loop_decode, donate_argnums=1)
        self.loop_prefill = jax.jit(loop_prefill, donate_argnums=1)
        self.steps = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._batcher, daemon=True)

    # ------------------------------------------------------------------------------------------------ requests
    def submit(self, body: bytes) -> Request:
        """Validate one /generate body and queue it (BadRequest on anything wrong; nothing is queued then)."""
        try:
            msg = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"malformed JSON: {e}") from None
        if not isinstance(msg, dict):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        adapter, prompt, n = msg.get("adapter"), msg.get("prompt"), msg.get("max_tokens", 32)
        if adapter is not None and not isinstance(adapter, str):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "adapter must be a string or null")
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest(HTTPStatus.BAD_REQUEST, "prompt must be a non-empty string")
        tokens = textlm.encode(prompt).tolist()
        if len(tokens) > self.max_prompt:
            raise BadRequest(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"prompt is {len(tokens)} bytes; this server takes at most {self.max_prompt}",
            )
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= self.max_tokens:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"max_tokens must be an integer in 1..{self.max_tokens}")
        with self.lock:
            try:
                slot = int(self.slots.ids([adapter])[0])
            except ValueError as e:
                raise BadRequest(HTTPStatus.NOT_FOUND, str(e)) from None
        req = Request(slot, adapter, tokens, n)
        self.queue.put(req)
        return req

    def load(self, body: bytes) -> dict:
        """``POST /adapters {"name", "path"}``: read an adapter file into a free slot."""
        try:
            msg = json.loads(body)
            name, path = msg["name"], msg["path"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise BadRequest(HTTPStatus.BAD_REQUEST, 'give a JSON object {"name": ..., "path": ...}') from None
        if not isinstance(name, str) or not name or not isinstance(path, str):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "name and path must be strings")
        try:
            ad = lorajax.read_adapter(path)
        except (OSError, ValueError) as e:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"cannot read {path}: {e}") from None
        with self.lock:
            if name in self.slots.names:
                raise BadRequest(HTTPStatus.CONFLICT, f"an adapter {name!r} is already loaded")
            try:
                self.slots = self.slots.put(name, ad)
            except ValueError as e:
                status = HTTPStatus.CONFLICT if "slots are taken" in str(e) else HTTPStatus.BAD_REQUEST
                raise BadRequest(status, str(e)) from None
            if self.mode == "loop":
                self.merged[name] = lorajax.merge(lorajax.attach(self.base, ad))
        return {"loaded": name, "slots": list(self.slots.names)}

    # ------------------------------------------------------------------------------------------------ batcher
    def _batcher(self) -> None:
        active: list[Request] = []
        while not self.stop.is_set():
            while len(active) < self.max_batch:
                try:
                    r = self.queue.get(timeout=0.05) if not active else self.queue.get_nowait()
                except queue.Empty:
                    break
                r.row = self.free_rows.pop()  # max_batch rows, at most max_batch active: always one free
                active.append(r)
            if not active:
                continue
            try:
                self._advance(active)
            except Exception as e:  # a failed step fails its requests, never the server
                for r in active:
                    r.error = f"{type(e).__name__}: {e}"
                    r.done.set()
                # A failed call may have consumed the donated cache: start from an empty one (no request is left).
                self.cache = textlm.init_cache(self.model.config, self.max_batch)
                self.free_rows = list(range(self.max_batch))
                active = []
                continue
            for r in [r for r in active if len(r.out) >= r.max_tokens]:
                self.free_rows.append(r.row)
                r.done.set()
            active = [r for r in active if len(r.out) < r.max_tokens]

    def _advance(self, active: list[Request]) -> None:
        """One token for every active request (bank mode), or for those of the oldest request's adapter (loop).

        Rows whose cache holds every token but the last decode one token; new requests, and sequences longer
        than the window (whose positions all shifted), run a prefill of their window instead.
        """
        rows = active if self.mode == "bank" else [r for r in active if r.adapter == active[0].adapter]
        prefill = [r for r in rows if not r.out or r.length > self.seq_len]
        decode = [r for r in rows if r.out and r.length <= self.seq_len]
        with self.lock:
            bank, params = self.slots.bank, self.merged.get(rows[0].adapter, self.base)
        nxt: dict[int, int] = {}
        if decode:
            if self.mode == "bank":  # every cache row, every step: one shape, one compile
                n = self.max_batch
                members: list[Request | None] = [None] * n
                for r in decode:
                    members[r.row] = r
            else:
                n = pad_to(len(decode), self.max_batch)
                members = decode + [None] * (n - len(decode))
            tokens, ids = np.zeros(n, np.int32), np.full(n, -1, np.int32)
            pos = np.full(n, self.seq_len, np.int32)  # past the cache: write dropped, output ignored
            rows_at = np.full(n, self.max_batch, np.int32)
            for k, r in enumerate(members):
                if r is not None:
                    seq = r.tokens + r.out
                    tokens[k], pos[k], ids[k], rows_at[k] = seq[-1], len(seq) - 1, r.slot, r.row
            if self.mode == "bank":
                out, self.cache = self.bank_decode(bank, ids, self.cache, tokens, pos)
            else:
                out, self.cache = self.loop_decode(params, self.cache, rows_at, tokens, pos)
            out = np.asarray(out)
            nxt.update({r.row: int(out[k]) for k, r in enumerate(members) if r is not None})
        # Prefills in chunks: on a CPU a call over many windows costs more per window (64 windows of 128 tokens took
        # 6.0 ms per window in one call, 2.9 ms in calls of 16), its activations no longer fitting in cache.
        for at in range(0, len(prefill), self.prefill_chunk):
            chunk = prefill[at : at + self.prefill_chunk]
            n = pad_to(len(chunk), self.prefill_chunk)
            windows = np.zeros((n, self.seq_len), np.int32)
            last, ids, rows_at = np.zeros(n, np.int32), np.full(n, -1, np.int32), np.full(n, self.max_batch, np.int32)
            for k, r in enumerate(chunk):
                windows[k], last[k] = window(r.tokens + r.out, self.seq_len)
                ids[k], rows_at[k] = r.slot, r.row
            if self.mode == "bank":
                out, self.cache = self.bank_prefill(bank, ids, self.cache, rows_at, windows, last)
            else:
                out, self.cache = self.loop_prefill(params, self.cache, rows_at, windows, last)
            out = np.asarray(out)
            nxt.update({r.row: int(out[k]) for k, r in enumerate(chunk)})
        self.steps += 1
        for r in rows:
            r.out.append(nxt[r.row])

    # ------------------------------------------------------------------------------------------------ http
    def handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/adapters":
                    with server.lock:
                        self._send(200, {"slots": list(server.slots.names)})
                else:
                    self._send(404, {"error": f"no such endpoint: GET {self.path}"})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    if self.path == "/generate":
                        t0 = time.perf_counter()
                        req = server.submit(body)
                        req.done.wait()
                        if req.error:
                            self._send(500, {"error": req.error})
                            return
                        text = textlm.decode(req.out)
                        seconds = time.perf_counter() - t0
                        self._send(200, {"adapter": req.adapter, "text": text, "tokens": req.out, "seconds": seconds})
                    elif self.path == "/adapters":
                        self._send(200, server.load(body))
                    else:
                        self._send(404, {"error": f"no such endpoint: POST {self.path}"})
                except BadRequest as e:
                    self._send(int(e.status), {"error": str(e)})

            def log_message(self, format: str, *args: Any) -> None:  # quiet: one line per request is noise
                pass

        return Handler

    def serve(self, port: int) -> ThreadingHTTPServer:
        """Start the batcher and an HTTP server on 127.0.0.1:``port`` (0: a free port) in background threads."""
        self.thread.start()
        httpd = _HTTPServer(("127.0.0.1", port), self.handler())
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        return httpd

    def close(self, httpd: ThreadingHTTPServer) -> None:
        httpd.shutdown()
        httpd.server_close()
        self.stop.set()
        self.thread.join()


def build(argv: list[str] | None = None) -> tuple[Server, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=FILE", help="an adapter file to serve")
    ap.add_argument("--demo-adapters", type=int, default=8, help="random stand-in adapters when no --adapter")
    ap.add_argument("--slots", type=int, default=12, help="slot capacity (room for POST /adapters)")
    ap.add_argument("--rank", type=int, default=16, help="slot rank (larger adapters are refused)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-prompt", type=int, default=256, help="longest prompt in bytes")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--form", default="auto", choices=["auto", "gather", "onehot", "ragged"])
    ap.add_argument("--mode", default="bank", choices=["bank", "loop"])
    ap.add_argument("--prefill-chunk", type=int, default=16, help="at most this many prompts per prefill call")
    args = ap.parse_args(argv)
    base, config = textlm.load_params(textlm.BASE_CHECKPOINT)
    if args.adapter:
        adapters = {}
        for spec in args.adapter:
            name, _, path = spec.partition("=")
            adapters[name] = lorajax.load_adapter(path, base)
    else:
        adapters = demo_adapters(base, args.demo_adapters, args.rank)
    server = Server(
        base,
        config,
        adapters,
        slots=max(args.slots, len(adapters)),
        rank=args.rank,
        max_batch=args.max_batch,
        max_prompt=args.max_prompt,
        max_tokens=args.max_tokens,
        form=args.form,
        mode=args.mode,
        prefill_chunk=args.prefill_chunk,
    )
    return server, args


def main(argv: list[str] | None = None) -> None:
    server, args = build(argv)
    httpd = server.serve(args.port)
    host, port = httpd.server_address[:2]
    print(f"serving {[n for n in server.slots.names if n]} on http://{host}:{port} ({args.mode} mode)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.close(httpd)


if __name__ == "__main__":
    main()
