"""The installed Blender extension, driven inside the bpy module (a subprocess with a
throw-away HOME), against a real farm on 127.0.0.1.

- End to end: a scene whose only object is linked from a library is submitted with
  `bpy.ops.tessera.submit_job()` in background mode, a real `tessera node` renders it,
  the add-on follows the job and downloads the frame into the scene's output folder, and
  that frame equals a one-piece render of the same scene.
- Bad input (no token, a wrong token, an unreachable coordinator, an unsaved file, a
  scene without a camera, a missing texture): each is one error message, never a
  traceback, and the coordinator has no job and no bundle afterwards.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.addon_build import build_extension, install_extension
from app.local_farm import LocalFarm
from protocol.client import TesseraClient
from renderers.exr import read_exr
from renderers.local_render import LocalRenderOptions, render_frame_local
from renderers.worker import RenderWorker
from tests.farm_tools import start_coordinator
from tests.scene_tools import prepare_scene
from tests.test_addon import blender_env

DRIVER = r"""
import json, sys, time
import bpy

bpy.ops.wm.read_userpref()  # the bpy module starts with factory preferences
bpy.context.preferences.system.use_online_access = True
prefs = bpy.context.preferences.addons["bl_ext.user_default.tessera"].preferences
results = []
for case in json.loads(sys.argv[-1]):
    if case.get("scene"):
        bpy.ops.wm.open_mainfile(filepath=case["scene"], load_ui=False)
    else:
        bpy.ops.wm.read_homefile(use_empty=True)
    prefs.coordinator_url = case["url"]
    prefs.token = case["token"]
    scene = bpy.context.scene
    if case.get("output"):
        scene.render.filepath = case["output"]
    for key, value in case.get("settings", {}).items():
        setattr(scene.tessera, key, value)
    done = {"name": case["name"]}
    for op in case.get("before", []):
        try:
            done[op] = sorted(getattr(bpy.ops.tessera, op)())
        except RuntimeError as exc:
            done[op] = str(exc)
    try:
        done["result"] = sorted(bpy.ops.tessera.submit_job())
    except RuntimeError as exc:  # an operator's ERROR report raises here
        done["result"], done["error"] = ["CANCELLED"], str(exc)
    for op in case.get("after", []):
        try:
            result = sorted(getattr(bpy.ops.tessera, op)())
        except RuntimeError as exc:
            result = str(exc)
        done.setdefault("after", []).append([op, result, scene.tessera.job_status])
    if case.get("timer") and scene.tessera.last_job_id:
        # What bpy.app.timers does in the UI: the poll runs on a thread, its result is
        # applied on the next call; the timer stops itself when the job is finished.
        follow = sys.modules["bl_ext.user_default.tessera.follow"]
        deadline, calls = time.monotonic() + case["timer"], 0
        while time.monotonic() < deadline:
            calls += 1
            if follow._timer() is None:
                break
            time.sleep(0.2)
        done["timer_calls"] = calls
    if case.get("follow") and scene.tessera.last_job_id:
        deadline = time.monotonic() + case["follow"]
        while time.monotonic() < deadline:
            try:
                bpy.ops.tessera.refresh_job()
            except RuntimeError as exc:
                done.setdefault("refresh_errors", []).append(str(exc))
            if scene.tessera.job_status in ("completed", "failed", "canceled"):
                break
            time.sleep(0.5)
        try:
            done["open"] = sorted(bpy.ops.tessera.open_last_frame())
        except RuntimeError as exc:
            done["open"] = str(exc)
    operators = sys.modules["bl_ext.user_default.tessera.operators"]
    for checked in case.get("preview_video", []):
        scene.tessera.preview_video = checked
        done.setdefault("preview_video", []).append(
            operators._job_spec(scene).get("preview_video", "absent")
        )
    settings = scene.tessera
    done.update(
        job_id=settings.last_job_id,
        status=settings.job_status,
        frames_done=settings.frames_done,
        frames_total=settings.frames_total,
        last_frame=settings.last_frame_path,
        missing=settings.missing_files,
        estimate_text=settings.estimate,
        connection=prefs.connection_status,
        images=[image.filepath for image in bpy.data.images],
    )
    results.append(done)
