"""The artist's deliverable through the farm: a job's frames come back as the files
Blender itself writes (compositor, colour management, format, names, File Output
nodes), beside the raw EXR of every pass, plus the scene's movie and a preview video.

Real coordinator on 127.0.0.1, real Blender (bpy 5.0.1), tiny scenes from
tests/finish_tools.py; Blender's own `-f N` render of each frame is the reference. One
test runs `tessera render` end to end (the real node's runner); the others serve the
coordinator with the test node of tests/farm_tools.py, which finishes as the node does.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from app.follow import follow_job, frame_folder
from coordinator.deliverables import check_finish_upload
from protocol.models import JobStatus
from renderers.scene_info import OutputInfo, inspect_scene
from renderers.video import probe_video
from renderers.worker import RenderWorker
from tests.farm_tools import (
    NodeThread,
    RunningCoordinator,
    job_spec,
    make_bundle,
    start_coordinator,
)
from tests.finish_tools import compare_images, make_finish_scenes, render_reference
from tests.scene_tools import prepare_scene

REPO = Path(__file__).resolve().parents[1]
CLI = "from app.cli import main; raise SystemExit(main())"
CASES = ["agx_punchy_png16", "file_output", "depth_normal", "movie"]
#: 16-bit PNG and EXR deliverables are exact; nothing rounds here.
EXACT = 0.0


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("deliverable-scenes")
    built = make_finish_scenes(folder, CASES)
    render_reference(
        [(built["agx_punchy_png16"], 1), (built["agx_punchy_png16"], 2)]
        + [(built[case], 1) for case in ("file_output", "depth_normal")],
        folder,
    )
    return built


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> RunningCoordinator:
    coordinator = start_coordinator(tmp_path_factory.mktemp("deliverable-farm"))
    yield coordinator
    coordinator.stop()


def _tokens(farm: RunningCoordinator, suffix: str) -> tuple[str, str]:
    """A requester of this job's own, and the module's one provider: with a second
    provider account, new providers' tiles would wait for duplicate samples."""
    with farm.client(farm.admin_token) as admin:
        requester = admin.create_account(f"artist-{suffix}", "requester").token
        if not PROVIDER:
            PROVIDER.append(admin.create_account("provider", "provider").token)
    return requester, PROVIDER[0]


PROVIDER: list[str] = []


def _render_on_farm(
    farm: RunningCoordinator,
    worker: RenderWorker,
    scene: Path,
    folder: Path,
    *,
    frames: str,
    tiles: tuple[int, int],
    **options: object,
) -> Path:
    """Submit `scene` as a finished job, serve it with one test node, follow it into
    folder/out; returns the job's folder there."""
    requester, provider = _tokens(farm, folder.name)
    info = inspect_scene(worker, scene)
    bundle, sha = make_bundle(scene, folder / "bundle")
    spec = job_spec(
        info, sha, frames=frames, tiles=tiles, percentage=100, samples=8, finish=True, **options
    )
    with farm.client(requester) as client:
        client.upload_bundle(bundle, sha)
        job = client.submit_job(spec)
        node = NodeThread(
            farm.client(provider),
            worker=worker,
            scene=scene,
            scratch=folder / "node",
            until_idle=10.0,  # the finish task follows the merge, on a busy machine too
        )
        deadline = time.monotonic() + 150
        try:
            result = follow_job(
                client,
                job.id,
                folder / "out",
                poll_interval=0.2,
                stop=lambda: time.monotonic() > deadline,
            )
        finally:
            node.join()
        tasks = [(t.kind.value, t.status.value, t.message) for t in client.tasks(job.id)]
        assert result.job.status is JobStatus.COMPLETED, (result.job.message, tasks)
        listing = client.deliverables(job.id)
    assert listing.scene == "scene"
    return frame_folder(folder / "out", result.job)


def _assert_equal_to_blender(scene: Path, delivered: Path, names: list[str], tmp: Path) -> None:
    pairs = [(scene.parent / name, delivered / name) for name in names]
    for report in compare_images(pairs, tmp):
        assert report["shape_a"] == report["shape_b"], report
        assert report["format_a"] == report["format_b"], report
        assert report["channels_a"] == report["channels_b"], report
        assert report["max_diff"] <= EXACT, report


