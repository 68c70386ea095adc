"""The HTTP front end: an OpenAI-compatible Starlette app over an :class:`Engine`."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from lorajax.adapters._format import read_adapter
from lorajax.serve._engine import Engine, Request
from lorajax.serve._protocol import ApiError, completion, parse_json, text_field

log = logging.getLogger("lorajax.serve")


def _json(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload, ensure_ascii=True), status, media_type="application/json")


def _error(e: ApiError) -> Response:
    return Response(e.body(), e.status, media_type="application/json")


async def _read_body(request: HttpRequest, limit: int, timeout: float) -> bytes:
    """The body, at most ``limit`` bytes (413 before reading when Content-Length says more), within ``timeout``."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError(413, f"the body is {length} bytes; this server takes at most {limit}")
    chunks, size = [], 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the body is over {limit} bytes; this server takes at most {limit}")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the body did not arrive within {timeout:g} s") from None
    except ClientDisconnect:
        raise ApiError(400, "the client went away before sending its whole body") from None
    return b"".join(chunks)


def load_adapter_file(engine: Engine, path: str, peft_name_map: Any = None) -> Any:
    """A lorajax adapter file, or a PEFT folder (``adapter_config.json``) read onto the engine's base."""
    p = Path(path)
    if not p.exists():
        raise ApiError(400, f"lora_path {path!r} does not exist", "lora_path")
    if p.is_dir():
        from lorajax.peft._load import load_peft

        return load_peft(p, engine.base, name_map=peft_name_map)
    return read_adapter(p)


