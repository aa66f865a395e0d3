"""Limits in front of the API, so that no client can hurt the coordinator or other clients.

`RequestLimits` is plain ASGI middleware (it never buffers a response, so event streams
and file downloads pass through untouched). For every HTTP request it checks, in order:

1. **Rate**: a token bucket per bearer token (per client address for requests without
   one). Node traffic - a node's lease long poll and everything done with one lease
   (heartbeats, result, failure, release) - has a bucket per (token, node or lease id):
   a provider may run hundreds of nodes under one token, each polling once at a time and
   beating every few seconds, and none of them is throttled in normal operation, while
   a client hammering one node or lease is. Over the rate: 429 with Retry-After.
2. **Load**: requests being worked on at once (`max_concurrent`), and long polls and
   event streams open at once (`max_waiting`: they mostly sleep). Past either: 503 with
   Retry-After, at once, instead of queueing for the thread pool or the database lock.
   New work goes first: once half of `max_concurrent` is in use, lease polls are refused
   (503, Retry-After `NEW_WORK_RETRY_SECONDS`) while heartbeats and result uploads still
   get in, so that an overloaded coordinator finishes the tiles it handed out (each one a
   render already paid for in node time) instead of handing out more and refusing their
   results. Refusals are built without the JSON machinery: under overload they are most
   of what the coordinator answers (see docs/load-test.md).
3. **Size**: every body except the two uploads (bundles and task results, which are
   streamed to disk with their own limits) is refused past `max_json_bytes` with 413:
   by its Content-Length before any of it is read, or, when sent chunked, as soon as the
   bytes read pass the limit, before anything parses it.

Failed authentication also charges the client address's bucket (`Limits.auth_failed`),
so cycling through made-up tokens does not escape the rate limit.

Every refusal has the JSON `ErrorBody` shape the rest of the API uses.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator.config import CoordinatorConfig
from coordinator.errors import TooManyRequestsError
from protocol.models import API_PREFIX, ErrorBody

#: How long a client told "overloaded" should wait, in seconds.
OVERLOAD_RETRY_SECONDS = 1
#: Lease polls are refused once this share of `max_concurrent` is in use...
SHED_NEW_WORK_AT = 0.5
#: ...and told to come back after this many seconds (nodes wait as told, up to 10 s).
NEW_WORK_RETRY_SECONDS = 5
#: Buckets kept at most (least recently used dropped first); a dropped bucket is full.
MAX_BUCKETS = 100_000

_P = re.escape(API_PREFIX)
#: Node traffic: its bucket is per (token, this id).
_NODE_ROUTE = re.compile(
    rf"{_P}/(?:nodes/([^/]+)/lease|leases/([^/]+)/(?:heartbeat|result|failure|release))"
)
#: Streamed uploads with their own size limits (max_bundle_bytes, max_result_bytes).
_UPLOAD_ROUTE = re.compile(rf"{_P}/(?:bundles/[^/]+|leases/[^/]+/result)")
#: Requests that mostly wait: lease long polls and the event stream.
_WAITING_ROUTE = re.compile(rf"{_P}/(?:nodes/[^/]+/lease|events)")
#: A node asking for new work.
_LEASE_ROUTE = re.compile(rf"{_P}/nodes/[^/]+/lease")


class BodyTooLargeError(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"The request body is larger than the limit of {limit} bytes. "
            "Only bundle and result uploads may be larger.",
        )


class TokenBuckets:
    """Token buckets by key: `rate` tokens a second, at most `burst` saved. Thread-safe."""

    def __init__(self, rate: float, burst: int, max_buckets: int = MAX_BUCKETS) -> None:
        self.rate = rate
        self.burst = max(1.0, float(burst))
        self.max_buckets = max_buckets
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key: str, now: float | None = None) -> float:
        """Take one token for `key`: 0.0 when allowed, else seconds until one is free."""
        if not self.enabled:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                tokens -= 1.0
                wait = 0.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_buckets:
                self._buckets.popitem(last=False)
            return wait


@dataclass
class Limits:
    """The coordinator's limits and their live state (one per app)."""

    config: CoordinatorConfig

    def __post_init__(self) -> None:
        self.buckets = TokenBuckets(self.config.rate_limit, self.config.rate_burst)
        self.active = 0  # only touched on the event loop
        self.waiting = 0

    def auth_failed(self, client: str) -> None:
        """Charge a failed authentication to the client's address (raises when over)."""
        wait = self.buckets.take(f"ip:{client}")
        if wait > 0:
            raise TooManyRequestsError(wait)


