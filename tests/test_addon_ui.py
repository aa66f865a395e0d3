"""The add-on's UI-mode paths, in a real Blender with its UI (Debian's Blender on a
virtual X display), which the bpy module (always background) cannot run:

- *Join Farm* by the farm's name: zeroconf (the vendored wheel, bound to 127.0.0.1)
  finds the real coordinator's advert on a thread, and a modal timer saves its URL and
  the token;
- *Submit to Tessera* invoked on an unsaved file says to save it first; on a file with
  unsaved changes it asks first (Blender's confirm popup, answered with the keyboard by
  xdotool), then saves, packs and uploads on a thread with a modal timer (the UI keeps
  running) and submits to a real coordinator on 127.0.0.1;
- following the job with `bpy.app.timers`: the poll runs on a thread, the deliverables
  land under the scene's output root, and the timer stops itself once the job is done
  (the coordinator here is the tiny deliverables server of test_addon_deliverables.py,
  whose job is already finished).

The add-on is loaded the legacy way (as resources/addon_screenshot.py does: Debian's
Blender predates extensions), with the vendored wheels on its path. Skipped where
`blender`, `Xvfb` or `xdotool` is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from app.addon_build import SOURCE, build_extension
from resources.addon_screenshot import BL_INFO
from tests.farm_tools import start_coordinator
from tests.test_addon_deliverables import JOB, TOKEN, FakeFarm, farm  # noqa: F401 (fixture)

TOOLS = ("blender", "Xvfb", "xdotool")
pytestmark = pytest.mark.skipif(
    # Skipped only outside CI: `make test` installs them (root + apt), and CI must fail
    # rather than skip when they are missing.
    any(shutil.which(tool) is None for tool in TOOLS) and not os.environ.get("CI"),
    reason="needs a UI Blender, Xvfb and xdotool (apt-get install blender xvfb xdotool)",
)

DRIVER = r"""
import json, os, sys, time
import bpy
import addon_utils

CONFIG = json.loads(os.environ["TESSERA_UI_CONFIG"])
sys.path.insert(0, CONFIG["site"])
OUT = CONFIG["out"]
state = {"steps": []}


def write():
    with open(OUT + ".tmp", "w") as handle:
        json.dump(state, handle)
    os.replace(OUT + ".tmp", OUT)


bpy.context.preferences.view.show_splash = False
if addon_utils.enable("tessera", default_set=True) is None:
    state["error"] = "the add-on did not load"
    write()
    raise SystemExit(1)
follow = sys.modules["tessera.follow"]
prefs = bpy.context.preferences.addons["tessera"].preferences
prefs.coordinator_url = CONFIG["url"]
prefs.token = CONFIG["token"]
scene = bpy.context.scene
scene.render.engine = "CYCLES"
scene.render.resolution_x, scene.render.resolution_y = 32, 24
scene.frame_start = scene.frame_end = 1
scene.cycles.samples = 1
scene.render.filepath = "//render/shot_"


def ui():
    window = bpy.context.window_manager.windows[0]
    area = next(a for a in window.screen.areas if a.type == "VIEW_3D")
    return bpy.context.temp_override(window=window, area=area)


def invoke(step):
    try:
        with ui():
            result = sorted(bpy.ops.tessera.submit_job("INVOKE_DEFAULT"))
    except RuntimeError as exc:
        result = str(exc).strip()
    state["steps"].append([step, result, bpy.data.is_dirty, scene.tessera.last_job_id])
    write()


def join():
    # Join the LAN farm by name: zeroconf on a thread, the result through a modal timer.
    prefs.coordinator_url = "http://127.0.0.1:9"
    prefs.token = ""
    prefs.farm_name = CONFIG["farm"]
    prefs.farm_secret = CONFIG["secret"]
    prefs.lan_interface = "127.0.0.1"
    prefs.join_name = "artist"
    with ui():
        state["join"] = sorted(bpy.ops.tessera.join_farm())
    write()
    bpy.app.timers.register(wait_for_join, first_interval=0.2)


