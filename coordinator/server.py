"""Run the coordinator: bind a socket (port 0 lets the OS choose), serve with uvicorn, and
announce the URL only once the server accepts connections. TLS when given a certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from coordinator.config import CoordinatorConfig
from coordinator.http import create_app

#: How long an idle keep-alive connection stays open (uvicorn's default is 5 s).
KEEP_ALIVE_SECONDS = 30
#: Beyond the keep-alive time, how long a connection may take to send a request's headers
#: (when `body_timeout` is 0).
REQUEST_START_SECONDS = 15.0


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


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with one more timer: a connection must start a request
    (its headers complete) within `start_limit` seconds of opening or of its last
    response, or it is closed. uvicorn's keep-alive timer closes idle connections, but
    any byte received cancels it, so a client trickling header bytes, or the rest of a
    body the coordinator already answered, would hold its connection for ever. (Bodies
    being read by a request have their own deadline: `limits.RequestLimits`.)"""

    #: Set per server by `serve` (a subclass with the configured value).
    start_limit: float = 45.0
    _guard: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        coalescing = _CoalescingTransport(transport, asyncio.get_running_loop())
        super().connection_made(coalescing)  # type: ignore[arg-type]
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:  # a request started
            self._disarm()

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
            if self.conn.our_state not in (h11.ERROR, h11.CLOSED):
                with contextlib.suppress(h11.LocalProtocolError):
                    self.conn.send(h11.ConnectionClosed())
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
        "FarmH11Protocol",
        (GuardedH11Protocol,),
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
