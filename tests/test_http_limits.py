"""Hostile clients at the HTTP level (issue 17): request bodies sent slowly or never, many
connections without a token, rate limits dodged by naming a new path each time. Each
against a real coordinator process on 127.0.0.1, with raw sockets where a well-behaved
HTTP client would not do what an attacker does.

Other client addresses are 127.0.0.2, 127.0.0.3...: Linux routes all of 127.0.0.0/8 to
the loopback interface, so a socket bound to one reaches the coordinator on 127.0.0.1
and is seen as coming from it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from coordinator.server import GuardedHttpProtocol, bind
from tests.test_security import call, caps, start_configured

API = "/api/v1"


def connect(url: str, source: str = "127.0.0.1") -> socket.socket:
    parts = urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.bind((source, 0))
    sock.connect((parts.hostname or "127.0.0.1", parts.port or 80))
    return sock


def send_head(
    sock: socket.socket,
    method: str,
    path: str,
    length: int,
    token: str | None = None,
    first: bytes = b"{",
) -> None:
    """A request's head announcing `length` body bytes, and only `first` of them."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (
        f"{method} {API}{path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
    sock.sendall(head.encode() + first)


def read_reply(sock: socket.socket, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one reply (Content-Length framed)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a reply: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def closed_by_server(sock: socket.socket, timeout: float = 5) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@contextmanager
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    try:
        yield opened
    finally:
        for sock in opened:
            sock.close()


def account(url: str, admin: str, name: str, role: str) -> str:
    reply = call(url, "POST", "/accounts", admin, json_body={"name": name, "role": role})
    assert reply.status_code == 201, reply.text
    return str(reply.json()["token"])


# --- bodies that never come ------------------------------------------------------------------


def test_a_body_that_does_not_arrive_gets_408_and_the_connection_is_closed(
    tmp_path: Path,
) -> None:
    """Issue 17.8: a POST announcing 1000 bytes and sending one got no reply after 70 s."""
    coordinator = start_configured(tmp_path / "c", body_timeout=2.0)
    try:
        url, admin = coordinator.url, coordinator.admin_token
        with sockets() as opened:
            for token in (admin, None, "made-up-token"):
                sock = connect(url)
                opened.append(sock)
                started = time.monotonic()
                send_head(sock, "POST", "/jobs", 1000, token)
                status, headers, body = read_reply(sock, timeout=20)
                took = time.monotonic() - started
                assert status == 408, body
                assert 1.5 < took < 10, took
                assert headers.get("connection") == "close"
                answer = json.loads(body)
                assert set(answer) == {"error", "detail", "hint"}
                assert "did not arrive in time" in answer["detail"]
                assert closed_by_server(sock), "the connection stayed open"
        assert call(url, "GET", "/me", admin).status_code == 200
    finally:
        coordinator.stop()


def _bundle(size: int) -> bytes:
    """A bundle the coordinator accepts, of about `size` bytes (stored, not deflated)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("scene.blend", b"BLENDER-v500" + os.urandom(size))
    return buffer.getvalue()


def _upload_slowly(url: str, token: str, data: bytes, rate: float) -> tuple[int, bytes]:
    """PUT a bundle at about `rate` bytes a second; the reply's status and body."""
    sha = hashlib.sha256(data).hexdigest()
    sock = connect(url)
    try:
        send_head(sock, "PUT", f"/bundles/{sha}", len(data), token, first=b"")
        step = max(1, int(rate / 10))
        for start in range(0, len(data), step):
            try:
                sock.sendall(data[start : start + step])
            except (BrokenPipeError, ConnectionResetError):
                break  # refused: the reply is waiting
            time.sleep(0.1)
        status, _, body = read_reply(sock, timeout=20)
        return status, body
    finally:
        sock.close()


def test_a_slow_but_steady_upload_is_not_cut_a_trickle_is(tmp_path: Path) -> None:
    coordinator = start_configured(tmp_path / "c", body_timeout=2.0, body_min_rate=1000)
    try:
        url, admin = coordinator.url, coordinator.admin_token
        alice = account(url, admin, "alice", "requester")
        # 9 kB at 3 kB/s: three seconds, past body_timeout, but faster than body_min_rate
        status, body = _upload_slowly(url, alice, _bundle(9000), rate=3000)
        assert status == 200, body
        # 100 bytes a second: cut soon after body_timeout
        started = time.monotonic()
        status, body = _upload_slowly(url, alice, _bundle(2000), rate=100)
        assert status == 408, body
        assert time.monotonic() - started < 10
        assert not list((coordinator.data_dir / "store" / "tmp").iterdir())
    finally:
        coordinator.stop()


# --- strangers cannot starve accounts and nodes ----------------------------------------------


def test_slow_strangers_cannot_hold_the_request_slots(tmp_path: Path) -> None:
    """Issue 17.8: 270 connections sending a body slowly held all 256 request slots, so
    /health, accounts and nodes got 503. Here: 32 slots, 30 slow strangers from one
    address and 24 more from six others."""
    coordinator = start_configured(
        tmp_path / "c", max_concurrent=32, max_anonymous_per_ip=4, body_timeout=30.0
    )
    try:
        url, admin = coordinator.url, coordinator.admin_token
        bob = account(url, admin, "bob", "provider")
        node = call(url, "POST", "/nodes", bob, json_body=caps("n1")).json()["node_id"]
        with sockets() as opened:
            refused = []
            for i in range(30):
                sock = connect(url)
                opened.append(sock)
                send_head(sock, "POST", "/jobs", 1000, None if i % 2 else "made-up")
            for sock in opened:
                sock.settimeout(0.5)
            time.sleep(1.0)
            for sock in opened:
                with suppress(TimeoutError):
                    refused.append(read_reply(sock, timeout=0.2)[0])
            # four per address at once; the others are told 429 at once
            assert refused == [429] * 26, refused
            for source in [f"127.0.0.{i}" for i in range(2, 8)]:
                for _ in range(4):
                    sock = connect(url, source)
                    opened.append(sock)
                    send_head(sock, "POST", "/jobs", 1000)
            time.sleep(1.0)
            # strangers hold a quarter of the slots at most: accounts and nodes are served
            assert call(url, "GET", "/health").status_code == 200
            for _ in range(3):
                assert call(url, "GET", "/me", admin).status_code == 200
            reply = call(url, "POST", f"/nodes/{node}/lease", bob, json_body={"wait": 0})
            assert reply.status_code == 204, reply.text
            unavailable = 0
            for sock in opened[30:]:
                try:
                    status, _, _ = read_reply(sock, timeout=0.2)
                except TimeoutError:
                    continue
                assert status == 503
                unavailable += 1
            assert unavailable == 24 - (8 - 4)  # 8 slots for strangers, 4 taken already
    finally:
        coordinator.stop()


# --- rate limits are per account, whatever the path --------------------------------------------


def test_made_up_lease_ids_do_not_escape_the_rate_limit(tmp_path: Path) -> None:
    """Issue 17.11: each lease id had its own bucket, so 600 heartbeats at ~200/s to
    /leases/<random>/heartbeat got no 429."""
    coordinator = start_configured(tmp_path / "c", rate_limit=10.0, rate_burst=40)
    try:
        url, admin = coordinator.url, coordinator.admin_token
        bob = account(url, admin, "bob", "provider")
        call(url, "POST", "/nodes", bob, json_body=caps("n1"))

        def beat(i: int) -> int:
            path = f"/leases/{os.urandom(8).hex()}/heartbeat"
            return call(url, "POST", path, bob, json_body={"progress": 0.5}).status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(beat, range(300)))
        assert codes.count(429) > 100, codes
        assert set(codes) <= {404, 429}
        # made-up job ids share the account's bucket too
        alice = account(url, admin, "alice", "requester")
        with ThreadPoolExecutor(8) as pool:
            codes = list(
                pool.map(
                    lambda _: call(url, "GET", f"/jobs/{os.urandom(8).hex()}", alice).status_code,
                    range(150),
                )
            )
        assert codes.count(429) > 50, codes
    finally:
        coordinator.stop()


