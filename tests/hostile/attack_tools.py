"""Helpers for the hostile tests: a real coordinator over HTTP only (stable surface:
`tests.farm_tools.start_coordinator`, `protocol.models` wire models, the /api/v1 API)."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import requests

from protocol.models import (
    FramePreview,
    FrameRange,
    JobSpec,
    Lease,
    NodeCapabilities,
    SceneSummary,
    TileGrid,
)
from tests.farm_tools import RunningCoordinator, start_coordinator

API = "/api/v1"


def call(
    url: str,
    method: str,
    path: str,
    token: str | None = None,
    *,
    json_body: Any = None,
    data: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> requests.Response:
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    return requests.request(
        method, f"{url}{API}{path}", json=json_body, data=data, headers=sent, timeout=timeout
    )


def fake_bundle(blend: bytes = b"BLENDER-v500" + bytes(64)) -> bytes:
    """A bundle zip holding a file that starts like a .blend."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("scene.blend", blend)
    return buffer.getvalue()


def spec(bundle_sha: str, name: str = "job", **fields: Any) -> dict[str, Any]:
    """A free (max_price 0) job of a 640x480 scene at 10% (64x48), 2x1 tiles, 1 frame."""
    scene_fields = fields.pop("scene", {})
    scene = SceneSummary(
        **{
            "name": "Scene",
            "frame_start": 1,
            "frame_end": 10,
            "resolution_x": 640,
            "resolution_y": 480,
            "resolution_percentage": 100,
            "samples": 8,
            "adaptive_sampling": False,
            "denoising": False,
            "camera": "Camera",
            **scene_fields,
        }
    )
    base: dict[str, Any] = {
        "name": name,
        "bundle": bundle_sha,
        "scene_path": "scene.blend",
        "scene": scene,
        "frames": FrameRange(start=1, end=1),
        "tiles": TileGrid(columns=2, rows=1),
        "percentage": 10,
        "max_price": 0,
    }
    base.update(fields)
    return JobSpec.model_validate(base).model_dump(mode="json")


def bright_previews(frames: range, size: int = 16) -> list[dict[str, Any]]:
    return [
        FramePreview(frame=f, width=size, height=size, luminance=[1.0] * size * size).model_dump(
            mode="json"
        )
        for f in frames
    ]


def caps(name: str) -> dict[str, Any]:
    return NodeCapabilities(name=name, blender_versions=["5.0.1"]).model_dump(mode="json")


def write_tile_exr(path: Path, rgba: npt.NDArray[np.floating[Any]]) -> bytes:
    """A one-part multilayer EXR as a node uploads (Blender's channel names)."""
    import OpenEXR

    channels = {
        f"ViewLayer.Combined.{c}": np.ascontiguousarray(rgba[..., i].astype(np.float32))
        for i, c in enumerate("RGBA")
    }
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    OpenEXR.File([OpenEXR.Part(header, channels, "ViewLayer.Combined")]).write(str(path))
    return path.read_bytes()


def rss_peak_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@dataclass
class HostileFarm:
    coordinator: RunningCoordinator
    admin: str

    @property
    def url(self) -> str:
        return self.coordinator.url

    def account(self, name: str, role: str) -> str:
        reply = call(
            self.url, "POST", "/accounts", self.admin, json_body={"name": name, "role": role}
        )
        assert reply.status_code == 201, reply.text
        return str(reply.json()["token"])

    def upload_bundle(self, token: str, data: bytes | None = None) -> str:
        data = fake_bundle() if data is None else data
        sha = hashlib.sha256(data).hexdigest()
        reply = call(self.url, "PUT", f"/bundles/{sha}", token, data=data)
        assert reply.status_code == 200, reply.text
        return sha

    def node(self, token: str, name: str) -> str:
        reply = call(self.url, "POST", "/nodes", token, json_body=caps(name))
        assert reply.status_code == 200, reply.text
        return str(reply.json()["node_id"])

    def submit(self, token: str, body: dict[str, Any]) -> str:
        reply = call(self.url, "POST", "/jobs", token, json_body=body)
        assert reply.status_code == 201, reply.text
        return str(reply.json()["id"])

    def lease(self, token: str, node: str) -> Lease | None:
        reply = call(self.url, "POST", f"/nodes/{node}/lease", token, json_body={"wait": 0})
        assert reply.status_code in (200, 204), reply.text
        if reply.status_code == 204 or not reply.content or reply.json() is None:
            return None
        return Lease.model_validate(reply.json())

    def upload(
        self, token: str, lease_id: str, data: bytes, sha: str | None = None
    ) -> requests.Response:
        digest = sha or hashlib.sha256(data).hexdigest()
        return call(
            self.url,
            "PUT",
            f"/leases/{lease_id}/result",
            token,
            data=data,
            headers={"X-Content-SHA256": digest},
        )

    def node_info(self, token: str, node: str) -> dict[str, Any]:
        nodes = call(self.url, "GET", "/nodes", token).json()
        return next(n for n in nodes if n["id"] == node)


@contextmanager
def hostile_farm(folder: Path, *options: str) -> Iterator[HostileFarm]:
    coordinator = start_coordinator(folder, *options)
    try:
        yield HostileFarm(coordinator, coordinator.admin_token)
    finally:
        coordinator.stop()


def raw_json(body: dict[str, Any], **replace: str) -> bytes:
    """`body` as JSON text with placeholder strings swapped for raw tokens (NaN, Infinity)."""
    text = json.dumps(body)
    for marker, raw in replace.items():
        text = text.replace(json.dumps(marker), raw)
    return text.encode()