def wait_for_join():
    waited = getattr(wait_for_join, "waited", 0.0) + 0.2
    wait_for_join.waited = waited
    if not prefs.token and waited < 30:
        return 0.2
    state["joined"] = {
        "url": prefs.coordinator_url,
        "token": bool(prefs.token),
        "status": prefs.connection_status,
        "secret_kept": bool(prefs.farm_secret),
    }
    prefs.coordinator_url = CONFIG["url"]
    prefs.token = CONFIG["token"]
    write()
    bpy.app.timers.register(start, first_interval=0.1)
    return None


def start():
    invoke("unsaved")
    bpy.ops.wm.save_as_mainfile(filepath=CONFIG["blend"])
    with ui():  # unsaved changes, made as an artist makes them (an operator)
        bpy.ops.mesh.primitive_cube_add(location=(0.0, 0.0, -50.0))
        bpy.ops.ed.undo_push(message="Add Cube")
    state["dirty"] = bpy.data.is_dirty
    invoke("dirty")
    state["asking"] = True  # the test answers the popup now
    write()
    bpy.app.timers.register(wait_for_job, first_interval=0.5)


def wait_for_job():
    waited = getattr(wait_for_job, "waited", 0.0) + 0.5
    wait_for_job.waited = waited
    if not scene.tessera.last_job_id and waited < 60:
        return 0.5
    state["submitted"] = {
        "job": scene.tessera.last_job_id,
        "dirty": bpy.data.is_dirty,
        "status": scene.tessera.job_status,
        "following": bpy.app.timers.is_registered(follow._timer),
    }
    # Follow the finished job of the deliverables server with the timers.
    prefs.coordinator_url = CONFIG["fake_url"]
    prefs.token = CONFIG["fake_token"]
    scene.tessera.last_job_id = CONFIG["fake_job"]
    scene.tessera.job_status = ""
    follow.start_following()
    state["timer_registered"] = bpy.app.timers.is_registered(follow._timer)
    state["ticks"] = 0
    write()
    bpy.app.timers.register(watch_following, first_interval=0.2)
    return None


def watch_following():
    state["ticks"] += 1  # the UI's own timers keep running while the poll is on a thread
    if bpy.app.timers.is_registered(follow._timer) and state["ticks"] < 150:
        return 0.2
    settings = scene.tessera
    state["followed"] = {
        "status": settings.job_status,
        "last_frame": settings.last_frame_path,
        "files": settings.downloaded_files.splitlines(),
        "message": settings.job_message,
        "still_following": bpy.app.timers.is_registered(follow._timer),
    }
    state["done"] = True
    write()
    bpy.ops.wm.quit_blender()
    return None