@pytest.mark.parametrize("nodes", [50])
def test_many_nodes_of_one_provider_are_not_throttled_at_defaults(
    tmp_path: Path, nodes: int
) -> None:
    """A provider's nodes share its token: each beats and polls as a real node does
    (beats every heartbeat_interval, polls between tasks), all at once."""
    coordinator = start_configured(tmp_path / "c")
    try:
        url, admin = coordinator.url, coordinator.admin_token
        bob = account(url, admin, "bob", "provider")
        ids = [
            call(url, "POST", "/nodes", bob, json_body=caps(f"n{i}")).json()["node_id"]
            for i in range(nodes)
        ]

        def node_traffic(node: str) -> list[int]:
            codes = []
            for _ in range(4):
                reply = call(url, "POST", f"/nodes/{node}/lease", bob, json_body={"wait": 0})
                codes.append(reply.status_code)
                codes.append(
                    call(
                        url, "POST", "/leases/none/heartbeat", bob, json_body={"progress": 0}
                    ).status_code
                )
            return codes

        with ThreadPoolExecutor(16) as pool:
            codes = [code for batch in pool.map(node_traffic, ids) for code in batch]
        assert 429 not in codes
    finally:
        coordinator.stop()


# --- connections that never start a request ---------------------------------------------------


async def _answer_at_once(scope: Scope, receive: Receive, send: Send) -> None:
    """An ASGI app that answers without reading the request body."""
    assert scope["type"] == "http"
    # Content-Length framed, as `read_reply` reads (else h11 chunks it and the terminator
    # of one reply would be read as the head of the next).
    headers = [(b"content-length", b"0")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


@pytest.fixture()
def guarded_server() -> Iterator[str]:
    """uvicorn with `GuardedHttpProtocol` (start_limit 1 s, keep-alive 30 s) in a thread."""
    protocol = type("Guarded", (GuardedHttpProtocol,), {"start_limit": 1.0})
    config = uvicorn.Config(
        _answer_at_once, http=protocol, lifespan="off", log_level="warning", timeout_keep_alive=30
    )
    server = uvicorn.Server(config)
    sock = bind("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_connections_that_start_no_request_are_closed(guarded_server: str) -> None:
    with sockets() as opened:
        silent, trickle, leftover = (connect(guarded_server) for _ in range(3))
        opened += [silent, trickle, leftover]
        started = time.monotonic()
        # a request whose body is answered before it arrives, and then trickles on
        leftover.sendall(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n{")
        assert read_reply(leftover, timeout=5)[0] == 200
        # headers sent a byte at a time: each byte would reset uvicorn's keep-alive timer
        trickle.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n")
        for _ in range(8):
            for sock in (trickle, leftover):
                with suppress(OSError):
                    sock.sendall(b"X")
            time.sleep(0.3)
        for sock in (silent, trickle, leftover):
            assert closed_by_server(sock, timeout=5)
        assert time.monotonic() - started < 8
        # a connection that sends its request in time is served, and again after it
        sock = connect(guarded_server)
        opened.append(sock)
        for _ in range(2):
            sock.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            assert read_reply(sock, timeout=5)[0] == 200
            time.sleep(0.5)


def test_a_request_head_over_16_kib_is_refused_and_the_connection_closed(
    guarded_server: str,
) -> None:
    """httptools keeps no limit of its own on a request's headers (h11 had 16 KiB): an
    endless header would be gathered in memory until the start limit ran out."""
    with sockets() as opened:
        at_once, in_pieces = connect(guarded_server), connect(guarded_server)
        opened += [at_once, in_pieces]
        at_once.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        status, _, body = read_reply(at_once, timeout=5)
        assert status == 431 and b"16384 bytes" in body
        assert closed_by_server(at_once)
        # one header value that never ends, sent in pieces faster than the start limit
        in_pieces.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Big: ")
        for _ in range(10):
            in_pieces.sendall(b"a" * 2000)
        assert read_reply(in_pieces, timeout=5)[0] == 431
        assert closed_by_server(in_pieces)


def test_heads_under_the_limit_pipelined_requests_and_big_bodies_are_served(
    guarded_server: str,
) -> None:
    with sockets() as opened:
        sock = connect(guarded_server)
        opened.append(sock)
        # a head of 15,000 bytes, then a 1 MB body in the same write as the next head
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 15000 + b"\r\n\r\n")
        assert read_reply(sock, timeout=5)[0] == 200
        body = b"b" * 1_000_000
        sock.sendall(
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        assert read_reply(sock, timeout=5)[0] == 200
        # two requests in one write: both answered, in order, on the same connection
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n" * 2)
        assert read_reply(sock, timeout=5)[0] == 200
        assert read_reply(sock, timeout=5)[0] == 200
        assert not closed_by_server(sock, timeout=0.5)
