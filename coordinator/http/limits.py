"""Limits in front of the API, so that no client can hurt the coordinator or other clients.

`RequestLimits` is plain ASGI middleware (it never buffers a response, so event streams
and file downloads pass through untouched). For every HTTP request it first finds who is
calling: a bearer token is looked up in the accounts' memory of valid tokens (no
database access), an unknown one in the database off the event loop - after the client
address's bucket was charged, so made-up tokens cost the guesser, not the database.
Then it checks, in order:

1. **Rate**: a token bucket per account (per client address for requests without a
   valid token), whatever the path: `rate_limit` a second, `rate_burst` at once. Node
   traffic - a node's lease long poll and everything done with a lease (heartbeats,
   result, failure, release, denoise input) - has a second bucket per account, whose
   rate and burst grow with the nodes the account registered (`node_rate`, `node_burst`
   each): a provider may run hundreds of nodes under one token and none is throttled in
   normal operation, while a client sending made-up lease or node ids is throttled as one
   account. The node count is looked up again (at most once a second) when the bucket
   runs dry. Over the rate: 429 with Retry-After.
2. **Strangers**: requests without a valid token may hold `max_anonymous_per_ip` slots
   per client address (past it 429) and a quarter of `max_concurrent` together (past it
   503), so that connections that send a body slowly cannot starve accounts and nodes
   (nor make the coordinator shed lease polls: their slots do not count for that).
   `/health` needs no slot at all: it always answers.
3. **Load**: requests being worked on at once (`max_concurrent`), and long polls and
   event streams open at once (`max_waiting`: they mostly sleep). Past either: 503 with
   Retry-After, at once, instead of queueing for the thread pool or the database lock.
   New work goes first: once half of `max_concurrent` is in use, lease polls are refused
   (503, Retry-After `NEW_WORK_RETRY_SECONDS`) while heartbeats and result uploads still
   get in, so that an overloaded coordinator finishes the tiles it handed out (each one a
   render already paid for in node time) instead of handing out more and refusing their
   results. Refusals are built without the JSON machinery: under overload they are most
   of what the coordinator answers (see docs/load-test.md).
4. **Size**: every body except the two uploads (bundles and task results, which are
   streamed to disk with their own limits) is refused past `max_json_bytes` with 413:
   by its Content-Length before any of it is read, or, when sent chunked, as soon as the
   bytes read pass the limit, before anything parses it.
5. **Time**: a body must arrive within `body_timeout` seconds, plus one second for every
   `body_min_rate` bytes received (so a big upload that keeps moving is never cut);
   past it 408, and the connection is closed. (`server` also closes connections that
   start no request in time: a body timeout needs a request first.)

Every refusal has the JSON `ErrorBody` shape the rest of the API uses.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator.config import CoordinatorConfig
from coordinator.farm import Principal
from protocol.models import API_PREFIX, ErrorBody, Role

#: How long a client told "overloaded" should wait, in seconds.
OVERLOAD_RETRY_SECONDS = 1
#: Lease polls are refused once this share of `max_concurrent` is in use...
SHED_NEW_WORK_AT = 0.5
#: ...and told to come back after this many seconds (nodes wait as told, up to 10 s).
NEW_WORK_RETRY_SECONDS = 5
#: Requests without a valid token may hold this share of `max_concurrent` together.
ANONYMOUS_SHARE = 0.25
#: Buckets kept at most (least recently used dropped first); a dropped bucket is full.
MAX_BUCKETS = 100_000
#: An account's node count is looked up again at most this often (when its node bucket
#: runs dry), and counts at most this many nodes.
NODE_COUNT_SECONDS = 1.0
MAX_COUNTED_NODES = 1000

_P = re.escape(API_PREFIX)
#: Node traffic: the account's node bucket.
_NODE_ROUTE = re.compile(
    rf"{_P}/(?:nodes/[^/]+/lease|leases/[^/]+/(?:heartbeat|result|failure|release|denoise-input))"
)
#: Streamed uploads with their own size limits (max_bundle_bytes, max_result_bytes).
_UPLOAD_ROUTE = re.compile(rf"{_P}/(?:bundles/[^/]+|leases/[^/]+/result)")
#: Requests that mostly wait: lease long polls and the event stream.
_WAITING_ROUTE = re.compile(rf"{_P}/(?:nodes/[^/]+/lease|events)")
#: A node asking for new work.
_LEASE_ROUTE = re.compile(rf"{_P}/nodes/[^/]+/lease")
#: Always answered, without a slot.
HEALTH_PATH = f"{API_PREFIX}/health"
#: The scope key under which the account found for the request's token is handed on to
#: the routes (`auth.principal` reuses it instead of looking the token up again).
PRINCIPAL_KEY = "tessera.principal"


class BodyTooLargeError(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"The request body is larger than the limit of {limit} bytes. "
            "Only bundle and result uploads may be larger.",
        )


class BodyTimeoutError(HTTPException):
    def __init__(self, received: int, seconds: float) -> None:
        super().__init__(
            408,
            f"The request body did not arrive in time: {received} bytes in {seconds:.0f} s.",
            headers={"Connection": "close"},
        )


class TokenBuckets:
    """Token buckets by key: `rate` tokens a second, at most `burst` saved (each key may
    have its own, and a bucket whose burst grows gets the difference). Thread-safe."""

    def __init__(self, rate: float, burst: int, max_buckets: int = MAX_BUCKETS) -> None:
        self.rate = rate
        self.burst = max(1.0, float(burst))
        self.max_buckets = max_buckets
        self._buckets: OrderedDict[str, tuple[float, float, float]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(
        self,
        key: str,
        now: float | None = None,
        *,
        rate: float | None = None,
        burst: float | None = None,
    ) -> float:
        """Take one token for `key`: 0.0 when allowed, else seconds until one is free."""
        if not self.enabled:
            return 0.0
        rate = self.rate if rate is None else rate
        burst = self.burst if burst is None else max(1.0, burst)
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last, had = self._buckets.pop(key, (burst, now, burst))
            if burst > had:
                tokens += burst - had
            tokens = min(burst, tokens + (now - last) * rate)
            if tokens >= 1.0:
                tokens -= 1.0
                wait = 0.0
            else:
                wait = (1.0 - tokens) / rate
            self._buckets[key] = (tokens, now, burst)
            while len(self._buckets) > self.max_buckets:
                self._buckets.popitem(last=False)
            return wait


@dataclass
class Limits:
    """The coordinator's limits and their live state (one per app). `known` finds a
    token's account in memory, `authenticate` in the database (called off the event
    loop), `node_count` counts an account's nodes (likewise); the defaults know nobody."""

    config: CoordinatorConfig
    known: Callable[[str], Principal | None] = lambda _: None
    authenticate: Callable[[str], Principal | None] = lambda _: None
    node_count: Callable[[Principal], int] = lambda _: 0

    # live state, only touched on the event loop
    active: int = field(default=0, init=False)
    waiting: int = field(default=0, init=False)
    anonymous: int = field(default=0, init=False)
    anonymous_by_ip: dict[str, int] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.buckets = TokenBuckets(self.config.rate_limit, self.config.rate_burst)
        self._nodes: dict[str, tuple[int, float]] = {}
        self._counting: dict[str, asyncio.Future[int]] = {}

    async def identify(self, token: str | None, client: str) -> tuple[Principal | None, float]:
        """Who calls, and the seconds to wait when the address's bucket is empty (a
        caller without a valid token is charged to its address)."""
        if token is not None:
            who = self.known(token)
            if who is not None:
                return who, 0.0
        wait = self.buckets.take(f"ip:{client}")
        if wait > 0 or token is None:
            return None, wait
        return await run_in_threadpool(self.authenticate, token), 0.0

    async def charge(self, who: Principal, path: str) -> float:
        """Take a token from the account's bucket (its node bucket for node traffic)."""
        if _NODE_ROUTE.fullmatch(path) is None:
            return self.buckets.take(f"a:{who.account}")
        count, _ = self._nodes.get(who.account, (0, 0.0))
        wait = self._take_node(who, count)
        if wait > 0 and who.role in (Role.PROVIDER, Role.ADMIN):
            fresh = await self._count_nodes(who)
            if fresh > count:
                wait = self._take_node(who, fresh)
        return wait

    def _take_node(self, who: Principal, count: int) -> float:
        config = self.config
        return self.buckets.take(
            f"n:{who.account}",
            rate=config.rate_limit + count * config.node_rate,
            burst=config.rate_burst + count * config.node_burst,
        )

    async def _count_nodes(self, who: Principal) -> int:
        """The account's node count, looked up at most once a second (one lookup at a
        time per account: concurrent callers share it)."""
        count, at = self._nodes.get(who.account, (0, -math.inf))
        if time.monotonic() - at < NODE_COUNT_SECONDS:
            return count
        pending = self._counting.get(who.account)
        if pending is None:
            pending = asyncio.ensure_future(run_in_threadpool(self.node_count, who))
            self._counting[who.account] = pending
            try:
                count = min(MAX_COUNTED_NODES, await pending)
            finally:
                del self._counting[who.account]
            self._nodes[who.account] = (count, time.monotonic())
            return count
        return min(MAX_COUNTED_NODES, await asyncio.shield(pending))


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


