"""Following a submitted job: its status, frames done, ETA and credits refreshed with
`bpy.app.timers` (the network on a thread, the results applied on the main thread), its
finished files brought home into the scene's output folder (the coordinator's
deliverables; frame by frame from a coordinator without them), Pause, Resume, Cancel,
Refresh and Open Last Frame.

In background mode there is no event loop: `bpy.ops.tessera.refresh_job()` polls once,
synchronously.
"""

from __future__ import annotations

import queue
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import bpy
from bpy.app.handlers import persistent

from .deliverables import output_root
from .fetch import PollTarget, poll_job
from .session import fail, farm_client
from .spec import FINISHED, describe_job, output_folder
from .ui import preferences

POLL_SECONDS = 2.0


def _job_folder(scene: Any) -> Path:
    return Path(output_folder(bpy.path.abspath(scene.render.filepath), bpy.data.filepath))


def _downloaded(settings: Any) -> frozenset[int]:
    return frozenset(int(x) for x in settings.downloaded_frames.split(",") if x.strip())


def _downloaded_files(settings: Any) -> frozenset[str]:
    return frozenset(line for line in settings.downloaded_files.splitlines() if line.strip())


def poll_target(scene: Any) -> PollTarget:
    prefs = preferences()
    settings = scene.tessera
    return PollTarget(
        url=prefs.coordinator_url,
        token=prefs.token,
        job_id=settings.last_job_id,
        frames_folder=_job_folder(scene),
        kinds=("exr", "png") if settings.preview_video else ("exr",),
        root=output_root(scene.render.filepath, bpy.data.filepath),
        downloaded_frames=_downloaded(settings),
        downloaded_files=_downloaded_files(settings),
    )


def _created(job: dict[str, Any]) -> float | None:
    try:
        return datetime.fromisoformat(str(job["created_at"])).timestamp()
    except (KeyError, ValueError):
        return None


def apply_result(scene: Any, result: dict[str, Any]) -> None:
    """Show a poll's result on the scene's settings (main thread only)."""
    settings = scene.tessera
    if result.get("error"):
        settings.job_message = str(result["error"])
        return
    job = result.get("job")
    if not job:
        return
    shown = describe_job(job, time.time(), _created(job))
    settings.job_status = shown["status"]
    settings.frames_done = shown["frames_done"]
    settings.frames_total = shown["frames_total"]
    settings.credits_spent = shown["credits_spent"]
    settings.job_cost = "\n".join(shown["cost"])
    settings.eta_seconds = -1.0 if shown["eta"] is None else shown["eta"]
    settings.job_message = shown["message"]
    if result.get("refused"):
        settings.job_message = " ".join(result["refused"])
    if result.get("files"):
        files = _downloaded_files(settings) | set(result["files"])
        settings.downloaded_files = "\n".join(sorted(files))
    if result.get("frames"):
        frames = _downloaded(settings) | {frame for frame, _path in result["frames"]}
        settings.downloaded_frames = ",".join(str(frame) for frame in sorted(frames))
        settings.last_frame_path = result["frames"][-1][1]


class _Following:
    """The one poll in flight and the results waiting for the main thread."""

    results: queue.Queue[dict[str, Any]] = queue.Queue()
    thread: threading.Thread | None = None


def _scenes_following() -> list[Any]:
    return [
        s for s in bpy.data.scenes if s.tessera.last_job_id and s.tessera.job_status not in FINISHED
    ]


def _timer() -> float | None:
    while True:
        try:
            result = _Following.results.get_nowait()
        except queue.Empty:
            break
        for scene in bpy.data.scenes:
            if scene.tessera.last_job_id == result["job_id"]:
                apply_result(scene, result)
    for window in getattr(bpy.context.window_manager, "windows", ()):
        for area in window.screen.areas:
            if area.type == "PROPERTIES":
                area.tag_redraw()
    following = _scenes_following()
    busy = _Following.thread is not None and _Following.thread.is_alive()
    if not following:
        return None if not busy else POLL_SECONDS
    if not busy:
        targets = [poll_target(scene) for scene in following]

        def run() -> None:
            for target in targets:
                _Following.results.put(poll_job(target))

        _Following.thread = threading.Thread(target=run, name="tessera-follow", daemon=True)
        _Following.thread.start()
    return POLL_SECONDS


