"""The coordinator's HTTP API (FastAPI), version 1, under /api/v1.

This module is only the HTTP skin over `Farm`: authentication (bearer tokens) and the
role each route needs, request and response models from `protocol.models`, streaming
uploads to temporary files, long-polling for leases, the server-sent event stream, file
downloads, and turning every error into a JSON `ErrorBody` that says what to fix. The
rules live in `farm.py`; size, rate and load limits in `limits.py`.

Who may call what: admin-only routes (accounts, grants, provider reinstatement, the
ledger check) answer 403 to other roles; requester routes (bundle uploads, job
submission) and provider routes (nodes' leases and everything done with a lease) answer
403 to the other role, checked before any body is read. A job, its tasks, frames and
previews are visible to its owner and admins only; anyone else gets 404, as for a job
that does not exist. A bundle can be downloaded by the requester whose job uses it, the
provider whose node holds a lease on such a job, and admins.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from common.errors import ApiError
from coordinator.assembly import Assembler
from coordinator.config import CoordinatorConfig
from coordinator.db import Database
from coordinator.events import EventBus
from coordinator.farm import Farm, Principal
from coordinator.limits import Limits, RequestLimits, TooManyRequestsError, too_many_requests
from coordinator.store import ContentStore, StorageFullError, is_no_room, no_room
from protocol.discovery import join_proof
from protocol.models import (
    API_PREFIX,
    SHA256_PATTERN,
    AccountCreate,
    AccountToken,
    ErrorBody,
    Grant,
    Health,
    Heartbeat,
    HeartbeatReply,
    Job,
    JobEstimate,
    JobPatch,
    JobSpec,
    JoinChallenge,
    JoinRequest,
    Lease,
    LeaseRequest,
    LedgerCheck,
    Me,
    NodeCapabilities,
    NodeInfo,
    NodeRegistration,
    Role,
    Task,
    TaskFailure,
    UploadReceipt,
    Wallet,
)
from renderers.exr import read_exr
from renderers.preview import write_preview_png

log = logging.getLogger(__name__)
CHUNK = 1 << 20
SWEEP_SECONDS = 1.0
JOIN_NONCE_SECONDS = 60.0
#: Work appearing wakes long polls at once (EventBus.work_version); this is a safety net.
IDLE_RETRY_SECONDS = 5.0
#: The ledger counts integer milli-credits in SQLite (64-bit): keep grants far below that.
MAX_GRANT_CREDITS = 1e12
bearer = HTTPBearer(auto_error=False)


class Services:
    """Everything a request handler may touch, built once per app."""

    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.db = Database(config.db_path)
        self.store = ContentStore(config.store_dir)
        if cleared := self.store.clear_leftovers():
            log.info("removed %d partial files left by an earlier run", cleared)
        self.bus = EventBus()
        self.farm = Farm(config, self.db, self.store, self.bus)
        self.assembler = Assembler(self.db, self.store, self.bus)
        self.farm.on_frame_ready.append(self.assembler.submit)
        self.limits = Limits(config)
        self.stopping = threading.Event()
        self.join_nonces: dict[str, float] = {}
        self.join_lock = threading.Lock()
        self._sweeper: threading.Thread | None = None
        self.admin_token = self.farm.ensure_admin()

    def start(self) -> None:
        self.assembler.start()
        self._sweeper = threading.Thread(target=self._sweep, name="lease-sweeper", daemon=True)
        self._sweeper.start()

    def stop(self) -> None:
        self.stopping.set()
        if self._sweeper is not None:
            self._sweeper.join(timeout=10)
        self.assembler.stop()
        self.db.close()

    def _sweep(self) -> None:
        while not self.stopping.wait(SWEEP_SECONDS):
            try:
                self.farm.requeue_expired()
                self.farm.resolve_stale_samples()
            except Exception:
                log.exception("lease sweep failed")


def create_app(config: CoordinatorConfig) -> FastAPI:
    services = Services(config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        services.start()
        try:
            yield
        finally:
            services.stop()

    app = FastAPI(
        title="Tessera coordinator",
        version=config.version,
        lifespan=lifespan,
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=f"{API_PREFIX}/docs",
    )
    app.state.services = services
    app.add_middleware(RequestLimits, limits=services.limits)
    _install_error_handlers(app)
    app.include_router(_router(services))
    return app


# --- errors ------------------------------------------------------------------------------------


def _error(
    status: int, error: str, detail: str, hint: str = "", headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorBody(error=error, detail=detail, hint=hint)
    return JSONResponse(status_code=status, content=body.model_dump(), headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, _reason(exc.status), exc.message, exc.hint)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for item in exc.errors():
            where = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
            message = str(item.get("msg", "invalid")).removeprefix("Value error, ")
            problems.append(f"{where}: {message}" if where else message)
        return _error(
            422,
            "invalid request",
            "; ".join(problems),
            "Fix the fields named above and send the request again.",
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, _reason(exc.status_code), str(exc.detail))

    @app.exception_handler(TooManyRequestsError)
    async def too_many(_: Request, exc: TooManyRequestsError) -> JSONResponse:
        return too_many_requests(exc.retry_after)

    @app.exception_handler(StorageFullError)
    async def storage_full(_: Request, exc: StorageFullError) -> JSONResponse:
        # Nothing of this request was kept and nothing accepted before is touched: the
        # sender keeps its data and sends it again after Retry-After.
        retry_after = max(1, math.ceil(app.state.services.config.storage_retry_after))
        return _error(
            507, _reason(507), exc.message, exc.hint, headers={"Retry-After": str(retry_after)}
        )

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> JSONResponse:
        # Logged by the server; the client gets the usual error shape, never a traceback.
        return _error(
            500,
            "internal error",
            f"The coordinator failed on this request ({type(exc).__name__}).",
            "This is a bug in the coordinator; its log has the details.",
        )


def _reason(status: int) -> str:
    return {
        400: "bad request",
        401: "unauthorized",
        403: "forbidden",
        404: "not found",
        409: "conflict",
        413: "too large",
        422: "invalid request",
        429: "too many requests",
        503: "unavailable",
        507: "insufficient storage",
    }.get(status, "error")


# --- routes ------------------------------------------------------------------------------------


def principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """The account behind the request's bearer token (401 if none or unknown)."""
    if credentials is None:
        raise ApiError(
            "This endpoint needs a token.", status=401, hint="Send 'Authorization: Bearer <token>'."
        )
    services: Services = request.app.state.services
    # Tokens are stored as SHA-256 digests and found by the digest of the token sent, so
    # the comparison's timing depends only on a hash of the caller's guess: it tells an
    # attacker nothing about any stored token (finding a token from its digest means
    # inverting SHA-256). No raw token is ever compared or stored.
    who = services.farm.authenticate(credentials.credentials)
    if who is None:
        # Made-up tokens count against the client address's rate, not a fresh bucket each.
        services.limits.auth_failed(request.client.host if request.client else "unknown")
        raise ApiError(
            "The token is not valid.",
            status=401,
            hint="Check the token, or ask the farm's admin for a new one.",
        )
    return who


