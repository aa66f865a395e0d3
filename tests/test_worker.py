"""The warm render worker against real Blender: protocol, progress, crashes, timeouts,
cancellation, the scrubbed environment, and memory over many renders."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from common.errors import (
    RenderCancelledError,
    RenderTimeoutError,
    UsageError,
    WorkerCrashedError,
    WorkerStartError,
)
from renderers.builds import BlenderBuild
from renderers.exr import read_exr
from renderers.regions import PixelRect, border_fractions
from renderers.worker import (
    Progress,
    RenderRequest,
    RenderWorker,
    cpu_pinning_env,
    parse_cpu_list,
    scrubbed_environment,
)

# Enough samples that a 64x48 render runs for many seconds: time to kill or cancel it.
ENDLESS_SAMPLES = 1_000_000


def _request(scene: Path, out: Path, **overrides: object) -> RenderRequest:
    options: dict[str, object] = {
        "scene": scene,
        "frame": 1,
        "output": out,
        "samples": 4,
        "percentage": 10,
    }
    options.update(overrides)
    return RenderRequest(**options)  # type: ignore[arg-type]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_hello_reports_the_blender_build(worker: RenderWorker) -> None:
    reply = worker.hello()
    assert reply["version"] == "5.0.1"
    assert len(reply["build_hash"]) == 12


def test_render_writes_a_multilayer_exr_with_blender_naming(
    worker: RenderWorker, demo_scene: Path, tmp_path: Path
) -> None:
    progress: list[Progress] = []
    result = worker.render(_request(demo_scene, tmp_path / "f.exr"), on_progress=progress.append)
    image = read_exr(result.output)
    assert (image.width, image.height) == (64, 36) == (result.frame_width, result.frame_height)
    assert {"ViewLayer.Combined.R", "ViewLayer.Combined.A"} <= set(image.channel_names())
    assert progress, "the worker reports sample progress"
    assert all(p.samples_total == 4 for p in progress)


def test_border_render_is_cropped_to_the_region(
    worker: RenderWorker, demo_scene: Path, tmp_path: Path
) -> None:
    rect = PixelRect(10, 5, 30, 20)
    result = worker.render(
        _request(demo_scene, tmp_path / "t.exr", border=border_fractions(rect, 64, 36))
    )
    image = read_exr(result.output)
    assert (image.width, image.height) == (rect.width, rect.height)


def test_overrides_do_not_leak_into_the_next_request(
    worker: RenderWorker, demo_scene: Path, tmp_path: Path
) -> None:
    worker.render(_request(demo_scene, tmp_path / "a.exr", percentage=5))
    result = worker.render(_request(demo_scene, tmp_path / "b.exr", percentage=None, samples=1))
    assert (result.frame_width, result.frame_height) == (640, 360)


def test_killed_worker_is_reported_and_the_next_request_starts_a_new_one(
    fresh_worker: RenderWorker, demo_scene: Path, tmp_path: Path
) -> None:
    def kill_blender(_: Progress) -> None:
        assert fresh_worker.pid is not None
        os.kill(fresh_worker.pid, signal.SIGKILL)

    with pytest.raises(WorkerCrashedError, match="SIGKILL"):
        fresh_worker.render(
            _request(
                demo_scene, tmp_path / "x.exr", samples=ENDLESS_SAMPLES, adaptive_sampling=False
            ),
            on_progress=kill_blender,
        )
    assert not fresh_worker.is_alive()
    result = fresh_worker.render(_request(demo_scene, tmp_path / "y.exr"))
    assert result.output.exists()
    assert fresh_worker.starts == 2


def test_timeout_kills_the_whole_process_group(
    fresh_worker: RenderWorker, demo_scene: Path, tmp_path: Path
) -> None:
    fresh_worker.start()
    pid = fresh_worker.pid
    assert pid is not None
    # Inside bubblewrap the sandbox's init leads Blender's process group (and session).
    leader = os.getpgid(pid)
    assert leader == pid or fresh_worker.sandboxed, "Blender leads its own process group"
    with pytest.raises(RenderTimeoutError, match="longer than 2 s"):
        fresh_worker.render(
            _request(
                demo_scene, tmp_path / "x.exr", samples=ENDLESS_SAMPLES, adaptive_sampling=False
            ),
            timeout=2,
        )
    assert not _pid_alive(pid)
    assert not _pid_alive(leader)
    assert fresh_worker.render(_request(demo_scene, tmp_path / "y.exr")).output.exists()


def test_cancel_from_another_thread_stops_the_render(
    fresh_worker: RenderWorker, demo_scene: Path, tmp_path: Path
) -> None:
    cancellers: list[threading.Thread] = []

    def cancel_soon(_: Progress) -> None:
        if not cancellers:
            cancellers.append(threading.Thread(target=fresh_worker.cancel))
            cancellers[0].start()

    with pytest.raises(RenderCancelledError):
        fresh_worker.render(
            _request(
                demo_scene, tmp_path / "x.exr", samples=ENDLESS_SAMPLES, adaptive_sampling=False
            ),
            on_progress=cancel_soon,
        )
    for thread in cancellers:
        thread.join()
    assert not fresh_worker.is_alive()


def test_environment_is_scrubbed(
    bpy_build: BlenderBuild, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TESSERA_SECRET_CANARY", "do-not-leak")
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    with RenderWorker(bpy_build, scratch_dir=tmp_path / "scratch") as own:
        own.start()
        environ = Path(f"/proc/{own.pid}/environ").read_bytes().split(b"\0")
    names = {entry.split(b"=", 1)[0].decode() for entry in environ if entry}
    assert "TESSERA_SECRET_CANARY" not in names
    assert "PYTHONPATH" not in names
    assert f"HOME={tmp_path / 'scratch'}".encode() in environ
    assert set(scrubbed_environment(tmp_path)) >= {"BLENDER_USER_SCRIPTS", "BLENDER_USER_CONFIG"}


def test_a_build_that_cannot_start_gives_a_clear_error(tmp_path: Path) -> None:
    broken = BlenderBuild(
        kind="executable", path=tmp_path / "no-such-blender", version="5.0.1", build_hash="unknown"
    )
    with RenderWorker(broken) as own, pytest.raises(WorkerStartError, match="no-such-blender"):
        own.start()


def test_two_hundred_renders_do_not_grow_memory(
    fresh_worker: RenderWorker, demo_scene: Path, tmp_path: Path
) -> None:
    rects = [PixelRect(x, y, x + 16, y + 12) for y in (0, 12, 24) for x in (0, 16, 32, 48)]
    samples_rss: list[int] = []
    for index in range(200):
        rect = rects[index % len(rects)]
        fresh_worker.render(
            _request(
                demo_scene,
                tmp_path / "t.exr",
                samples=1,
                frame=1 + index % 24,
                border=border_fractions(rect, 64, 36),
            )
        )
        if index in (19, 199):
            samples_rss.append(fresh_worker.rss_bytes())
    warm, final = samples_rss
    assert fresh_worker.starts == 1
    assert final <= warm * 1.10, f"RSS grew from {warm / 2**20:.0f} to {final / 2**20:.0f} MiB"


def test_cpu_lists_parse_and_bad_ones_say_why() -> None:
    assert parse_cpu_list("0") == [0]
    assert parse_cpu_list(" 0-1 ") == [0, 1]
    for bad, message in (
        ("a-b", "not a CPU list"),
        ("1-0", "backwards"),
        ("4096", "not available"),
    ):
        with pytest.raises(UsageError, match=message):
            parse_cpu_list(bad)


def test_worker_pinned_to_cpus_stays_on_them(bpy_build: BlenderBuild) -> None:
    with RenderWorker(bpy_build, extra_env=cpu_pinning_env([0])) as own:
        own.start()
        status = Path(f"/proc/{own.pid}/status").read_text()
    allowed = next(line for line in status.splitlines() if line.startswith("Cpus_allowed_list"))
    assert allowed.split(":")[1].strip() == "0"
