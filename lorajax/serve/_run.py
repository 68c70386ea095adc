"""Running the app on uvicorn: a bound socket first, read timeouts and a bound on connections."""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from lorajax.serve._protocol import ApiError


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol, plus: a connection must send its request head within ``header_timeout`` seconds
    (uvicorn only times out idle keep-alive connections), and malformed HTTP gets OpenAI's JSON error shape."""

    header_timeout = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._guard = self.loop.call_later(self.header_timeout, self._drop_if_silent)

    def _drop_if_silent(self) -> None:
        if self.cycle is None and not self.transport.is_closing():  # no request head yet: a stalled client
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        body = ApiError(400, f"malformed HTTP request: {msg}").body()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                   (b"connection", b"close")]  # fmt: skip
        try:
            self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
            self.transport.write(self.conn.send(h11.Data(data=body)) or b"")
            self.transport.write(self.conn.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError:
            pass
        self.transport.close()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0: a free port). OSError with a readable message when taken.

    >>> s = bind("127.0.0.1", 0); s.getsockname()[1] > 0
    True
    >>> s.close()
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
        raise OSError(e.errno, f"port {port} on {host} {why}; pick another with --port") from None
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def config(app: Any, *, keep_alive: float = 5.0, header_timeout: float = 10.0, max_connections: int = 1024,
           log_level: str = "warning") -> uvicorn.Config:  # fmt: skip
    """uvicorn settings: h11 with a header timeout, ``timeout_keep_alive``, ``limit_concurrency`` (503 above)."""
    protocol = type("Guarded", (GuardedH11,), {"header_timeout": header_timeout})
    return uvicorn.Config(
        app,
        http=protocol,
        timeout_keep_alive=int(max(1, keep_alive)),
        limit_concurrency=max_connections,
        h11_max_incomplete_event_size=16 * 1024,  # request line + headers
        log_level=log_level,
        access_log=False,
        lifespan="on",
    )


def serve(app: Any, sock: socket.socket, **settings: Any) -> None:
    """Serve ``app`` on a socket from :func:`bind` until interrupted (Ctrl-C: a clean shutdown)."""
    uvicorn.Server(config(app, **settings)).run(sockets=[sock])


class Background:
    """The server in a background thread (tests, benchmarks): ``with Background(app) as port: ...``."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, **settings: Any):
        self.sock = bind(host, port)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(config(app, **settings))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> int:
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            threading.Event().wait(0.02)
        return self.port

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