Who = Annotated[Principal, Depends(principal)]


def _role(role: Role, refusal: str) -> Any:
    def check(who: Who) -> Principal:
        if not who.can(role):
            raise ApiError(f"{refusal} Your token is a {who.role.value} token.", status=403)
        return who

    return Depends(check)


# Role checks are dependencies so that they run before the body is read or validated.
Admin = Annotated[Principal, _role(Role.ADMIN, "Only an admin may do this.")]
Requester = Annotated[Principal, _role(Role.REQUESTER, "This needs a requester token.")]
Provider = Annotated[Principal, _role(Role.PROVIDER, "This needs a provider token.")]


def _router(services: Services) -> APIRouter:
    farm = services.farm
    router = APIRouter(prefix=API_PREFIX)

    @router.get("/health", response_model=Health)
    def health() -> Health:
        return Health(status="ok", version=services.config.version, farm=services.config.farm_name)

    @router.get("/me", response_model=Me)
    def me(who: Who) -> Me:
        return Me(account=who.account, role=who.role)

    @router.post("/accounts", response_model=AccountToken, status_code=201)
    def create_account(body: AccountCreate, who: Admin) -> AccountToken:
        return farm.create_account(body.name, body.role)

    @router.post("/accounts/{name}/grant", response_model=Wallet)
    def grant(name: str, body: Grant, who: Admin) -> Wallet:
        if not math.isfinite(body.amount) or body.amount > MAX_GRANT_CREDITS:
            # found by the fuzzer: 1e300 or Infinity overflowed the ledger's integers (500)
            raise ApiError(f"A grant is at most {MAX_GRANT_CREDITS:g} credits.", status=422)
        return farm.grant_credits(who, name, body.amount)

    @router.get("/wallet", response_model=Wallet)
    def wallet(who: Who) -> Wallet:
        return farm.wallet(who)

    @router.post("/providers/{account}/reinstate", status_code=204)
    def reinstate(account: str, who: Admin) -> Response:
        farm.reinstate(who, account)
        return Response(status_code=204)

    @router.get("/ledger/check", response_model=LedgerCheck)
    def ledger_check(who: Admin) -> LedgerCheck:
        return farm.ledger_check(who)

    # LAN join: a node that knows the farm's secret gets a provider token

    @router.get("/join/challenge", response_model=JoinChallenge)
    def join_challenge() -> JoinChallenge:
        _require_lan(services)
        nonce = secrets.token_hex(16)
        with services.join_lock:
            now = time.monotonic()
            for stale in [n for n, t in services.join_nonces.items() if t < now]:
                del services.join_nonces[stale]
            services.join_nonces[nonce] = now + JOIN_NONCE_SECONDS
        return JoinChallenge(nonce=nonce)

    @router.post("/join", response_model=AccountToken)
    def join(body: JoinRequest) -> AccountToken:
        secret = _require_lan(services)
        with services.join_lock:
            expires = services.join_nonces.pop(body.nonce, 0.0)  # each nonce works once
        if expires < time.monotonic():
            raise ApiError(
                "The join challenge expired or was already used.",
                status=401,
                hint="Ask for a new challenge (GET /api/v1/join/challenge).",
            )
        expected = join_proof(secret, body.nonce, body.name)
        if not hmac.compare_digest(expected, body.proof):
            raise ApiError(
                "Wrong farm secret.",
                status=401,
                hint="Use the --secret the coordinator was started with.",
            )
        if body.role == Role.REQUESTER.value:
            return farm.issue_token(f"lan-user-{body.name}", Role.REQUESTER)
        return farm.issue_token(f"lan-{body.name}", Role.PROVIDER)

    # bundles

    @router.head("/bundles/{sha256}")
    def has_bundle(sha256: str, who: Requester) -> Response:
        # Lets a requester skip uploading a bundle the farm has (content-addressed: asking
        # needs the bundle's hash, i.e. its content). Downloads are checked below.
        return Response(status_code=200 if services.store.exists(sha256) else 404)

    @router.put("/bundles/{sha256}")
    async def put_bundle(sha256: str, request: Request, who: Requester) -> dict[str, Any]:
        _check_sha(sha256)
        _check_room(services, request)
        path = await _spool(services, request, services.config.max_bundle_bytes)
        try:
            size = await run_in_threadpool(farm.put_bundle, sha256, _chunks(path))
        finally:
            path.unlink(missing_ok=True)
        return {"sha256": sha256, "size": size}

    @router.get("/bundles/{sha256}")
    def get_bundle(sha256: str, who: Who) -> FileResponse:
        _check_sha(sha256)
        if not services.store.exists(sha256) or not _may_read_bundle(services, who, sha256):
            raise ApiError(f"No bundle {sha256[:12]}...", status=404)
        return FileResponse(services.store.path(sha256), media_type="application/zip")

    # jobs

    @router.post("/jobs", response_model=Job, status_code=201)
    def submit(spec: JobSpec, who: Requester) -> Job:
        return farm.submit(who, spec)

    @router.post("/jobs/estimate", response_model=JobEstimate)
    def estimate(spec: JobSpec, who: Requester) -> JobEstimate:
        """What submitting `spec` would escrow, and the caller's balance (a dry run)."""
        return farm.estimate(who, spec)

    @router.get("/jobs", response_model=list[Job])
    def jobs(who: Who) -> list[Job]:
        return farm.jobs(who)

    @router.get("/jobs/{job_id}", response_model=Job)
    def job(job_id: str, who: Who) -> Job:
        return farm.job(who, job_id)

    @router.patch("/jobs/{job_id}", response_model=Job)
    def patch_job(job_id: str, body: JobPatch, who: Who) -> Job:
        if body.priority is not None:
            return farm.set_priority(who, job_id, body.priority)
        return farm.job(who, job_id)

    @router.post("/jobs/{job_id}/pause", response_model=Job)
    def pause(job_id: str, who: Who) -> Job:
        return farm.pause(who, job_id)

    @router.post("/jobs/{job_id}/resume", response_model=Job)
    def resume(job_id: str, who: Who) -> Job:
        return farm.resume(who, job_id)

    @router.post("/jobs/{job_id}/cancel", response_model=Job)
    def cancel(job_id: str, who: Who) -> Job:
        return farm.cancel(who, job_id)

    @router.get("/jobs/{job_id}/tasks", response_model=list[Task])
    def tasks(job_id: str, who: Who) -> list[Task]:
        return farm.tasks(who, job_id)

    @router.get("/jobs/{job_id}/frames/{frame}.{kind}")
    def frame_file(job_id: str, frame: int, kind: str, who: Who) -> FileResponse:
        farm.job(who, job_id)
        if kind not in ("exr", "png"):
            raise ApiError(f"Frames come as .exr or .png, not .{kind}.", status=404)
        row = services.db.query_one(
            "SELECT * FROM frames WHERE job_id = ? AND frame = ?", (job_id, frame)
        )
        if row is None or row["status"] != "done":
            raise ApiError(
                f"Frame {frame} of job {job_id} is not finished.",
                status=404,
                hint="Follow /api/v1/events or poll the job until it is.",
            )
        sha = row["exr_sha"] if kind == "exr" else row["png_sha"]
        media = "image/x-exr" if kind == "exr" else "image/png"
        return FileResponse(services.store.path(sha), media_type=media)

    @router.get("/tasks/{task_id}/preview.png")
    def task_preview(task_id: str, who: Who) -> FileResponse:
        row = services.db.query_one("SELECT job_id, result_sha FROM tasks WHERE id = ?", (task_id,))
        if row is None:
            raise ApiError(f"No task {task_id}.", status=404)
        farm.job(who, row["job_id"])
        if not row["result_sha"]:
            raise ApiError(f"Task {task_id} has no result yet.", status=404)
        return FileResponse(_preview(services, task_id, row["result_sha"]), media_type="image/png")

    @router.get("/events")
    async def events(
        request: Request, who: Who, after: int = 0, job: str | None = None
    ) -> StreamingResponse:
        if job is not None:
            await run_in_threadpool(farm.job, who, job)
        return StreamingResponse(
            _event_stream(services, request, who, after, job),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    # nodes and leases

    @router.post("/nodes", response_model=NodeRegistration)
    def register(body: NodeCapabilities, who: Provider) -> NodeRegistration:
        return farm.register_node(who, body)

    @router.get("/nodes", response_model=list[NodeInfo])
    def nodes(who: Who) -> list[NodeInfo]:
        infos = farm.nodes(who)
        if who.role is not Role.REQUESTER:
            return infos  # an admin sees all; a provider only its own nodes
        # A requester sees the farm's nodes, but only the tasks of its own jobs on them.
        own = {
            row["id"]
            for row in services.db.query(
                "SELECT t.id FROM tasks t JOIN jobs j ON j.id = t.job_id"
                " WHERE j.owner = ? AND t.lease_id IS NOT NULL",
                (who.account,),
            )
        }
        return [
            info if info.current_task in own else info.model_copy(update={"current_task": None})
            for info in infos
        ]

    @router.post(
        "/nodes/{node_id}/lease",
        response_model=Lease,
        responses={204: {"description": "no task within the wait"}},
    )
    async def lease(node_id: str, body: LeaseRequest, who: Provider) -> Any:
        deadline = time.monotonic() + min(body.wait, services.config.poll_timeout)
        seen, tried_at = -1, 0.0
        while True:
            version = services.bus.work_version
            if version != seen or time.monotonic() - tried_at > IDLE_RETRY_SECONDS:
                seen, tried_at = version, time.monotonic()
                granted = await run_in_threadpool(farm.try_lease, who, node_id, body)
                if granted is not None:
                    return granted
            if time.monotonic() >= deadline or services.stopping.is_set():
                return Response(status_code=204)
            await asyncio.sleep(0.05)

    @router.post("/leases/{lease_id}/heartbeat", response_model=HeartbeatReply)
    def heartbeat(lease_id: str, body: Heartbeat, who: Provider) -> HeartbeatReply:
        return farm.heartbeat(who, lease_id, body)

    @router.put("/leases/{lease_id}/result", response_model=UploadReceipt)
    async def upload(lease_id: str, request: Request, who: Provider) -> UploadReceipt:
        claimed = request.headers.get("x-content-sha256")
        # Only the lease's holder may make the coordinator spool anything to disk.
        await run_in_threadpool(farm.check_upload, who, lease_id)
        _check_room(services, request)
        path = await _spool(services, request, services.config.max_result_bytes)
        try:
            receipt: UploadReceipt = await run_in_threadpool(
                farm.accept_result, who, lease_id, claimed, _chunks(path)
            )
        finally:
            path.unlink(missing_ok=True)
        return receipt

    @router.post("/leases/{lease_id}/failure", status_code=204)
    def failure(lease_id: str, body: TaskFailure, who: Provider) -> Response:
        farm.report_failure(who, lease_id, body)
        return Response(status_code=204)

    @router.post("/leases/{lease_id}/release", status_code=204)
    def release(lease_id: str, who: Provider) -> Response:
        farm.release(who, lease_id)
        return Response(status_code=204)

    @router.get("/leases/{lease_id}/denoise-input")
    def denoise_input(lease_id: str, who: Provider) -> FileResponse:
        row = farm._lease_row(who, lease_id)
        if not row["denoise_input"]:
            raise ApiError("This lease is not a denoise task.", status=404)
        return FileResponse(services.store.path(row["denoise_input"]), media_type="image/x-exr")

    return router


def _require_lan(services: Services) -> str:
    if not services.config.lan_secret:
        raise ApiError(
            "This coordinator does not accept LAN joins.",
            status=404,
            hint="Start it with --lan --farm NAME --secret S, or use a token.",
        )
    return services.config.lan_secret


def _may_read_bundle(services: Services, who: Principal, sha256: str) -> bool:
    """Admins; the requester whose job uses the bundle; a provider whose node holds a
    lease on a task of such a job (a node fetches a bundle after it is leased a task)."""
    if who.role is Role.ADMIN:
        return True
    if who.role is Role.REQUESTER:
        sql = "SELECT 1 FROM jobs WHERE bundle = ? AND owner = ? LIMIT 1"
    else:
        sql = (
            "SELECT 1 FROM tasks t JOIN jobs j ON j.id = t.job_id JOIN nodes n ON n.id ="
            " t.node_id WHERE j.bundle = ? AND n.owner = ? AND t.lease_id IS NOT NULL LIMIT 1"
        )
    return services.db.query_one(sql, (sha256, who.account)) is not None


def _check_sha(sha256: str) -> None:
    if not re.fullmatch(SHA256_PATTERN, sha256):
        raise ApiError(f"'{sha256[:80]}' is not a SHA-256 (64 lower-case hex digits).", status=400)


def _check_room(services: Services, request: Request) -> None:
    """507 before reading an upload that would leave the data folder's disk with less
    than `min_free_disk` free (a sender that does not say its size is checked for 0)."""
    length = request.headers.get("content-length", "0")
    incoming = int(length) if length.isdigit() else 0
    services.store.check_room(incoming, services.config.min_free_disk)


async def _spool(services: Services, request: Request, limit: int) -> Path:
    """Stream the request body to a temporary file, refusing it past `limit` bytes.
    The caller deletes the file. A full disk is `StorageFullError` (507); a sender whose
    connection broke mid-body gets nothing stored (it sends the whole body again)."""
    try:
        handle, name = tempfile.mkstemp(dir=services.store.root / "tmp", suffix=".upload")
    except OSError as exc:
        if is_no_room(exc):
            raise no_room("an upload", exc) from exc
        raise
    path = Path(name)
    size = 0
    try:
        with os.fdopen(handle, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(
                        f"The upload is larger than the limit of {limit} bytes.", status=413
                    )
                out.write(chunk)
    except ClientDisconnect:
        path.unlink(missing_ok=True)
        # Nobody is left to read this; an ApiError (not a crash) keeps the log quiet.
        raise ApiError(f"The upload broke off after {size} bytes.", status=400) from None
    except OSError as exc:
        path.unlink(missing_ok=True)
        if is_no_room(exc):
            raise no_room(f"an upload ({size} bytes in)", exc) from exc
        raise
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        yield from iter(lambda: handle.read(CHUNK), b"")


def _preview(services: Services, task_id: str, result_sha: str) -> Path:
    row = services.db.query_one("SELECT png_sha FROM previews WHERE task_id = ?", (task_id,))
    if row is not None and services.store.exists(row["png_sha"]):
        return services.store.path(row["png_sha"])
    with tempfile.TemporaryDirectory(dir=services.store.root / "tmp") as scratch:
        png = write_preview_png(
            read_exr(services.store.path(result_sha)), Path(scratch) / "tile.png"
        )
        png_sha = services.store.put_file(png)
    with services.db.transaction() as conn:
        conn.execute(
            "INSERT OR REPLACE INTO previews (task_id, png_sha) VALUES (?, ?)", (task_id, png_sha)
        )
    return services.store.path(png_sha)


async def _event_stream(
    services: Services, request: Request, who: Principal, after: int, job: str | None
) -> AsyncIterator[str]:
    last, quiet_since = after, time.monotonic()
    yield ": connected\n\n"
    while not services.stopping.is_set():
        if await request.is_disconnected():
            return
        batch = services.bus.since(last, job)
        if batch and who.role is not Role.ADMIN and job is None:
            owned = {
                row["id"]
                for row in services.db.query("SELECT id FROM jobs WHERE owner = ?", (who.account,))
            }
            visible = [e for e in batch if e.job_id in owned]
        else:
            visible = batch
        for event in visible:
            yield f"id: {event.seq}\ndata: {event.model_dump_json()}\n\n"
        if batch:
            last, quiet_since = batch[-1].seq, time.monotonic()
        elif time.monotonic() - quiet_since > 15:
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
        await asyncio.sleep(0.1)