def too_many_strangers(limit: int) -> JSONResponse:
    return error_response(
        429,
        "too many requests",
        f"This address has {limit} requests without a valid token in progress already.",
        "Send a valid token (Authorization: Bearer ...), or wait for those to finish.",
        OVERLOAD_RETRY_SECONDS,
    )


async def send_overloaded(send: Send, why: str, retry_after: int) -> None:
    """503 with Retry-After, the `ErrorBody` shape sent as plain ASGI messages (no
    response object or model per refusal). The request body is never read."""
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
        client = client_address(scope)
        who, wait = await limits.identify(bearer_token(scope), client)
        if who is not None:
            scope[PRINCIPAL_KEY] = who
            wait = await limits.charge(who, path)
        if wait > 0:
            await too_many_requests(wait)(scope, receive, send)
            return
        receive = _timed(receive, scope, config)
        if path == HEALTH_PATH:
            await self.app(scope, receive, send)
            return
        if who is None and config.max_anonymous_per_ip:
            mine = limits.anonymous_by_ip.get(client, 0)
            if mine >= config.max_anonymous_per_ip:
                await too_many_strangers(mine)(scope, receive, send)
                return
            share = int(config.max_concurrent * ANONYMOUS_SHARE)
            if share and limits.anonymous >= share:
                await send_overloaded(
                    send, f"{limits.anonymous} requests without a token", OVERLOAD_RETRY_SECONDS
                )
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
        # Strangers' requests do not count here: they must not make nodes wait for work.
        working = limits.active - limits.anonymous
        busy = config.max_concurrent and working >= config.max_concurrent * SHED_NEW_WORK_AT
        if busy and _LEASE_ROUTE.fullmatch(path) is not None:
            await send_overloaded(
                send,
                f"{working} requests in progress; it finishes the work it handed out"
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
        if who is None:
            limits.anonymous += 1
            limits.anonymous_by_ip[client] = limits.anonymous_by_ip.get(client, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            if waiting:
                limits.waiting -= 1
            else:
                limits.active -= 1
            if who is None:
                limits.anonymous -= 1
                left = limits.anonymous_by_ip.pop(client, 1) - 1
                if left > 0:
                    limits.anonymous_by_ip[client] = left


def _content_length(scope: Scope) -> int:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _has_body(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding" and b"chunked" in bytes(value).lower():
            return True
    return _content_length(scope) > 0


def _timed(receive: Receive, scope: Scope, config: CoordinatorConfig) -> Receive:
    """`receive` that raises 408 when the body is not in by its deadline: `body_timeout`
    seconds from the request's start, plus a second per `body_min_rate` bytes received.
    Once the body is in (or for requests without one), `receive` is left alone: event
    streams and long polls wait on it for the client's disconnect."""
    if config.body_timeout <= 0 or not _has_body(scope):
        return receive
    started = time.monotonic()
    received = 0
    done = False

    async def timed() -> Message:
        nonlocal received, done
        if done:
            return await receive()
        allowed = config.body_timeout
        if config.body_min_rate > 0:
            allowed += received / config.body_min_rate
        left = started + allowed - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            # asyncio.timeout, not wait_for: no extra task per body chunk (load test).
            async with asyncio.timeout(left):
                message = await receive()
        except TimeoutError:
            raise BodyTimeoutError(received, time.monotonic() - started) from None
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            done = not message.get("more_body", False)
        else:
            done = True
        return message

    return timed


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
