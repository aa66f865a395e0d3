"""A small HTTP client of the Tessera coordinator's API (v1) for the Blender extension.

It speaks plain JSON dictionaries (no pydantic in Blender) and raises `FarmError` with one
readable sentence for everything that can go wrong: no token, a refused token (401), an
unreachable coordinator, a refusal with the coordinator's own message and hint. It uses
`requests`, which Blender's Python ships with. No bpy here: it runs on worker threads too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

API_PREFIX = "/api/v1"
CHUNK = 1 << 20
TIMEOUT = 30.0


class FarmError(Exception):
    """Something the artist must fix or know; `str()` is the one message to show."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def join_proof(secret: str, nonce: str, name: str) -> str:
    """HMAC of the coordinator's nonce and the joining name (as `tessera join` sends)."""
    return hmac.new(secret.encode(), f"{nonce}:{name}".encode(), hashlib.sha256).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class _UploadBody:
    """A file streamed with a known length, reporting (sent, total) as it is read."""

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
        if block and self._on_progress is not None:
            self._on_progress(self._sent, self._size)
        return block

    def close(self) -> None:
        self._handle.close()


class FarmClient:
    """One coordinator, one bearer token. Every method raises `FarmError` on failure."""

    def __init__(self, url: str, token: str = "", *, timeout: float = TIMEOUT) -> None:
        url = (url or "").strip().rstrip("/")
        if not url:
            raise FarmError("No coordinator URL: set it in the Tessera add-on's preferences.")
        if not url.startswith(("http://", "https://")):
            url = f"http://{url}"
        self.url = url
        self.token = (token or "").strip()
        self.timeout = timeout
        self._session = requests.Session()
        if self.token:
            self._session.headers["Authorization"] = f"Bearer {self.token}"

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> FarmClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- transport ---------------------------------------------------------------------

    def require_token(self) -> None:
        if not self.token:
            raise FarmError(
                "No Tessera token: paste one in the add-on's preferences (or join a LAN farm"
                " with its secret)."
            )

    def request(
        self,
        method: str,
        path: str,
        *,
        ok: tuple[int, ...] = (200, 201, 204),
        timeout: float | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        try:
            response = self._session.request(
                method, f"{self.url}{API_PREFIX}{path}", timeout=timeout or self.timeout, **kwargs
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise FarmError(
                f"Cannot reach the Tessera coordinator at {self.url}: is it running, and is the"
                " URL right?"
            ) from exc
        except requests.RequestException as exc:
            raise FarmError(f"Talking to the coordinator at {self.url} failed: {exc}") from exc
        if response.status_code not in ok:
            raise _error(response)
        return response

    def json(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        if body is not None:
            kwargs["data"] = json.dumps(body)
            kwargs["headers"] = {"Content-Type": "application/json"}
        response = self.request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError as exc:
            raise FarmError(f"{self.url} did not answer like a Tessera coordinator.") from exc

    # --- accounts ----------------------------------------------------------------------

    def me(self) -> dict[str, Any]:
        self.require_token()
        return dict(self.json("GET", "/me"))

    def wallet(self) -> dict[str, Any]:
        self.require_token()
        return dict(self.json("GET", "/wallet"))

    def join(self, name: str, secret: str) -> str:
        """Trade the farm's secret for a requester token (challenge-response)."""
        if not secret:
            raise FarmError("No farm secret: type the secret the farm was started with.")
        nonce = self.json("GET", "/join/challenge")["nonce"]
        body = {
            "name": name,
            "nonce": nonce,
            "proof": join_proof(secret, nonce, name),
            "role": "requester",
        }
        return str(self.json("POST", "/join", body)["token"])

    # --- bundles and jobs --------------------------------------------------------------

    def has_bundle(self, sha256: str) -> bool:
        self.require_token()
        return self.request("HEAD", f"/bundles/{sha256}", ok=(200, 404)).status_code == 200

    def upload_bundle(
        self, path: Path, sha256: str, on_progress: Callable[[int, int], None] | None = None
    ) -> bool:
        """Upload unless the coordinator has it; True when bytes were sent."""
        if self.has_bundle(sha256):
            return False
        body = _UploadBody(path, on_progress)
        try:
            self.request(
                "PUT",
                f"/bundles/{sha256}",
                data=body,
                headers={"Content-Type": "application/zip"},
                timeout=max(self.timeout, 600.0),
            )
        finally:
            body.close()
        return True

    def estimate(self, spec: dict[str, Any]) -> dict[str, Any]:
        self.require_token()
        return dict(self.json("POST", "/jobs/estimate", spec))

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        self.require_token()
        return dict(self.json("POST", "/jobs", spec))

    def job(self, job_id: str) -> dict[str, Any]:
        self.require_token()
        return dict(self.json("GET", f"/jobs/{job_id}"))

    def control(self, job_id: str, action: str) -> dict[str, Any]:
        """`pause`, `resume` or `cancel`."""
        self.require_token()
        return dict(self.json("POST", f"/jobs/{job_id}/{action}"))

    def download_frame(self, job_id: str, frame: int, target: Path, kind: str = "exr") -> Path:
        """Download atomically (`<name>.part`, then renamed)."""
        self.require_token()
        return self._download(
            f"/jobs/{job_id}/frames/{frame}.{kind}", target, None, f"frame {frame}"
        )

    def download_checked(self, path: str, target: Path, sha256: str) -> Path:
        """Download `path` to `target` atomically; bytes that do not hash to `sha256` are
        thrown away (FarmError) and `target` is left as it was."""
        self.require_token()
        return self._download(path, target, sha256, target.name)

    def _download(self, path: str, target: Path, sha256: str | None, what: str) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        response = self.request("GET", path, stream=True, timeout=300.0)
        digest = hashlib.sha256()
        try:
            with response, partial.open("wb") as handle:
                for block in response.iter_content(CHUNK):
                    digest.update(block)
                    handle.write(block)
        except requests.RequestException as exc:
            partial.unlink(missing_ok=True)
            raise FarmError(f"The download of {what} broke off ({exc}).") from exc
        if sha256 is not None and digest.hexdigest() != sha256:
            partial.unlink(missing_ok=True)
            raise FarmError(
                f"The coordinator sent {what} with the wrong content (its SHA-256 differs"
                " from the listed one); it was not written and is fetched again next time."
            )
        partial.replace(target)
        return target


def _error(response: requests.Response) -> FarmError:
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = hint = ""
    if isinstance(body, dict):
        raw = body.get("detail", "")
        detail = raw if isinstance(raw, str) else json.dumps(raw)[:300]
        hint = str(body.get("hint") or "")
    if status == 401:
        message = "The coordinator refused the Tessera token (401): check it in the preferences."
        if detail and "token" not in detail.lower():
            message = f"The coordinator refused the request (401): {detail}"
        return FarmError(message, status=status)
    text = detail or response.text.strip()[:300] or response.reason
    message = f"The coordinator refused: {text}"
    if hint:
        message += f" ({hint})"
    return FarmError(message, status=status)