def start_following() -> None:
    """Follow unfinished jobs with `bpy.app.timers` (UI only: timers need an event loop)."""
    if bpy.app.background:
        return
    if not bpy.app.timers.is_registered(_timer):
        bpy.app.timers.register(_timer, first_interval=0.2, persistent=True)


@persistent
def _on_load(_dummy: Any = None) -> None:
    if _scenes_following():
        start_following()


class TESSERA_OT_refresh_job(bpy.types.Operator):  # noqa: N801 (Blender naming)
    """Fetch the last job's status now and download its finished files into the output folder"""

    bl_idname = "tessera.refresh_job"
    bl_label = "Refresh"

    def execute(self, context: bpy.types.Context) -> set[str]:
        scene = context.scene
        if not scene.tessera.last_job_id:
            self.report({"ERROR"}, "No Tessera job was submitted from this scene yet.")
            return {"CANCELLED"}
        try:
            farm_client().close()  # online access and a token
        except Exception as exc:
            return fail(self, exc)
        result = poll_job(poll_target(scene))
        apply_result(scene, result)
        for refused in result["refused"]:
            self.report({"WARNING"}, refused)
        if result["error"]:
            self.report({"ERROR"}, result["error"])
            return {"CANCELLED"}
        start_following()
        return {"FINISHED"}


class _JobAction(bpy.types.Operator):
    action = ""

    def execute(self, context: bpy.types.Context) -> set[str]:
        scene = context.scene
        job_id = scene.tessera.last_job_id
        if not job_id:
            self.report({"ERROR"}, "No Tessera job was submitted from this scene yet.")
            return {"CANCELLED"}
        try:
            with farm_client() as client:
                job = client.control(job_id, self.action)
        except Exception as exc:
            return fail(self, exc)
        apply_result(scene, {"job": job, "frames": []})
        self.report({"INFO"}, f"Job {job_id}: {job.get('status')}")
        start_following()
        return {"FINISHED"}


class TESSERA_OT_pause_job(_JobAction):  # noqa: N801 (Blender naming)
    """Pause the last job (tasks being rendered finish)"""

    bl_idname = "tessera.pause_job"
    bl_label = "Pause"
    action = "pause"


class TESSERA_OT_resume_job(_JobAction):  # noqa: N801 (Blender naming)
    """Resume the last job"""

    bl_idname = "tessera.resume_job"
    bl_label = "Resume"
    action = "resume"


class TESSERA_OT_cancel_job(_JobAction):  # noqa: N801 (Blender naming)
    """Cancel the last job (unspent credits come back)"""

    bl_idname = "tessera.cancel_job"
    bl_label = "Cancel"
    action = "cancel"


class TESSERA_OT_open_last_frame(bpy.types.Operator):  # noqa: N801 (Blender naming)
    """Open the last finished frame in the Image Editor"""

    bl_idname = "tessera.open_last_frame"
    bl_label = "Open Last Frame"

    def execute(self, context: bpy.types.Context) -> set[str]:
        path = context.scene.tessera.last_frame_path
        if not path or not Path(path).is_file():
            self.report({"ERROR"}, "No finished frame of the last job has been downloaded yet.")
            return {"CANCELLED"}
        image = bpy.data.images.load(path, check_existing=True)
        image.reload()
        shown = False
        for window in getattr(context.window_manager, "windows", ()):
            for area in window.screen.areas:
                if area.type == "IMAGE_EDITOR":
                    area.spaces.active.image = image
                    shown = True
        if not shown:
            self.report({"INFO"}, f"Loaded {image.name}; show it in an Image Editor.")
        return {"FINISHED"}


CLASSES = (
    TESSERA_OT_refresh_job,
    TESSERA_OT_pause_job,
    TESSERA_OT_resume_job,
    TESSERA_OT_cancel_job,
    TESSERA_OT_open_last_frame,
)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.app.handlers.load_post.append(_on_load)


def unregister() -> None:
    if _on_load in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.remove(_on_load)
    if bpy.app.timers.is_registered(_timer):
        bpy.app.timers.unregister(_timer)
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