print("DRIVER " + json.dumps(results), flush=True)
"""


def drive(home: Path, cases: list[dict[str, Any]], timeout: float = 400) -> list[dict[str, Any]]:
    """Run the cases in the bpy module with the extension installed under `home`."""
    script = home / "driver.py"
    script.write_text(DRIVER)
    completed = subprocess.run(
        [sys.executable, str(script), json.dumps(cases)],
        env=blender_env(home),
        cwd=home,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = [x for x in completed.stdout.splitlines() if x.startswith("DRIVER ")]
    assert completed.returncode == 0 and lines, (completed.stdout + completed.stderr)[-4000:]
    assert "Traceback" not in completed.stderr + completed.stdout, completed.stderr[-4000:]
    return list(json.loads(lines[-1][len("DRIVER ") :]))


@pytest.fixture(scope="module")
def addon_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HOME with the extension built, installed and enabled."""
    home = tmp_path_factory.mktemp("addon-home")
    built = build_extension(tmp_path_factory.mktemp("addon-zip"))
    assert install_extension(built, env=blender_env(home), use_bpy=True).enabled
    return home


@pytest.fixture(scope="module")
def scenes(bat_scenes: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A linked-library shot (with its library beside it), one without a camera, and one
    whose textures are missing; 64x48 at 4 samples."""
    root = tmp_path_factory.mktemp("addon-scenes")
    for name in ("linked_cube.blend", "basic_file.blend", "missing_textures.blend"):
        shutil.copy(bat_scenes / name, root / name)
    small = {
        "resolution_x": 64,
        "resolution_y": 48,
        "resolution_percentage": 100,
        "samples": 4,
        "denoise": False,
        "adaptive": False,
    }
    return {
        "linked": prepare_scene(
            root / "linked_cube.blend",
            root / "shot.blend",
            add_camera=True,
            film_transparent=True,
            **small,
        ),
        "no_camera": prepare_scene(
            root / "basic_file.blend", root / "no_camera.blend", remove_camera=True, **small
        ),
        "missing": prepare_scene(
            root / "missing_textures.blend", root / "missing.blend", add_camera=True, **small
        ),
    }


@pytest.fixture()
def farm(tmp_path: Path) -> Iterator[LocalFarm]:
    with LocalFarm(
        tmp_path / "farm", nodes=1, threads_per_node=2, node_args=["--no-benchmark"], credits=100
    ) as running:
        yield running


def test_a_linked_scene_submitted_from_blender_comes_back_as_the_one_piece_render(
    addon_home: Path, scenes: dict[str, Path], farm: LocalFarm, worker: RenderWorker, tmp_path: Path
) -> None:
    output = tmp_path / "frames"
    output.mkdir()
    # A frame of an earlier job in the same output folder is replaced, not kept.
    (output / "frame_0001.exr").write_bytes(b"an older job's frame")
    (case,) = drive(
        addon_home,
        [
            {
                "name": "linked",
                "scene": str(scenes["linked"]),
                "url": farm.url,
                "token": farm.requester_token,
                "output": f"{output}/",
                "settings": {
                    "use_scene_range": False,
                    "frames": "1",
                    "use_max_credits": True,
                    "max_credits": 50.0,
                },
                "before": ["test_connection", "estimate"],
                "timer": 240,
                "follow": 30,
            }
        ],
    )
    assert case["test_connection"] == ["FINISHED"], case
    assert case["connection"].startswith("Connected as local (requester); balance 100.00"), case
    assert case["estimate"] == ["FINISHED"], case
    assert case["estimate_text"] == "at most 0.00 credits; balance 100.00", case
    assert case["result"] == ["FINISHED"], case
    assert case["job_id"], case
    with TesseraClient(farm.url, farm.requester_token) as client:
        job = client.job(case["job_id"])
    assert job.status.value == "completed", job.message
    assert job.spec.scene_path == "shot.blend"
    assert (job.spec.frames.start, job.spec.frames.end) == (1, 1)
    assert case["timer_calls"] > 1, "the timer polled on a thread until the job finished"
    assert "refresh_errors" not in case, case
    assert case["status"] == "completed" and case["frames_done"] == case["frames_total"] == 1
    # The scene's own file where Blender writes it (output path "frames/" -> 0001.png),
    # the raw EXR of every pass beside it.
    delivered, frame_path = output / "0001.png", output / "frame_0001.exr"
    assert case["last_frame"] == str(delivered) and delivered.is_file(), case
    assert frame_path.is_file()
    assert case["open"] == ["FINISHED"] and str(delivered) in case["images"]

    # The frame equals a one-piece render of the same (saved) scene with the same settings.
    reference_path = tmp_path / "reference.exr"
    render_frame_local(
        worker,
        scenes["linked"],
        reference_path,
        LocalRenderOptions(frame=1, preview=False),
    )
    farm_frame, reference = read_exr(frame_path), read_exr(reference_path)
    assert (farm_frame.width, farm_frame.height) == (64, 48)
    assert [p.name for p in farm_frame.parts] == [p.name for p in reference.parts]
    assert np.array_equal(farm_frame.combined_rgba(), reference.combined_rgba())
    alpha = farm_frame.combined_rgba()[..., 3]
    assert np.count_nonzero(alpha > 0.5) > alpha.size // 50, "the linked object is missing"


def test_bad_input_is_one_clear_message_and_nothing_is_uploaded(
    addon_home: Path, scenes: dict[str, Path], tmp_path: Path
) -> None:
    coordinator = start_coordinator(tmp_path / "coordinator")
    try:
        with coordinator.client(coordinator.admin_token) as admin:
            token = admin.create_account("artist", "requester").token
            admin.grant("artist", 100)
        good = {"scene": str(scenes["linked"]), "url": coordinator.url, "token": token}
        cases = [
            {**good, "name": "no token", "token": ""},
            {**good, "name": "wrong token", "token": "not-a-valid-token"},
            {**good, "name": "unreachable", "url": "http://127.0.0.1:9"},
            {**good, "name": "unsaved", "scene": None},
            {**good, "name": "no camera", "scene": str(scenes["no_camera"])},
            {**good, "name": "missing texture", "scene": str(scenes["missing"])},
        ]
        results = {case["name"]: case for case in drive(addon_home, cases)}
        expected = {
            "no token": "No Tessera token",
            "wrong token": "refused the Tessera token (401)",
            "unreachable": "Cannot reach the Tessera coordinator at http://127.0.0.1:9",
            "unsaved": "never saved",
            "no camera": "no active camera",
            "missing texture": "are missing",
        }
        for name, words in expected.items():
            case = results[name]
            assert case["result"] == ["CANCELLED"], case
            error = case["error"]
            assert error.startswith("Error: ") and words in error, (name, error)
            assert "\n" not in error.strip(), f"{name}: more than one message: {error!r}"
            assert "Traceback" not in error and not case["job_id"], case
        assert results["missing texture"]["missing"], "the panel lists the missing files"
        with coordinator.client(coordinator.admin_token) as admin:
            assert admin.jobs() == []
        store = coordinator.data_dir / "store"
        assert not [p for p in store.rglob("*") if p.is_file()], "a bundle was uploaded"
    finally:
        coordinator.stop()


JOIN_SCRIPT = r"""
import importlib.machinery, json, sys
import bpy


class OnlyTheWheels:
    # The test's venv has a compiled zeroconf too: hide it, as a bare Blender has none.
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] not in ("zeroconf", "ifaddr") or path is not None:
            return None
        wheels = [p for p in sys.path if "/extensions/.local/" in p]
        spec = importlib.machinery.PathFinder.find_spec(name, wheels)
        if spec is None:
            raise ModuleNotFoundError(name)
        return spec


