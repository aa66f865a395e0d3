"""The routes of API v1. Each one checks who may call it (see `auth`), calls one `Farm`
method, and answers with a model from `protocol.models`.

Who may call what: admin-only routes (accounts: creating, listing, revoking; grants,
provider reinstatement, the ledger check) answer 403 to other roles; requester routes
(bundle uploads, job submission) and provider routes (nodes' leases and everything done
with a lease) answer 403 to the other role, checked before an upload is spooled (FastAPI
reads a JSON body, bounded and timed by `limits`, before it checks). A job, its tasks,
frames and previews are visible to its owner and admins only; anyone else gets 404, as
for a job that does not exist. A bundle can be downloaded by the requester whose job
uses it, the provider whose node holds a lease on such a job, and admins.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse

from coordinator.errors import NotAuthenticatedError
from coordinator.farm import Principal
from coordinator.http.auth import Admin, Provider, Requester, Who
from coordinator.http.events import event_stream
from coordinator.http.uploads import check_room, check_sha, read_small, small_length, spool
from protocol.accounts import (
    AccountCreate,
    AccountInfo,
    AccountToken,
    Grant,
    JoinChallenge,
    JoinRequest,
    LedgerCheck,
    Me,
    Wallet,
)
from protocol.models import (
    API_PREFIX,
    FrameState,
    Health,
    Heartbeat,
    HeartbeatReply,
    Job,
    JobEstimate,
    JobPatch,
    JobSpec,
    Lease,
    LeaseRequest,
    NodeCapabilities,
    NodeInfo,
    NodeRegistration,
    Task,
    TaskFailure,
    UploadReceipt,
)
from protocol.output import (
    Deliverables,
)
from protocol.requirements import PoolCreate, PoolInfo, PoolMember

if TYPE_CHECKING:
    from coordinator.http.app import Services

__all__ = ["router"]

#: Work appearing wakes long polls at once (EventBus.work_version); this is a safety net.
IDLE_RETRY_SECONDS = 5.0
#: A sleeping long poll looks at its token's revocation at least this often.
REVOKE_CHECK_SECONDS = 0.5


def router(services: Services) -> APIRouter:
    farm, config = services.farm, services.config
    store, bus = farm.store, farm.bus
    api = APIRouter(prefix=API_PREFIX)

    # nodes and leases: first, as most requests are theirs (routes are matched in order)

    @api.post("/nodes", response_model=NodeRegistration)
    def register(body: NodeCapabilities, who: Provider) -> NodeRegistration:
        return farm.register_node(who, body)

    @api.get("/nodes", response_model=list[NodeInfo])
    def nodes(who: Who) -> list[NodeInfo]:
        return farm.nodes(who)

    @api.post(
        "/nodes/{node_id}/lease",
        response_model=Lease,
        responses={204: {"description": "no task within the wait"}},
    )
    async def lease(node_id: str, body: LeaseRequest, who: Provider) -> Any:
        deadline = time.monotonic() + min(body.wait, config.poll_timeout)
        seen, tried_at = -1, 0.0
        # The poll sleeps until the bus wakes it (work appeared, the node or the farm is
        # stopping), never polling the database; REVOKE_CHECK_SECONDS bounds each sleep.
        loop, woken = asyncio.get_running_loop(), asyncio.Event()

        def wake() -> None:
            loop.call_soon_threadsafe(woken.set)

        bus.add_waker(wake)
        try:
            while True:
                woken.clear()
                if farm.poll_ended(node_id):  # the node is stopping: no new task for it
                    return Response(status_code=204)
                version = bus.work_version
                if version != seen or time.monotonic() - tried_at > IDLE_RETRY_SECONDS:
                    seen, tried_at = version, time.monotonic()
                    granted = await run_in_threadpool(farm.try_lease, who, node_id, body)
                    if granted is not None:
                        return granted
                now = time.monotonic()
                if now >= deadline or farm.stopping.is_set():
                    return Response(status_code=204)
                if farm.accounts.is_revoked(who.account):
                    raise NotAuthenticatedError(
                        "The token was revoked.", hint="Ask the farm's admin for an account."
                    )
                if bus.work_version != seen:
                    continue  # work changed while the lease was tried
                sleep = min(deadline - now, IDLE_RETRY_SECONDS, REVOKE_CHECK_SECONDS)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), timeout=max(0.0, sleep))
        finally:
            bus.remove_waker(wake)

    @api.post("/nodes/{node_id}/stop-polling", status_code=204)
    def stop_polling(node_id: str, who: Provider) -> Response:
        farm.end_poll(who, node_id)
        return Response(status_code=204)

    @api.post("/leases/{lease_id}/heartbeat", response_model=HeartbeatReply)
    async def heartbeat(lease_id: str, body: Heartbeat, who: Provider) -> HeartbeatReply:
        # async with one thread-pool call: a sync route costs a second round trip to
        # validate its answer (the load test's heartbeats, docs/load-test.md)
        reply: HeartbeatReply = await run_in_threadpool(farm.heartbeat, who, lease_id, body)
        return reply

    @api.put("/leases/{lease_id}/result", response_model=UploadReceipt)
    async def upload(lease_id: str, request: Request, who: Provider) -> UploadReceipt:
        claimed = request.headers.get("x-content-sha256")
        small = small_length(request, min(config.max_json_bytes, config.max_result_bytes))
        if small is not None:
            # Read into memory (no more than any JSON body), then one worker call.
            data = await read_small(request)
            small_receipt: UploadReceipt = await run_in_threadpool(
                accept_small, who, lease_id, claimed, data
            )
            return small_receipt
        # Only the lease's holder may make the coordinator spool anything to disk.
        checked = await run_in_threadpool(farm.check_upload, who, lease_id)
        check_room(store, request, config.min_free_disk)
        body = await spool(store, request, config.max_result_bytes)
        receipt: UploadReceipt = await run_in_threadpool(
            farm.accept_result, who, lease_id, claimed, body, checked
        )
        return receipt

    def accept_small(
        who: Principal, lease_id: str, claimed: str | None, data: bytes
    ) -> UploadReceipt:
        """A small result read into memory: the same checks, in the same order, as a
        streamed one (the lease's holder, room on disk), then spooled and accepted."""
        checked = farm.check_upload(who, lease_id)
        store.check_room(len(data), config.min_free_disk)
        return farm.accept_result(who, lease_id, claimed, [data], checked)

    @api.post("/leases/{lease_id}/failure", status_code=204)
    def failure(lease_id: str, body: TaskFailure, who: Provider) -> Response:
        farm.report_failure(who, lease_id, body)
        return Response(status_code=204)

    @api.post("/leases/{lease_id}/release", status_code=204)
    def release(lease_id: str, who: Provider) -> Response:
        farm.release(who, lease_id)
        return Response(status_code=204)

    @api.get("/leases/{lease_id}/denoise-input")
    def denoise_input(lease_id: str, who: Provider) -> FileResponse:
        return FileResponse(farm.denoise_input(who, lease_id), media_type="image/x-exr")

    @api.get("/health", response_model=Health)
    def health() -> Health:
        return Health(status="ok", version=config.version, farm=config.farm_name)

    @api.get("/me", response_model=Me)
    def me(who: Who) -> Me:
        return Me(account=who.account, role=who.role)

    @api.post("/accounts", response_model=AccountToken, status_code=201)
    def create_account(body: AccountCreate, who: Admin) -> AccountToken:
        return farm.create_account(body.name, body.role)

    @api.get("/accounts", response_model=list[AccountInfo])
    def accounts(who: Admin) -> list[AccountInfo]:
        return farm.list_accounts(who)

    @api.post("/accounts/{name}/revoke", response_model=AccountInfo)
    def revoke_account(name: str, who: Admin) -> AccountInfo:
        """The account's token stops working at once, on every route (open long polls
        and event streams end too); the account and its history stay."""
        return farm.revoke_account(who, name)

    @api.post("/accounts/{name}/grant", response_model=Wallet)
    def grant(name: str, body: Grant, who: Admin) -> Wallet:
        return farm.grant_credits(who, name, body.amount)

    @api.get("/wallet", response_model=Wallet)
    def wallet(who: Who) -> Wallet:
        return farm.wallet(who)

    @api.post("/providers/{account}/reinstate", status_code=204)
    def reinstate(account: str, who: Admin) -> Response:
        farm.reinstate(who, account)
        return Response(status_code=204)

    # pools: any account creates one; its owner (or an admin) adds accounts to it

    @api.post("/pools", response_model=PoolInfo, status_code=201)
    def create_pool(body: PoolCreate, who: Who) -> PoolInfo:
        return farm.create_pool(who, body.name)

    @api.get("/pools", response_model=list[PoolInfo])
    def pools(who: Who) -> list[PoolInfo]:
        return farm.list_pools(who)

    @api.post("/pools/{name}/members", response_model=PoolInfo)
    def add_to_pool(name: str, body: PoolMember, who: Who) -> PoolInfo:
        return farm.add_to_pool(who, name, body.account)

    @api.delete("/pools/{name}/members/{account}", response_model=PoolInfo)
    def remove_from_pool(name: str, account: str, who: Who) -> PoolInfo:
        return farm.remove_from_pool(who, name, account)

    @api.get("/ledger/check", response_model=LedgerCheck)
    def ledger_check(who: Admin) -> LedgerCheck:
        return farm.ledger_check(who)

    # LAN join: a node that knows the farm's secret gets a provider token

    @api.get("/join/challenge", response_model=JoinChallenge)
    def join_challenge() -> JoinChallenge:
        return JoinChallenge(nonce=services.lan.challenge())

    @api.post("/join", response_model=AccountToken)
    def join(body: JoinRequest) -> AccountToken:
        return services.lan.join(body)

    # bundles

    @api.head("/bundles/{sha256}")
    def has_bundle(sha256: str, who: Requester) -> Response:
        # Lets a requester skip uploading a bundle the farm has (content-addressed: asking
        # needs the bundle's hash, i.e. its content). Downloads are checked below.
        return Response(status_code=200 if farm.bundles.exists(sha256) else 404)

    @api.put("/bundles/{sha256}")
    async def put_bundle(sha256: str, request: Request, who: Requester) -> dict[str, Any]:
        check_sha(sha256)
        check_room(store, request, config.min_free_disk)
        upload = await spool(store, request, config.max_bundle_bytes)
        try:
            size = await run_in_threadpool(farm.put_bundle, sha256, upload)
        finally:
            upload.path.unlink(missing_ok=True)
        return {"sha256": sha256, "size": size}

    @api.get("/bundles/{sha256}")
    def get_bundle(sha256: str, who: Who) -> FileResponse:
        check_sha(sha256)
        return FileResponse(farm.bundles.download(who, sha256), media_type="application/zip")

    # jobs

    @api.post("/jobs", response_model=Job, status_code=201)
    def submit(spec: JobSpec, who: Requester) -> Job:
        return farm.submit(who, spec)

    @api.post("/jobs/estimate", response_model=JobEstimate)
    def estimate(spec: JobSpec, who: Requester) -> JobEstimate:
        """What submitting `spec` would escrow, and the caller's balance (a dry run)."""
        return farm.estimate(who, spec)

    @api.get("/jobs", response_model=list[Job])
    def jobs(who: Who) -> list[Job]:
        return farm.jobs(who)

    @api.get("/jobs/{job_id}", response_model=Job)
    def job(job_id: str, who: Who) -> Job:
        return farm.job(who, job_id)

    @api.patch("/jobs/{job_id}", response_model=Job)
    def patch_job(job_id: str, body: JobPatch, who: Who) -> Job:
        if body.priority is not None:
            return farm.set_priority(who, job_id, body.priority)
        return farm.job(who, job_id)

    @api.post("/jobs/{job_id}/pause", response_model=Job)
    def pause(job_id: str, who: Who) -> Job:
        return farm.pause(who, job_id)

    @api.post("/jobs/{job_id}/resume", response_model=Job)
    def resume(job_id: str, who: Who) -> Job:
        return farm.resume(who, job_id)

    @api.post("/jobs/{job_id}/cancel", response_model=Job)
    def cancel(job_id: str, who: Who) -> Job:
        return farm.cancel(who, job_id)

    @api.get("/jobs/{job_id}/tasks", response_model=list[Task])
    def tasks(job_id: str, who: Who) -> list[Task]:
        return farm.tasks(who, job_id)

    @api.get("/jobs/{job_id}/frames", response_model=list[FrameState])
    def frames(job_id: str, who: Who) -> list[FrameState]:
        return farm.frames(who, job_id)

    @api.get("/jobs/{job_id}/frames/{frame}.{kind}")
    def frame_file(job_id: str, frame: int, kind: str, who: Who) -> FileResponse:
        path = farm.frame_file(who, job_id, frame, kind)
        return FileResponse(path, media_type="image/x-exr" if kind == "exr" else "image/png")

    @api.get("/jobs/{job_id}/deliverables", response_model=Deliverables)
    def deliverables(job_id: str, who: Who) -> Deliverables:
        return farm.deliverables(who, job_id)

    @api.get("/jobs/{job_id}/deliverables/{sha256}")
    def deliverable_file(job_id: str, sha256: str, who: Who) -> FileResponse:
        path = farm.deliverable_file(who, job_id, sha256)
        return FileResponse(path, media_type="application/octet-stream")

    @api.get("/tasks/{task_id}/preview.png")
    def task_preview(task_id: str, who: Who) -> FileResponse:
        return FileResponse(farm.task_preview(who, task_id), media_type="image/png")

    @api.get("/events")
    async def events(
        request: Request, who: Who, after: int = 0, job: str | None = None
    ) -> StreamingResponse:
        if job is not None:
            await run_in_threadpool(farm.job, who, job)
        return StreamingResponse(
            event_stream(farm, bus, request, who, after, job),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    return api