def test_tessera_render_delivers_blenders_files_and_a_preview_video(
    scenes: dict[str, Path], tmp_path: Path
) -> None:
    """AgX + Punchy, glare and lens distortion, 16-bit PNG at //render/shot_####, in 2x2
    tiles on a real local farm: the farm's files are Blender's, pixel for pixel."""
    scene = scenes["agx_punchy_png16"]
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = [sys.executable, "-c", CLI, "render", str(scene), "--nodes", "1", "--json"]
    command += ["--frames", "1-2", "--tiles", "2x2", "--preview-video", "--out", str(out)]
    run = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    folder = out / "scene"
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    expected = ["frame_0001.exr", "frame_0002.exr", "preview_0001-0002.mp4"]
    assert files == [*expected, "render/shot_0001.png", "render/shot_0002.png"], (files, report)
    _assert_equal_to_blender(
        scene, folder, ["render/shot_0001.png", "render/shot_0002.png"], tmp_path
    )
    video = probe_video(folder / "preview_0001-0002.mp4")
    assert (video.width, video.height, video.frames) == (64, 48, 2)
    assert (video.codec, video.pixel_format) == ("h264", "yuv420p")


def test_file_output_nodes_and_depth_normal_passes_in_tiles(
    farm: RunningCoordinator, worker: RenderWorker, scenes: dict[str, Path], tmp_path: Path
) -> None:
    """File Output nodes write their files through the farm; a compositor that reads
    Depth and Normal gets them merged from 3x3 tiles."""
    for case, tiles in (("file_output", (2, 2)), ("depth_normal", (3, 3))):
        scene = scenes[case]
        delivered = _render_on_farm(farm, worker, scene, tmp_path / case, frames="1-1", tiles=tiles)
        expected = sorted(
            str(p.relative_to(scene.parent))
            for p in (scene.parent / "render").rglob("*")
            if p.is_file() and "0001" in p.name
        )
        assert expected, f"Blender wrote nothing for {case}"
        got = sorted(
            str(p.relative_to(delivered)) for p in (delivered / "render").rglob("*") if p.is_file()
        )
        assert got == expected, case
        assert (delivered / "frame_0001.exr").is_file()
        _assert_equal_to_blender(scene, delivered, expected, tmp_path / case)


def test_a_scene_from_blender_asset_tracers_suite_through_the_farm(
    farm: RunningCoordinator, worker: RenderWorker, bat_scenes: Path, tmp_path: Path
) -> None:
    """A real-world file (multiple materials, saved by another Blender) as 8-bit JPEG
    with the Standard view, in 3x3 tiles: Blender's file, to the 8-bit step."""
    (tmp_path / "bat").mkdir()
    scene = prepare_scene(
        bat_scenes / "multiple_materials.blend",
        tmp_path / "bat" / "scene.blend",
        add_camera=True,
        resolution_x=64,
        resolution_y=48,
        resolution_percentage=100,
        samples=8,
        adaptive=False,
        denoise=False,
        output_format="JPEG",
        filepath="//render/bat_####",
        view_transform="Standard",
    )
    render_reference([(scene, 1)], tmp_path / "bat")
    delivered = _render_on_farm(farm, worker, scene, tmp_path / "job", frames="1-1", tiles=(3, 3))
    assert (delivered / "render" / "bat_0001.jpg").is_file()
    pairs = [(scene.parent / "render" / "bat_0001.jpg", delivered / "render" / "bat_0001.jpg")]
    (report,) = compare_images(pairs, tmp_path)
    assert report["shape_a"] == report["shape_b"] and report["format_a"] == report["format_b"]
    assert report["max_diff"] <= 1 / 255, report


def test_a_movie_scene_delivers_its_movie(
    farm: RunningCoordinator, worker: RenderWorker, scenes: dict[str, Path], tmp_path: Path
) -> None:
    scene = scenes["movie"]
    delivered = _render_on_farm(farm, worker, scene, tmp_path, frames="1-4", tiles=(1, 1))
    movies = [p for p in delivered.rglob("*") if p.suffix in (".mp4", ".mkv", ".mov")]
    assert [m.relative_to(delivered).as_posix() for m in movies] == ["render/shot_0001-0004.mp4"]
    video = probe_video(movies[0])
    assert video.frames == 4
    frames = sorted(p.name for p in (delivered / "render").glob("shot_*.png"))
    assert frames == [f"shot_{n:04d}.png" for n in range(1, 5)]  # the lossless frames too