sys.meta_path.insert(0, OnlyTheWheels)
assert not [m for m in sys.modules if m.split(".")[0] in ("zeroconf", "ifaddr")]
bpy.ops.wm.read_userpref()
bpy.context.preferences.system.use_online_access = True
prefs = bpy.context.preferences.addons["bl_ext.user_default.tessera"].preferences
prefs.join_name = "artist"
prefs.lan_interface = "127.0.0.1"
out = {}
for case in json.loads(sys.argv[-1]):
    prefs.coordinator_url = case["url"]
    prefs.farm_name = case["farm"]
    prefs.farm_secret = case["secret"]
    prefs.token = ""
    try:
        result = sorted(bpy.ops.tessera.join_farm())
    except RuntimeError as exc:
        result = str(exc)
    test = sorted(bpy.ops.tessera.test_connection()) if prefs.token else None
    out[case["name"]] = {
        "result": result,
        "test": test,
        "status": prefs.connection_status,
        "url": prefs.coordinator_url,
        "token": bool(prefs.token),
    }
import zeroconf
out["zeroconf"] = zeroconf.__file__
out["compiled"] = [m for m in sys.modules if m.startswith("zeroconf") and
                   str(getattr(sys.modules[m], "__file__", "")).endswith(".so")]
print("JOIN " + json.dumps(out), flush=True)
"""


def test_joining_a_lan_farm_by_name_or_by_url_with_its_secret_saves_a_token(
    addon_home: Path, tmp_path: Path
) -> None:
    """By name: the vendored pure-Python zeroconf (bound to 127.0.0.1) finds the farm's
    advert and the coordinator URL is saved with the token; by URL as before; a wrong
    secret is refused either way with one message."""
    coordinator = start_coordinator(
        tmp_path / "coordinator",
        "--lan",
        "--farm",
        "studio",
        "--secret",
        "open-sesame",
        "--interface",
        "127.0.0.1",
    )
    try:
        elsewhere = "http://127.0.0.1:9"
        cases = [
            {"name": "url, wrong secret", "url": coordinator.url, "farm": "", "secret": "bad"},
            {"name": "url", "url": coordinator.url, "farm": "", "secret": "open-sesame"},
            {"name": "lan, wrong secret", "url": elsewhere, "farm": "studio", "secret": "bad"},
            {"name": "lan", "url": elsewhere, "farm": "studio", "secret": "open-sesame"},
        ]
        script = tmp_path / "join.py"
        script.write_text(JOIN_SCRIPT)
        completed = subprocess.run(
            [sys.executable, str(script), json.dumps(cases)],
            env=blender_env(addon_home),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        lines = [x for x in completed.stdout.splitlines() if x.startswith("JOIN ")]
        assert lines, (completed.stdout + completed.stderr)[-3000:]
        assert "Traceback" not in completed.stderr, completed.stderr[-3000:]
        out = json.loads(lines[-1][len("JOIN ") :])
        assert "Wrong farm secret" in out["url, wrong secret"]["result"], out
        wrong = out["lan, wrong secret"]
        assert "No coordinator of farm 'studio' with that secret" in wrong["result"], out
        assert "farms seen: studio" in wrong["result"] and not wrong["token"], out
        for name in ("url", "lan"):
            case = out[name]
            assert case["result"] == ["FINISHED"] and case["token"], (name, case)
            assert case["test"] == ["FINISHED"], (name, case)
            assert case["url"] == coordinator.url, (name, case)
            assert case["status"].startswith("Connected as lan-user-artist (requester)"), case
        assert "/extensions/.local/" in out["zeroconf"], out["zeroconf"]
        assert out["compiled"] == [], "the vendored zeroconf is the pure-Python one"
    finally:
        coordinator.stop()


def test_pause_resume_and_cancel_from_blender(
    addon_home: Path, scenes: dict[str, Path], tmp_path: Path
) -> None:
    """No node: the job waits, so the panel's buttons act on a queued job."""
    coordinator = start_coordinator(tmp_path / "coordinator")
    try:
        with coordinator.client(coordinator.admin_token) as admin:
            token = admin.create_account("artist", "requester").token
        (case,) = drive(
            addon_home,
            [
                {
                    "name": "controls",
                    "scene": str(scenes["linked"]),
                    "url": coordinator.url,
                    "token": token,
                    "output": f"{tmp_path / 'frames'}/",
                    "settings": {"split": "TILES", "tiles_x": 2, "tiles_y": 2, "priority": 80},
                    "after": ["pause_job", "resume_job", "cancel_job", "open_last_frame"],
                    "preview_video": [False, True],
                }
            ],
        )
        assert case["result"] == ["FINISHED"], case
        assert case["preview_video"] == ["absent", True], "sent only when checked"
        after = {op: (result, status) for op, result, status in case["after"]}
        assert after["pause_job"] == (["FINISHED"], "paused"), case
        assert after["resume_job"][0] == ["FINISHED"], case
        assert after["resume_job"][1] in ("queued", "active"), case
        assert after["cancel_job"] == (["FINISHED"], "canceled"), case
        result, _status = after["open_last_frame"]
        assert result.strip() == "Error: No finished frame of the last job has been downloaded yet."
        with coordinator.client(token) as client:
            job = client.job(case["job_id"])
        assert job.status.value == "canceled"
        assert (job.spec.tiles.columns, job.spec.tiles.rows) == (2, 2)
        assert job.priority == 80
    finally:
        coordinator.stop()