def create_app(
    engine: Engine,
    *,
    base_name: str = "base",
    max_body: int = 1 << 20,
    body_timeout: float = 10.0,
    peft_name_map: Any = None,
) -> Starlette:
    """An OpenAI-compatible app: ``GET /v1/models``, ``POST /v1/completions``, vLLM's adapter (un)loading.

    Args:
        engine: the engine (started and closed with the app's lifespan).
        base_name: the ``model`` name of the base model without adapters.
        max_body: the largest request body in bytes (413 above it).
        body_timeout: seconds a client has to send its body (408 after).
        peft_name_map: ``name_map`` for :func:`lorajax.load_peft` when a PEFT folder is loaded.

    Returns:
        A Starlette application (serve it with :func:`lorajax.serve.serve` or any ASGI server).
    """
    created = int(time.time())
    inbox = _Inbox()

    async def body(request: HttpRequest) -> dict[str, Any]:
        return parse_json(await _read_body(request, max_body, body_timeout))

    async def models(request: HttpRequest) -> Response:
        card = lambda name, parent: {"id": name, "object": "model", "created": created, "owned_by": "lorajax",
                                     "root": name, "parent": parent}  # fmt: skip
        data = [card(base_name, None)] + [card(n, base_name) for n in engine.names()]
        return _json({"object": "list", "data": data})

    async def load(request: HttpRequest) -> Response:
        msg = await body(request)
        name, path = text_field(msg, "lora_name"), text_field(msg, "lora_path")
        if name == base_name or name in engine.names():
            raise ApiError(400, f"an adapter named {name!r} is already loaded; unload it first", "lora_name")
        try:
            ad = await asyncio.to_thread(load_adapter_file, engine, path, peft_name_map)
            await asyncio.to_thread(engine.register, name, ad)
        except (OSError, ValueError) as e:
            raise ApiError(400, f"cannot load {path!r} as {name!r}: {e}", "lora_path") from None
        log.info("loaded adapter %s from %s", name, path)
        return _json({"object": "lora_adapter", "lora_name": name, "status": "loaded"})

    async def unload(request: HttpRequest) -> Response:
        name = text_field(await body(request), "lora_name")
        try:
            engine.unregister(name)
        except KeyError:
            raise ApiError(404, f"no adapter named {name!r} is loaded", "lora_name", "lora_not_found") from None
        return _json({"object": "lora_adapter", "lora_name": name, "status": "unloaded"})

    async def completions(request: HttpRequest) -> Response:
        c = completion(await body(request), [base_name, *engine.names()], engine.model.encode, engine.max_model_len)
        events = asyncio.Queue[tuple[str, str | None]]()
        seed = c.seed if c.seed is not None else int.from_bytes(os.urandom(4), "little")
        req = Request(
            None if c.model == base_name else c.model, c.tokens, c.max_tokens,
            inbox.sender(asyncio.get_running_loop(), events),
            temperature=c.temperature, seed=seed % 2**32, stop=c.stop,
        )  # fmt: skip
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        usage = lambda: {"prompt_tokens": len(req.tokens), "completion_tokens": len(req.out),
                         "total_tokens": len(req.tokens) + len(req.out)}  # fmt: skip
        chunk = lambda text, finish: {"id": rid, "object": "text_completion", "created": now, "model": c.model,
                                      "choices": [{"index": 0, "text": text, "logprobs": None,
                                                   "finish_reason": finish}]}  # fmt: skip
        engine.submit(req)
        if c.stream:
            return StreamingResponse(stream(req, events, chunk, usage, c.include_usage), media_type="text/event-stream")
        gone = asyncio.ensure_future(disconnected(request))
        pieces, finish = [], None
        try:
            while finish is None:
                get = asyncio.ensure_future(events.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    return Response(status_code=499)  # the client is gone: nobody reads this
                text, finish = get.result()
                pieces.append(text)
        finally:
            gone.cancel()
            if finish is None:
                engine.cancel(req)
        if finish.startswith("error"):
            raise ApiError(404 if "unloaded" in finish else 500, f"the request failed: {finish}")
        return _json({**chunk("".join(pieces), finish), "usage": usage()})

    async def stream(req: Request, events: asyncio.Queue, chunk: Any, usage: Any, include: bool) -> AsyncIterator[str]:
        finish = None
        try:
            while finish is None:
                text, finish = await events.get()
                while finish is None and not events.empty():  # tokens that came meanwhile: one chunk, not many
                    more, finish = events.get_nowait()
                    text += more
                if finish is not None and finish.startswith("error"):
                    yield f"data: {ApiError(500, f'the request failed: {finish}').body().decode()}\n\n"
                    break
                if text or finish:
                    yield f"data: {json.dumps(chunk(text, finish))}\n\n"
            if include and finish is not None:
                yield f"data: {json.dumps({**chunk('', None), 'choices': [], 'usage': usage()})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if finish is None:  # the client went away (Starlette cancels this generator): free the row
                engine.cancel(req)

    async def disconnected(request: HttpRequest) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def health(request: HttpRequest) -> Response:  # the engine's counters: for load tests
        stats = {k: round(v, 6) for k, v in engine.stats.items()}
        return _json({"status": "ok", "engine": {"mode": engine.mode, "steps": engine.steps, **stats}})

    async def api_error(request: HttpRequest, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return _error(exc)

    async def http_error(request: HttpRequest, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        msg = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return _error(ApiError(exc.status_code, msg))

    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.close()

    routes = [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/load_lora_adapter", load, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ]
    handlers = {ApiError: api_error, HTTPException: http_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=_asynccontext(lifespan))


class _Inbox:
    """Hands the engine thread's events to the event loop in batches: one wake-up per engine step, not one per token.

    Each emit appends ``(queue, event)`` under a lock; only the first emit after a delivery schedules the next
    delivery (``call_soon_threadsafe`` writes to the loop's self-pipe, a system call and a GIL hand-off each).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waiting: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}

    def sender(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Any:
        def emit(text: str, finish: str | None) -> None:
            with self.lock:
                batch = self.waiting.setdefault(loop, [])
                batch.append((queue, (text, finish)))
                first = len(batch) == 1
            if first:
                loop.call_soon_threadsafe(self.deliver, loop)

        return emit

    def deliver(self, loop: asyncio.AbstractEventLoop) -> None:
        with self.lock:
            batch = self.waiting.pop(loop, [])
        for queue, event in batch:
            queue.put_nowait(event)


def _asynccontext(fn: Any) -> Any:
    import contextlib

    return contextlib.asynccontextmanager(fn)