# --- a finish upload from a stranger --------------------------------------------------------


def _zip(entries: dict[str, bytes], manifest: object | None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        if manifest is not None:
            archive.writestr("manifest.json", json.dumps(manifest))
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def _manifest(*files: tuple[str, str]) -> dict[str, object]:
    return {"files": [{"path": p, "kind": k} for p, k in files]}


BAD_UPLOADS = {
    "not a zip": (b"not a zip at all", "not a readable zip"),
    "no manifest": (_zip({"render/a.png": _png(64, 48)}, None), "no manifest.json"),
    "climbs out": (
        _zip({"../a.png": _png(64, 48)}, _manifest(("../a.png", "frame"))),
        "not a relative path",
    ),
    "absolute": (
        _zip({"/etc/a.png": _png(64, 48)}, _manifest(("/etc/a.png", "frame"))),
        "not a relative path",
    ),
    "unlisted entry": (
        _zip(
            {"render/a.png": _png(64, 48), "extra.sh": b"#!"},
            _manifest(("render/a.png", "frame")),
        ),
        "do not match",
    ),
    "no frame": (
        _zip({"fo/a.png": _png(64, 48)}, _manifest(("fo/a.png", "file_output"))),
        "exactly one frame",
    ),
    "wrong size": (
        _zip({"render/a.png": _png(32, 32)}, _manifest(("render/a.png", "frame"))),
        "32x32 pixels",
    ),
    "bad manifest": (_zip({"a.png": _png(64, 48)}, {"files": "everything"}), "not valid"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_a_bad_finish_upload_is_refused_with_its_reason(case: str, tmp_path: Path) -> None:
    from tests.inprocess_farm import small_spec

    data, reason = BAD_UPLOADS[case]
    upload = tmp_path / "upload.zip"
    upload.write_bytes(data)
    spec = small_spec()  # 64x48 frames
    problem = check_finish_upload(upload, spec, max_bytes=1 << 20)
    assert problem is not None and reason in problem, problem


def test_a_sound_finish_upload_passes(tmp_path: Path) -> None:
    from tests.inprocess_farm import small_spec

    upload = tmp_path / "upload.zip"
    upload.write_bytes(
        _zip(
            {"render/a.png": _png(64, 48), "render/fo/b.png": _png(64, 48)},
            _manifest(("render/a.png", "frame"), ("render/fo/b.png", "file_output")),
        )
    )
    assert check_finish_upload(upload, small_spec(), max_bytes=1 << 20) is None


def _movie_output(container: str, codec: str) -> OutputInfo:
    return OutputInfo(
        media_type="VIDEO",
        file_format="FFMPEG",
        color_depth="8",
        color_mode="RGB",
        exr_codec="",
        filepath="//render/shot_####",
        frame_path="render/shot_####",
        path_error=None,
        view_transform="AgX",
        look="None",
        compositor=False,
        compositor_passes=(),
        file_outputs=(),
        movie={"container": container, "codec": codec, "fps": 24, "fps_base": 1.0},
        warnings=(),
        refusal=None,
    )


def test_an_old_files_unknown_movie_codec_still_delivers_its_frames() -> None:
    """blender-asset-tracer's files (and many old ones) name a codec Blender 5 does not
    know: no refusal, a warning, and no movie asked of the coordinator."""
    from app.job_spec import movie_name, movie_output
    from renderers.finish import check_finishable
    from renderers.scene_info import movie_problem

    unknown = _movie_output("MKV", "")
    check_finishable(unknown)  # no refusal
    problem = movie_problem(unknown)
    assert problem is not None and "frames are delivered as 16-bit PNG" in problem
    info = SimpleNamespace(output=unknown, frame_start=1, frame_end=4)
    assert movie_output(info) is None  # type: ignore[arg-type]
    known = SimpleNamespace(output=_movie_output("MPEG4", "H264"), frame_start=1, frame_end=4)
    movie = movie_output(known)  # type: ignore[arg-type]
    assert movie is not None and movie.name == "render/shot_0001-0004.mp4"
    assert movie_name("render/x", 7, 9, {"container": "MKV"}) == "render/x0007-0009.mkv"
