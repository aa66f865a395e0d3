"""The add-on brings a job's deliverables home (blender_addon/deliverables.py, fetch.py):
each file where Blender would have written it under the scene's output root, never
outside it, files already there with the right hash left alone, a corrupt download
thrown away, and frame-by-frame downloads when the coordinator answers 404 (it has no
deliverables API).

The coordinator is played by a tiny real HTTP server on 127.0.0.1 that serves the
deliverables API's wire format (`GET /api/v1/jobs/{id}/deliverables` and
`.../deliverables/{sha256}`) and counts what it is asked.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.test_addon import addon_module

JOB = "job-1"
TOKEN = "t0ken"


@dataclass
class FakeFarm:
    """What the server serves; `asked` counts every path requested."""

    files: dict[str, bytes] = field(default_factory=dict)  # sha256 -> bytes
    listing: list[dict[str, Any]] | None = None  # None: 404 (no deliverables API)
    frames: dict[str, bytes] = field(default_factory=dict)  # "1.exr" -> bytes
    corrupt: set[str] = field(default_factory=set)
    asked: list[str] = field(default_factory=list)
    url: str = ""

    def add(
        self, path: str, data: bytes, kind: str = "frame", frame: int | None = None
    ) -> dict[str, Any]:
        sha = hashlib.sha256(data).hexdigest()
        self.files[sha] = data
        entry = {"frame": frame, "path": path, "sha256": sha, "size": len(data), "kind": kind}
        self.listing = [*(self.listing or []), entry]
        return entry


def _handler(farm: FakeFarm) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            farm.asked.append(self.path)
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self._send(401, b'{"detail": "bad token"}')
                return
            prefix = f"/api/v1/jobs/{JOB}"
            if self.path == prefix:
                job = {"id": JOB, "status": "completed", "frames_done": [1], "progress": {}}
                self._send(200, json.dumps(job).encode())
            elif self.path == f"{prefix}/deliverables" and farm.listing is not None:
                self._send(200, json.dumps({"scene": "shot", "files": farm.listing}).encode())
            elif self.path.startswith(f"{prefix}/deliverables/"):
                sha = self.path.rsplit("/", 1)[1]
                data = farm.files.get(sha)
                if data is None:
                    self._send(404, b'{"detail": "no such file"}')
                else:
                    self._send(200, b"X" + data if sha in farm.corrupt else data, "image/png")
            elif self.path.startswith(f"{prefix}/frames/") and self.path.rsplit("/", 1)[1] in (
                farm.frames
            ):
                self._send(200, farm.frames[self.path.rsplit("/", 1)[1]], "image/x-exr")
            else:
                self._send(404, b'{"detail": "Not Found"}')

    return Handler


@pytest.fixture()
def farm() -> Iterator[FakeFarm]:
    state = FakeFarm()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def poll(farm: FakeFarm, blend: Path, render_path: str, done: frozenset[str] = frozenset()) -> Any:
    deliverables = addon_module("deliverables")
    fetch = addon_module("fetch")
    target = fetch.PollTarget(
        url=farm.url,
        token=TOKEN,
        job_id=JOB,
        frames_folder=blend.parent / "frames",
        kinds=("exr",),
        root=deliverables.output_root(render_path, str(blend)),
        downloaded_files=done,
    )
    return fetch.poll_job(target)


def downloads(farm: FakeFarm) -> list[str]:
    return [p for p in farm.asked if "/deliverables/" in p]


def test_deliverables_land_where_blender_would_write_them(farm: FakeFarm, tmp_path: Path) -> None:
    blend = tmp_path / "project" / "shot.blend"
    blend.parent.mkdir()
    frame = farm.add("render/shot_0001.png", b"png frame 1", "frame", 1)
    farm.add("render/shot_0002.png", b"png frame 2", "frame", 2)
    farm.add("comp/mask_0001.png", b"file output", "file_output", 1)
    farm.add("render/shot_0001-0002.mp4", b"mp4", "preview_video")
    # A stale file of an earlier render at one of the paths is replaced.
    (blend.parent / "render").mkdir()
    (blend.parent / "render" / "shot_0002.png").write_bytes(b"an older render")

    result = poll(farm, blend, "//render/shot_")
    assert result["error"] is None and result["refused"] == [], result
    for entry in farm.listing or []:
        written = blend.parent / entry["path"]
        assert written.read_bytes() == farm.files[entry["sha256"]], entry["path"]
    assert not list(tmp_path.rglob("*.part"))
    assert result["frames"] == [
        (1, str(blend.parent / "render/shot_0001.png")),
        (2, str(blend.parent / "render/shot_0002.png")),
    ]
    assert len(downloads(farm)) == 4

    # Next poll: what the scene remembers is not asked for again.
    again = poll(farm, blend, "//render/shot_", frozenset(result["files"]))
    assert again["error"] is None and len(downloads(farm)) == 4
    # Forgotten, but on disk with the right hash: still not downloaded again...
    poll(farm, blend, "//render/shot_")
    assert len(downloads(farm)) == 4
    # ...unless the file there is not the listed one.
    (blend.parent / frame["path"]).write_bytes(b"edited by hand")
    poll(farm, blend, "//render/shot_")
    assert downloads(farm)[-1].endswith(frame["sha256"]) and len(downloads(farm)) == 5
    assert (blend.parent / frame["path"]).read_bytes() == b"png frame 1"


def test_an_absolute_output_path_lands_in_that_folder(farm: FakeFarm, tmp_path: Path) -> None:
    """The farm drops an absolute path's root ('/x/renders/shot_' -> 'x/renders/...')."""
    blend = tmp_path / "project" / "shot.blend"
    blend.parent.mkdir()
    renders = tmp_path / "renders"
    relative = renders.as_posix().lstrip("/")
    farm.add(f"{relative}/shot_0001.png", b"frame", "frame", 1)
    farm.add("elsewhere/x.exr", b"raw", "raw_exr", 1)
    result = poll(farm, blend, f"{renders}/shot_")
    assert result["error"] is None and result["refused"] == [], result
    assert (renders / "shot_0001.png").read_bytes() == b"frame"
    assert (renders / "elsewhere" / "x.exr").read_bytes() == b"raw", "kept inside the folder"
    deliverables = addon_module("deliverables")
    root = deliverables.output_root(f"{renders}/", str(blend))
    assert root.folder == renders and root.strip == f"{relative}/"
    for beside_the_blend in ("", "//", "//render/shot_", "render/shot_", "/shot_"):
        assert deliverables.output_root(beside_the_blend, str(blend)).folder == blend.parent