bpy.app.timers.register(join, first_interval=1.0)
"""


def _start_xvfb() -> tuple[subprocess.Popen[bytes], str]:
    read, write = os.pipe()
    xvfb = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
        pass_fds=(write,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write)
    with os.fdopen(read) as pipe:
        number = pipe.readline().strip()
    assert number, "Xvfb did not start"
    return xvfb, f":{number}"


def _legacy_addon(root: Path) -> tuple[Path, Path]:
    """The add-on as Blender < 4.2 loads it, and the extension's wheels unpacked."""
    addon = root / "scripts" / "addons" / "tessera"
    shutil.copytree(SOURCE, addon, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    init = addon / "__init__.py"
    init.write_text(init.read_text() + BL_INFO)
    site = root / "site"
    with zipfile.ZipFile(build_extension(root / "zip")) as archive:
        for name in archive.namelist():
            if name.startswith("wheels/"):
                with zipfile.ZipFile(archive.open(name)) as wheel:
                    wheel.extractall(site)
    return addon, site


def test_submit_asks_first_and_following_runs_on_timers_in_blenders_ui(
    farm: FakeFarm,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    farm.add("render/shot_0001.png", b"the finished frame", "frame", 1)
    _addon, site = _legacy_addon(tmp_path)
    project = tmp_path / "project"
    project.mkdir()
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
    xvfb, display = _start_xvfb()
    out = tmp_path / "ui.json"
    log_path = tmp_path / "blender.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        with coordinator.client(coordinator.admin_token) as admin:
            token = admin.create_account("artist", "requester").token
            admin.grant("artist", 100)
        config = {
            "site": str(site),
            "out": str(out),
            "url": coordinator.url,
            "token": token,
            "blend": str(project / "shot.blend"),
            "fake_url": farm.url,
            "fake_token": TOKEN,
            "fake_job": JOB,
            "farm": "studio",
            "secret": "open-sesame",
        }
        driver = tmp_path / "driver.py"
        driver.write_text(DRIVER)
        env = {
            **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
            "DISPLAY": display,
            "LIBGL_ALWAYS_SOFTWARE": "1",
            "BLENDER_USER_SCRIPTS": str(tmp_path / "scripts"),
            "BLENDER_USER_CONFIG": str(tmp_path / "config"),
            "TESSERA_UI_CONFIG": json.dumps(config),
        }
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                ["blender", "--factory-startup", "-noaudio", "--python", str(driver)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

            def read_state(key: str, timeout: float) -> dict[str, object]:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline and proc is not None and proc.poll() is None:
                    if out.exists():
                        state = json.loads(out.read_text())
                        if key in state:
                            return dict(state)
                    time.sleep(0.3)
                if out.exists() and key in (state := json.loads(out.read_text())):
                    return dict(state)
                raise AssertionError(
                    f"Blender never got to '{key}':\n{log_path.read_text(errors='replace')[-4000:]}"
                )

            state = read_state("asking", 120)
            # Blender's confirm popup is open under the mouse: confirm it with the keyboard.
            xenv = {**os.environ, "DISPLAY": display}
            time.sleep(1.0)
            subprocess.run(["xdotool", "key", "Return"], env=xenv, check=True)
            state = read_state("done", 180)
    finally:
        if proc is not None:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        xvfb.terminate()
        xvfb.wait(timeout=10)
        coordinator_jobs = None
        try:
            with coordinator.client(coordinator.admin_token) as admin:
                coordinator_jobs = admin.jobs()
        finally:
            coordinator.stop()
    assert state["join"] == ["RUNNING_MODAL"], "joining runs on a thread in the UI"
    joined = state["joined"]
    assert isinstance(joined, dict), state
    assert joined["url"] == coordinator.url and joined["token"], joined
    assert str(joined["status"]).startswith("Joined") and not joined["secret_kept"], joined
    steps = {step: (result, dirty, job) for step, result, dirty, job in state["steps"]}  # type: ignore[union-attr]
    unsaved_result, _dirty, _job = steps["unsaved"]
    assert "Save the .blend file first" in str(unsaved_result), steps
    dirty_result, still_dirty, job_then = steps["dirty"]
    assert dirty_result == ["INTERFACE"] and still_dirty and not job_then, (
        "it asked before saving or submitting",
        steps,
        state["dirty"],
    )
    submitted = state["submitted"]
    assert isinstance(submitted, dict), state
    assert submitted["job"] and not submitted["dirty"], ("saved, then submitted", state)
    assert submitted["following"], "the job is followed with bpy.app.timers"
    assert coordinator_jobs is not None and [j.id for j in coordinator_jobs] == [submitted["job"]]
    assert state["timer_registered"], state
    followed = state["followed"]
    assert isinstance(followed, dict), state
    assert followed["status"] == "completed" and not followed["still_following"], state
    frame = project / "render" / "shot_0001.png"
    assert frame.read_bytes() == b"the finished frame"
    assert followed["last_frame"] == str(frame) and len(followed["files"]) == 1, state
    assert int(state["ticks"]) >= 1, state  # type: ignore[call-overload]
