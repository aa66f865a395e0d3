"""The typed HTTP client of the coordinator's API (v1), used by nodes, the CLI and the app.

Every method maps to one endpoint and returns a `protocol.models` object. A reply with
an error status raises `ApiError` carrying the server's message and hint; a coordinator
that cannot be reached raises `CoordinatorUnreachableError` after retrying idempotent
requests with exponential backoff. Idempotent requests are also retried, a bounded number
of times, on the answers that mean "not now": 429 (rate limited), 502/503/504 (overloaded
or restarting) and 507 (the coordinator's disk is full), waiting for their Retry-After
(capped at `max_retry_after`). Result uploads, failure reports and lease releases are
idempotent on the coordinator (a repeat gets the first answer), so a lost reply is
retried too. Bodies are streamed from and to files, never held whole in memory. No
Blender, no Qt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import requests
from pydantic import BaseModel

from common.errors import ApiError, BundleError, CoordinatorUnreachableError, UsageError
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
    Event,
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
    Role,
    Task,
    TaskFailure,
    UploadReceipt,
)
from protocol.output import (
    Deliverable,
    Deliverables,
)
from protocol.requirements import PoolCreate, PoolInfo, PoolMember

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
CHUNK = 1 << 20
SHA256_HEADER = "X-Content-SHA256"
#: Answers that mean "try again later" (rate limited, overloaded, restarting, disk full).
RETRY_LATER = frozenset({429, 502, 503, 504, 507})


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


#: Statuses after which another replica of the farm may do better (its load balancer or
#: this replica is overloaded or going away).
FAIL_OVER = frozenset({502, 503, 504})


def split_urls(text: str) -> list[str]:
    """The coordinator URLs in "URL1,URL2" (replicas of one farm), without trailing /."""
    return [part.strip().rstrip("/") for part in text.split(",") if part.strip()]


class TesseraClient:
    """A session with one coordinator, authenticated by a bearer token.

    `base_url` may name several replicas of one farm ("URL1,URL2"): a request that cannot
    reach one (or is answered 502/503/504) is retried, under the same retry rules, on
    the next, which then serves the following requests.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.5,
        verify: bool | str = True,
        max_retry_after: float = 10.0,
    ) -> None:
        self.base_urls = split_urls(base_url) or [base_url.rstrip("/")]
        self._current = 0
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_retry_after = max_retry_after
        self._session = requests.Session()
        self._session.verify = verify
        if token:
            self._session.headers["Authorization"] = f"Bearer {token}"

    @property
    def base_url(self) -> str:
        """The replica requests go to now."""
        return self.base_urls[self._current]

    def _fail_over(self) -> None:
        self._current = (self._current + 1) % len(self.base_urls)

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> TesseraClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- transport -------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return f"{self.base_url}{API_PREFIX}{path}"

    def _request(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
        ok: tuple[int, ...] = (200, 201, 204),
        **kwargs: Any,
    ) -> requests.Response:
        attempts = self.retries + 1 if idempotent else 1
        last_error: Exception | None = None
        body_factory: Callable[[], Any] | None = kwargs.pop("body_factory", None)
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            if body_factory is not None:
                kwargs["data"] = body_factory()  # a stream is spent by a failed attempt
            try:
                response = self._session.request(
                    method, self._url(path), timeout=timeout or self.timeout, **kwargs
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                last_error = exc
                self._fail_over()
                continue
            finally:
                if body_factory is not None:
                    kwargs["data"].close()
            if response.status_code in FAIL_OVER and len(self.base_urls) > 1:
                self._fail_over()
            if response.status_code in RETRY_LATER and attempt + 1 < attempts:
                retry_after = response.headers.get("Retry-After", "")
                if retry_after.isdigit():
                    time.sleep(min(float(retry_after), self.max_retry_after))
                response.close()
                continue
            if response.status_code not in ok:
                raise _api_error(response)
            return response
        raise CoordinatorUnreachableError(
            f"Cannot reach the coordinator at {', '.join(self.base_urls)} ({last_error})."
        )

    def _json(self, method: str, path: str, model: type[M], **kwargs: Any) -> M:
        response = self._request(method, path, **kwargs)
        return model.model_validate(response.json())

    def _list(self, path: str, model: type[M], **kwargs: Any) -> list[M]:
        response = self._request("GET", path, **kwargs)
        return [model.model_validate(item) for item in response.json()]

    @staticmethod
    def _body(model: BaseModel) -> dict[str, Any]:
        return {"data": model.model_dump_json(), "headers": {"Content-Type": "application/json"}}

    # --- general ---------------------------------------------------------------------------

    def health(self) -> Health:
        return self._json("GET", "/health", Health)

    def me(self) -> Me:
        return self._json("GET", "/me", Me)

    def create_account(self, name: str, role: str) -> AccountToken:
        body = AccountCreate.model_validate({"name": name, "role": role})
        return self._json("POST", "/accounts", AccountToken, idempotent=False, **self._body(body))

    def join_lan_farm(self, name: str, secret: str, role: Role = Role.PROVIDER) -> AccountToken:
        """Trade knowledge of a LAN farm's secret for a token (challenge-response): a
        provider's for a node, a requester's for submitting jobs."""
        from protocol.discovery import join_proof

        if role is Role.ADMIN:
            raise UsageError("Joining a LAN farm never makes an admin.")
        nonce = self._json("GET", "/join/challenge", JoinChallenge).nonce
        joining_as: Literal["provider", "requester"] = (
            "requester" if role is Role.REQUESTER else "provider"
        )
        request = JoinRequest(
            name=name, nonce=nonce, proof=join_proof(secret, nonce, name), role=joining_as
        )
        return self._json("POST", "/join", AccountToken, idempotent=False, **self._body(request))

    # --- credits ---------------------------------------------------------------------------

    def grant(self, account: str, amount: float) -> Wallet:
        """Give `amount` credits to `account` (admin only); the account's wallet after."""
        body = Grant(amount=amount)
        return self._json(
            "POST", f"/accounts/{account}/grant", Wallet, idempotent=False, **self._body(body)
        )

    def wallet(self) -> Wallet:
        return self._json("GET", "/wallet", Wallet)

    def ledger_check(self) -> LedgerCheck:
        return self._json("GET", "/ledger/check", LedgerCheck)

    def reinstate(self, account: str) -> None:
        """Lift a suspended provider's suspension (admin only)."""
        self._request("POST", f"/providers/{account}/reinstate", idempotent=True)

    # --- bundles -----------------------------------------------------------------------------

    def has_bundle(self, sha256: str) -> bool:
        response = self._request("HEAD", f"/bundles/{sha256}", ok=(200, 404))
        return response.status_code == 200

    def upload_bundle(
        self,
        path: Path,
        sha256: str | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> str:
        """Upload a bundle unless the coordinator already has it; returns its SHA-256."""
        digest = sha256 or sha256_file(path)
        if self.has_bundle(digest):
            return digest
        self._request(
            "PUT",
            f"/bundles/{digest}",
            body_factory=lambda: _FileBody(path, on_progress),
            headers={"Content-Type": "application/zip"},
            timeout=max(self.timeout, 600.0),
        )
        return digest

    def download_bundle(self, sha256: str, target: Path) -> Path:
        return self._download(f"/bundles/{sha256}", target, expected_sha256=sha256)

    # --- jobs ---------------------------------------------------------------------------------

    def submit_job(self, spec: JobSpec) -> Job:
        return self._json("POST", "/jobs", Job, idempotent=False, **self._body(spec))

    def estimate_job(self, spec: JobSpec) -> JobEstimate:
        """What submitting `spec` would escrow and the caller's balance; nothing is held
        and the bundle need not be uploaded yet."""
        return self._json("POST", "/jobs/estimate", JobEstimate, **self._body(spec))

    def jobs(self) -> list[Job]:
        return self._list("/jobs", Job)

    def job(self, job_id: str) -> Job:
        return self._json("GET", f"/jobs/{job_id}", Job)

    def tasks(self, job_id: str) -> list[Task]:
        return self._list(f"/jobs/{job_id}/tasks", Task)

    def frames(self, job_id: str) -> list[FrameState]:
        """Each frame's state (pending, denoising, done) and its accepted tiles."""
        return self._list(f"/jobs/{job_id}/frames", FrameState)

    def pause(self, job_id: str) -> Job:
        return self._json("POST", f"/jobs/{job_id}/pause", Job)

    def resume(self, job_id: str) -> Job:
        return self._json("POST", f"/jobs/{job_id}/resume", Job)

    def cancel(self, job_id: str) -> Job:
        return self._json("POST", f"/jobs/{job_id}/cancel", Job)

    def set_priority(self, job_id: str, priority: int) -> Job:
        return self._json(
            "PATCH", f"/jobs/{job_id}", Job, **self._body(JobPatch(priority=priority))
        )

    def download_frame(
        self,
        job_id: str,
        frame: int,
        target: Path,
        kind: str = "exr",
        expected_sha256: str | None = None,
    ) -> Path:
        """Download a finished frame's file; with `expected_sha256`, a body of another
        hash is refused and nothing is written."""
        return self._download(
            f"/jobs/{job_id}/frames/{frame}.{kind}", target, expected_sha256=expected_sha256
        )

    def deliverables(self, job_id: str) -> Deliverables:
        """Every file of a job so far (the scene's own files, raw EXRs, videos)."""
        return self._json("GET", f"/jobs/{job_id}/deliverables", Deliverables)

    def download_deliverable(self, job_id: str, file: Deliverable, target: Path) -> Path:
        """Download one deliverable to `target`, its hash checked (nothing written else)."""
        return self._download(
            f"/jobs/{job_id}/deliverables/{file.sha256}", target, expected_sha256=file.sha256
        )

    def download_task_preview(self, task_id: str, target: Path) -> Path:
        return self._download(f"/tasks/{task_id}/preview.png", target)

    def events(
        self, job_id: str | None = None, after: int = 0, timeout: float = 60.0
    ) -> Iterator[Event]:
        """Follow the live event stream (SSE); ends when the server closes it."""
        params: dict[str, Any] = {"after": after}
        if job_id:
            params["job"] = job_id
        response = self._request("GET", "/events", params=params, stream=True, timeout=timeout)
        with response:
            for line in response.iter_lines(decode_unicode=True):
                if line and line.startswith("data:"):
                    yield Event.model_validate(json.loads(line[5:]))

    # --- nodes --------------------------------------------------------------------------------

    def register_node(self, capabilities: NodeCapabilities) -> NodeRegistration:
        return self._json("POST", "/nodes", NodeRegistration, **self._body(capabilities))

    def nodes(self) -> list[NodeInfo]:
        return self._list("/nodes", NodeInfo)

    def lease(self, node_id: str, request: LeaseRequest) -> Lease | None:
        """Long-poll for a task; None when nothing matched within `request.wait` seconds."""
        response = self._request(
            "POST",
            f"/nodes/{node_id}/lease",
            idempotent=False,
            ok=(200, 204),
            timeout=self.timeout + request.wait,
            **self._body(request),
        )
        if response.status_code == 204:
            return None
        return Lease.model_validate(response.json())

    def stop_polling(self, node_id: str) -> None:
        """Tell the coordinator this node is stopping: its open long poll (or its next)
        ends at once with no task."""
        self._request("POST", f"/nodes/{node_id}/stop-polling", ok=(204,))

    def heartbeat(self, lease_id: str, beat: Heartbeat) -> HeartbeatReply:
        return self._json(
            "POST", f"/leases/{lease_id}/heartbeat", HeartbeatReply, **self._body(beat)
        )

    def upload_result(self, lease_id: str, path: Path, sha256: str | None = None) -> UploadReceipt:
        """Upload a task's EXR with its hash. Retried when the connection breaks, before or
        after the coordinator took it: a repeat of an accepted upload gets the original
        receipt (the coordinator keeps one per lease), never "lease is over" nor a second
        payment."""
        digest = sha256 or sha256_file(path)
        response = self._request(
            "PUT",
            f"/leases/{lease_id}/result",
            body_factory=lambda: _FileBody(path, None),
            headers={SHA256_HEADER: digest, "Content-Type": "image/x-exr"},
            timeout=max(self.timeout, 300.0),
        )
        return UploadReceipt.model_validate(response.json())

    def report_failure(self, lease_id: str, failure: TaskFailure) -> None:
        """Report a failed attempt. Retried: the coordinator records one failure per
        lease and answers a repeat (its reply was lost) with 204 again."""
        self._request("POST", f"/leases/{lease_id}/failure", **self._body(failure))

    def release(self, lease_id: str) -> None:
        """Hand a lease back unfinished (node shutting down); the task is re-queued.
        Retried: a repeat after a lost reply finds the lease gone (404), which a node
        takes as released."""
        self._request("POST", f"/leases/{lease_id}/release")

    def download_denoise_input(self, lease_id: str, target: Path) -> Path:
        return self._download(f"/leases/{lease_id}/denoise-input", target)

    # --- files ---------------------------------------------------------------------------------

    def _download(self, path: str, target: Path, expected_sha256: str | None = None) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        response = self._request("GET", path, stream=True, timeout=max(self.timeout, 300.0))
        digest = hashlib.sha256()
        try:
            with response, partial.open("wb") as handle:
                for block in response.iter_content(CHUNK):
                    digest.update(block)
                    handle.write(block)
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            partial.unlink(missing_ok=True)
            raise CoordinatorUnreachableError(
                f"The connection to {self.base_url} broke while downloading {path} ({exc})."
            ) from exc
        if expected_sha256 and digest.hexdigest() != expected_sha256:
            partial.unlink(missing_ok=True)
            raise BundleError(
                f"Download of {path} is corrupt: its SHA-256 is not {expected_sha256}.",
                hint="It will be downloaded again.",
            )
        partial.replace(target)
        return target

    # --- pools ---------------------------------------------------------------------------------

    def create_pool(self, name: str) -> PoolInfo:
        """A new pool owned by the caller's account."""
        body = PoolCreate(name=name)
        return self._json("POST", "/pools", PoolInfo, idempotent=False, **self._body(body))

    def pools(self) -> list[PoolInfo]:
        """The pools the caller owns or was added to (every pool for an admin)."""
        return self._list("/pools", PoolInfo)

    def add_to_pool(self, name: str, account: str) -> PoolInfo:
        """Add an account to a pool the caller owns (adding twice changes nothing)."""
        body = PoolMember(account=account)
        return self._json(
            "POST", f"/pools/{quote(name, safe='')}/members", PoolInfo, **self._body(body)
        )

    def remove_from_pool(self, name: str, account: str) -> PoolInfo:
        return self._json(
            "DELETE",
            f"/pools/{quote(name, safe='')}/members/{quote(account, safe='')}",
            PoolInfo,
            idempotent=False,
        )

    # --- accounts (admin) ----------------------------------------------------------------------

    def accounts(self) -> list[AccountInfo]:
        """Every account: name, role, created, revoked, balance (admin only)."""
        return self._list("/accounts", AccountInfo)

    def revoke_account(self, name: str) -> AccountInfo:
        """Revoke an account's token for good (admin only). Retried: revoking twice
        changes nothing."""
        return self._json("POST", f"/accounts/{name}/revoke", AccountInfo)


class _FileBody:
    """A file streamed as a request body with a known length (so requests sends
    Content-Length, not chunked encoding), reporting progress as it is read."""

    def __init__(self, path: Path, on_progress: Callable[[int, int], None] | None) -> None:
        self._handle = path.open("rb")
        self._size = path.stat().st_size
        self._sent = 0
        self._on_progress = on_progress

    def __len__(self) -> int:
        return self._size

    def read(self, size: int = -1) -> bytes:
        block = self._handle.read(size)
        self._sent += len(block)
        if self._on_progress is not None and block:
            self._on_progress(self._sent, self._size)
        return block

    def close(self) -> None:
        self._handle.close()


def _api_error(response: requests.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if isinstance(body, dict) and "detail" in body and "error" in body:
        return ApiError(
            str(body["detail"]), status=response.status_code, hint=str(body.get("hint") or "")
        )
    text = response.text.strip()[:500] or response.reason
    return ApiError(
        f"The coordinator answered {response.status_code}: {text}", status=response.status_code
    )
