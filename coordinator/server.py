"""Run the coordinator: bind a socket (port 0 lets the OS choose), serve with uvicorn, and
announce the URL only once the server accepts connections. TLS when given a certificate.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from common.errors import TesseraError
from coordinator.config import CoordinatorConfig
from coordinator.http import create_app

#: How long an idle keep-alive connection stays open (uvicorn's default is 5 s).
KEEP_ALIVE_SECONDS = 30
#: Beyond the keep-alive time, how long a connection may take to send a request's headers
#: (when `body_timeout` is 0).
REQUEST_START_SECONDS = 15.0
#: The most bytes a request's line and headers may take (h11's default limit).
MAX_HEAD_BYTES = 16 * 1024
_HEAD_TOO_LARGE_TEXT = f"Request line and headers must fit in {MAX_HEAD_BYTES} bytes.".encode()
_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s"
    % (len(_HEAD_TOO_LARGE_TEXT), _HEAD_TOO_LARGE_TEXT)
)


class _CoalescingTransport:
    """A transport that holds one write back until the next write or the end of this
    turn of the event loop, so that a response's head and body (which uvicorn writes
    separately) go out in one `send`: on loopback each send cost about 0.2 ms of kernel
    time per request, more than half of a small request's HTTP cost (docs/load-test.md).
    At most one write is held (the next one goes out at once, joined to it), so a long
    streamed response is never buffered here. Everything else is the real transport's."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._held is None:
            self._held = bytes(data)
            self._loop.call_soon(self._flush)
            return
        held, self._held = self._held, None
        self._transport.write(held + bytes(data))

    def _flush(self) -> None:
        held, self._held = self._held, None
        if held and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _HeadTooLargeError(TesseraError):
    """A request's line and headers exceed `GuardedHttpProtocol.max_head_bytes` (internal:
    never leaves the protocol, which answers 431)."""


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol on the `httptools` parser (C, about 0.5 ms less per
    request than the pure-Python h11 one), with two guards and the coalescing writes
    above.

    - A connection must start a request (its headers complete) within `start_limit`
      seconds of opening or of its last response, or it is closed. uvicorn's keep-alive
      timer closes idle connections, but any byte received cancels it, so a client
      trickling header bytes, or the rest of a body the coordinator already answered,
      would hold its connection for ever. (Bodies being read by a request have their own
      deadline: `limits.RequestLimits`.)
    - A request's line and headers may take at most `max_head_bytes` (h11's limit, which
      uvicorn's h11 protocol applied): httptools itself has none, and would gather an
      endless header in memory. A longer head is answered 431 and the connection closed.
    """

    #: Set per server by `serve` (a subclass with the configured value).
    start_limit: float = 45.0
    max_head_bytes: int = MAX_HEAD_BYTES
    _guard: asyncio.TimerHandle | None = None
    _in_head = False
    _head_bytes = 0
    _head_too_large = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        coalescing = _CoalescingTransport(transport, self.loop)
        super().connection_made(coalescing)  # type: ignore[arg-type]
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_head:  # the head is still incomplete after these bytes
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes and not self.transport.is_closing():
                self._refuse_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.max_head_bytes:
            # the parser turns this into an HttpParserError: uvicorn answers it with
            # `send_400_response`, which sends the 431 instead
            self._head_too_large = True
            raise _HeadTooLargeError(f"request head of {size} bytes")
        super().on_headers_complete()
        self._disarm()  # a request started

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            self._refuse_head()
        else:
            super().send_400_response(msg)

    def _refuse_head(self) -> None:
        self._in_head = False
        self.logger.warning("Request head over %d bytes refused.", self.max_head_bytes)
        self.transport.write(_HEAD_TOO_LARGE)
        self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._between_requests():
            self._arm()

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._guard = self.loop.call_later(self.start_limit, self._expired)

    def _disarm(self) -> None:
        if self._guard is not None:
            self._guard.cancel()
            self._guard = None

    def _expired(self) -> None:
        self._guard = None
        if not self.transport.is_closing() and self._between_requests():
            self.transport.close()


class _AnnouncingServer(uvicorn.Server):
    def __init__(
        self, config: uvicorn.Config, on_ready: Callable[[], None], on_exit: Callable[[], None]
    ) -> None:
        super().__init__(config)
        self._on_ready = on_ready
        self._on_exit = on_exit

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._on_ready()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn waits for open requests before shutting down: tell long polls and event
        # streams to end now rather than be cancelled mid-reply.
        self._on_exit()
        super().handle_exit(sig, frame)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this. Without it a keep-alive client (TesseraClient
    # reuses one session) waited ~40 ms per request: uvicorn writes a response's head and
    # body separately, and Nagle held the body until the client's delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    return sock


def serve(
    config: CoordinatorConfig,
    host: str = "127.0.0.1",
    port: int = 8400,
    *,
    on_ready: Callable[[str, str | None], None] | None = None,
    certfile: Path | None = None,
    keyfile: Path | None = None,
) -> None:
    """Serve until interrupted; `on_ready(url, new_admin_token_or_None)` once listening."""
    app = create_app(config)
    sock = bind(host, port)
    scheme = "https" if certfile else "http"
    shown_host = f"[{host}]" if ":" in host else host
    url = f"{scheme}://{shown_host}:{sock.getsockname()[1]}"

    def ready() -> None:
        (config.data_dir / "coordinator.url").write_text(url + "\n")
        if on_ready is not None:
            on_ready(url, app.state.services.admin_token)

    # Nodes talk every heartbeat_interval (5 s by default): with uvicorn's default of
    # 5 s, every heartbeat raced the server closing its idle connection (and paid for
    # a new one). Idle keep-alive connections cost a file descriptor each.
    keep_alive = max(KEEP_ALIVE_SECONDS, int(2 * config.heartbeat_interval) + 1)
    protocol = type(
        "FarmHttpProtocol",
        (GuardedHttpProtocol,),
        {"start_limit": keep_alive + (config.body_timeout or REQUEST_START_SECONDS)},
    )
    uv_config = uvicorn.Config(
        app,
        log_level="warning",
        http=protocol,
        timeout_keep_alive=keep_alive,
        timeout_graceful_shutdown=3,
        ssl_certfile=str(certfile) if certfile else None,
        ssl_keyfile=str(keyfile) if keyfile else None,
    )
    _AnnouncingServer(uv_config, ready, app.state.services.stopping.set).run(sockets=[sock])