@pytest.mark.parametrize(
    "path",
    [
        "../escape.png",
        "/etc/tessera-escape.png",
        "render/../../escape.png",
        "C:/escape.png",
        "render\\..\\escape.png",
        "render//double.png",
        "./dot.png",
        "new\nline.png",
        "link/escape.png",  # a link inside the output root that points outside it
    ],
)
def test_a_path_outside_the_output_root_is_refused(
    farm: FakeFarm, tmp_path: Path, path: str
) -> None:
    blend = tmp_path / "project" / "shot.blend"
    outside = tmp_path / "outside"
    blend.parent.mkdir()
    outside.mkdir()
    (blend.parent / "link").symlink_to(outside, target_is_directory=True)
    farm.add(path, b"evil", "file_output", 1)
    farm.add("render/shot_0001.png", b"good", "frame", 1)
    result = poll(farm, blend, "//render/shot_")
    assert result["error"] is None, result
    (refused,) = result["refused"]
    assert path[:20].split("\n", maxsplit=1)[0] in refused and "not written" in refused, refused
    assert (blend.parent / "render" / "shot_0001.png").read_bytes() == b"good"
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["shot_0001.png"]
    assert len(downloads(farm)) == 1, "the refused file is never even downloaded"


def test_a_corrupt_download_is_thrown_away(farm: FakeFarm, tmp_path: Path) -> None:
    blend = tmp_path / "project" / "shot.blend"
    blend.parent.mkdir()
    entry = farm.add("render/shot_0001.png", b"frame", "frame", 1)
    farm.corrupt.add(entry["sha256"])
    result = poll(farm, blend, "//render/shot_")
    assert "wrong content" in result["error"] and "shot_0001.png" in result["error"], result
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "nothing was written"


def test_a_coordinator_without_deliverables_gives_frames(farm: FakeFarm, tmp_path: Path) -> None:
    """404 on the list: today's frame downloads into the scene's output folder."""
    blend = tmp_path / "project" / "shot.blend"
    blend.parent.mkdir()
    farm.frames["1.exr"] = b"exr frame"
    result = poll(farm, blend, "//render/shot_")
    assert result["error"] is None and result["files"] == [], result
    frame = blend.parent / "frames" / "frame_0001.exr"
    assert frame.read_bytes() == b"exr frame"
    assert result["frames"] == [(1, str(frame))]
    assert f"/api/v1/jobs/{JOB}/deliverables" in farm.asked


@pytest.mark.parametrize(
    "listing",
    [
        {"nothing": []},
        {"files": [{"path": "a.png", "sha256": "zz", "size": 1, "kind": "frame"}]},
        {"files": [{"path": "a.png", "sha256": "a" * 64, "size": 1, "kind": "poster"}]},
        {"files": ["a.png"]},
    ],
)
def test_a_malformed_listing_is_one_message(listing: dict[str, Any]) -> None:
    deliverables = addon_module("deliverables")
    client = addon_module("client")
    with pytest.raises(client.FarmError, match="malformed"):
        deliverables.parse_listing(listing)


def test_preview_video_is_sent_only_when_checked() -> None:
    from tests.test_addon import SUMMARY

    spec = addon_module("spec")
    frames = spec.parse_frames("1")
    assert "preview_video" not in spec.build_spec(SUMMARY, name="x", frames=frames)
    asked = spec.build_spec(SUMMARY, name="x", frames=frames, preview_video=True)
    assert asked["preview_video"] is True