def bucket_key(path: str, token: str | None, client: str) -> str:
    if token is None:
        return f"ip:{client}"
    # Keys hold a digest, never the token itself.
    key = "t:" + hashlib.sha256(token.encode()).hexdigest()[:32]
    node = _NODE_ROUTE.fullmatch(path)
    if node is not None:
        key += "/" + (node.group(1) or node.group(2))[:64]
    return key


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            text: str = bytes(value).decode("latin-1")
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def error_response(
    status: int, error: str, detail: str, hint: str, retry_after: float | None = None
) -> JSONResponse:
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    body = ErrorBody(error=error, detail=detail, hint=hint)
    return JSONResponse(status_code=status, content=body.model_dump(), headers=headers)


def too_many_requests(retry_after: float) -> JSONResponse:
    return error_response(
        429,
        "too many requests",
        "This token (or address) sent requests faster than the coordinator's rate limit.",
        f"Wait {max(1, math.ceil(retry_after))} s (Retry-After) and slow down.",
        retry_after,
    )


async def send_overloaded(send: Send, why: str, retry_after: int) -> None:
    """503 with Retry-After, the `ErrorBody` shape sent as plain ASGI messages (no
    response object or model per refusal). The request body is never read: the server
    closes the connection when one was sent."""
    body = json.dumps(
        {
            "error": "unavailable",
            "detail": f"The coordinator is overloaded ({why}).",
            "hint": f"Retry after {retry_after} s (Retry-After).",
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(retry_after).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestLimits:
    """ASGI middleware applying `Limits` (see the module docstring)."""

    def __init__(self, app: ASGIApp, limits: Limits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limits, config = self.limits, self.limits.config
        path: str = scope["path"]
        wait = limits.buckets.take(bucket_key(path, bearer_token(scope), client_address(scope)))
        if wait > 0:
            await too_many_requests(wait)(scope, receive, send)
            return
        waiting = _WAITING_ROUTE.fullmatch(path) is not None
        if waiting:
            in_use, allowed = limits.waiting, config.max_waiting
        else:
            in_use, allowed = limits.active, config.max_concurrent
        if allowed and in_use >= allowed:
            what = "long polls and event streams" if waiting else "requests"
            await send_overloaded(send, f"{in_use} {what} in progress", OVERLOAD_RETRY_SECONDS)
            return
        busy = config.max_concurrent and limits.active >= config.max_concurrent * SHED_NEW_WORK_AT
        if busy and _LEASE_ROUTE.fullmatch(path) is not None:
            await send_overloaded(
                send,
                f"{limits.active} requests in progress; it finishes the work it handed out"
                " before it hands out more",
                NEW_WORK_RETRY_SECONDS,
            )
            return
        if _UPLOAD_ROUTE.fullmatch(path) is None or scope["method"] != "PUT":
            limit = config.max_json_bytes
            if _content_length(scope) > limit:
                await error_response(
                    413,
                    "too large",
                    f"The request body is larger than the limit of {limit} bytes.",
                    "Only bundle and result uploads may be larger.",
                )(scope, receive, send)
                return
            receive = _bounded(receive, limit)
        if waiting:
            limits.waiting += 1
        else:
            limits.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            if waiting:
                limits.waiting -= 1
            else:
                limits.active -= 1


def _content_length(scope: Scope) -> int:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _bounded(receive: Receive, limit: int) -> Receive:
    """`receive` that raises 413 once the body read passes `limit` bytes (chunked bodies)."""
    read = 0

    async def bounded() -> Message:
        nonlocal read
        message = await receive()
        if message["type"] == "http.request":
            read += len(message.get("body", b""))
            if read > limit:
                raise BodyTooLargeError(limit)
        return message

    return bounded
