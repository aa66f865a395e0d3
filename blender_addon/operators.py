"""The operators: test connection, join a LAN farm, estimate, submit, follow, pause,
resume, cancel, refresh and open the last finished frame.

Every failure is one `self.report({'ERROR'}, message)` and `{'CANCELLED'}`, never a
traceback. In background mode (`bpy.app.background`) submit and refresh run
synchronously; in the UI the network runs on a thread and the results reach Blender's
main thread through a modal timer (submit) or `bpy.app.timers` (following the job).
"""

from __future__ import annotations

import contextlib
import queue
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import bpy
from bpy.app.handlers import persistent

from .client import FarmClient, FarmError
from .packing import PackError, missing_dependencies, pack_scene
from .spec import (
    FINISHED,
    SpecError,
    build_spec,
    describe_job,
    frame_file_name,
    output_folder,
    parse_frames,
    scene_summary,
)
from .ui import preferences

POLL_SECONDS = 2.0
#: Errors that are the artist's to read, not a programmer's.
EXPECTED = (FarmError, PackError, SpecError)


def _check_online() -> None:
    if not bpy.app.online_access:
        raise FarmError(
            "Online access is off: allow it in Preferences > System > Network > Allow Online"
            " Access (the Tessera extension talks to your farm's coordinator)."
        )


def _client() -> FarmClient:
    _check_online()
    prefs = preferences()
    client = FarmClient(prefs.coordinator_url, prefs.token)
    client.require_token()
    return client


def _fail(op: bpy.types.Operator, error: BaseException) -> set[str]:
    message = str(error) if isinstance(error, EXPECTED) else f"Tessera: {error!r}"
    op.report({"ERROR"}, message)
    return {"CANCELLED"}


# --- preferences ---------------------------------------------------------------------


class TESSERA_OT_test_connection(bpy.types.Operator):  # noqa: N801 (Blender naming)
    """Ask the coordinator who you are and what your balance is"""

    bl_idname = "tessera.test_connection"
    bl_label = "Test Connection"

    def execute(self, context: bpy.types.Context) -> set[str]:
        prefs = preferences()
        try:
            with _client() as client:
                me = client.me()
                wallet = client.wallet()
        except Exception as exc:
            prefs.connection_status = str(exc) if isinstance(exc, EXPECTED) else repr(exc)
            return _fail(self, exc)
        prefs.connection_status = (
            f"Connected as {me['account']} ({me['role']}); balance"
            f" {float(wallet['balance']):.2f} credits"
        )
        self.report({"INFO"}, prefs.connection_status)
        return {"FINISHED"}


class TESSERA_OT_join_farm(bpy.types.Operator):  # noqa: N801 (Blender naming)
    """Join the LAN farm at the coordinator URL with its secret; the token is saved"""

    bl_idname = "tessera.join_farm"
    bl_label = "Join Farm"

    def execute(self, context: bpy.types.Context) -> set[str]:
        prefs = preferences()
        try:
            _check_online()
            with FarmClient(prefs.coordinator_url) as client:
                prefs.token = client.join(prefs.join_name.strip() or "blender", prefs.farm_secret)
        except Exception as exc:
            return _fail(self, exc)
        prefs.farm_secret = ""
        prefs.connection_status = f"Joined as lan-user-{prefs.join_name}"
        self.report({"INFO"}, f"Joined the farm at {prefs.coordinator_url}; token saved.")
        return {"FINISHED"}


# --- the job spec from the panel -----------------------------------------------------


def _job_spec(
    scene: Any, bundle: str | None = None, scene_path: str | None = None
) -> dict[str, Any]:
    settings = scene.tessera
    summary = scene_summary(scene, bpy.app.version_string)
    if settings.use_scene_range:
        frames = {
            "start": scene.frame_start,
            "end": scene.frame_end,
            "step": max(1, scene.frame_step),
        }
    else:
        frames = parse_frames(settings.frames)
    tiles = (settings.tiles_x, settings.tiles_y) if settings.split == "TILES" else (1, 1)
    blend = Path(bpy.data.filepath or "untitled.blend")
    extra: dict[str, Any] = {}
    if bundle is not None:
        extra["bundle"] = bundle
    extra["scene_path"] = scene_path or blend.name
    return build_spec(
        summary,
        name=blend.stem,
        frames=frames,
        tiles=tiles,
        priority=settings.priority,
        device=settings.device,
        max_price=settings.max_price,
        max_credits=settings.max_credits if settings.use_max_credits else None,
        **extra,
    )


def blender_missing_files() -> list[str]:
    """Images and libraries the open file refers to that do not exist."""
    missing: set[str] = set()
    for image in bpy.data.images:
        if image.source in {"FILE", "TILED"} and image.packed_file is None:
            path = bpy.path.abspath(image.filepath, library=image.library)
            if path and not Path(path).exists():
                missing.add(str(Path(path)))
    for library in bpy.data.libraries:
        path = bpy.path.abspath(library.filepath)
        if not Path(path).exists():
            missing.add(str(Path(path)))
    return sorted(missing)


def _missing_error(missing: list[str]) -> SpecError:
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return SpecError(
        f"{len(missing)} file(s) the scene uses are missing: {shown}. Fix the paths (File >"
        " External Data > Find Missing Files) or tick 'Submit With Missing Files'."
    )


class TESSERA_OT_estimate(bpy.types.Operator):  # noqa: N801 (Blender naming)
    """Ask the farm what this job would cost at most, and your balance"""

    bl_idname = "tessera.estimate"
    bl_label = "Estimate"

    def execute(self, context: bpy.types.Context) -> set[str]:
        settings = context.scene.tessera
        try:
            spec = _job_spec(context.scene)
            with _client() as client:
                estimate = client.estimate(spec)
        except Exception as exc:
            settings.estimate = ""
            return _fail(self, exc)
        text = (
            f"at most {float(estimate['credits']):.2f} credits; balance"
            f" {float(estimate['balance']):.2f}"
        )
        if estimate.get("refusal"):
            text += f"; refused: {estimate['refusal']}"
        settings.estimate = text
        self.report({"INFO"}, f"Estimate: {text}")
        return {"FINISHED"}


# --- submit --------------------------------------------------------------------------


class SubmitWork:
    """Check the connection, pack, upload and submit: the part that may run on a thread.
    Fills `job`, or `error` with the exception to report; `stage`/`done`/`total` say
    how far it got (for the progress bar)."""

    def __init__(
        self, client: FarmClient, blend: Path, spec: dict[str, Any], allow_missing: bool
    ) -> None:
        self.client = client
        self.blend = blend
        self.spec = spec
        self.allow_missing = allow_missing
        self.stage = "connect"
        self.done = 0
        self.total = 0
        self.missing: list[str] = []
        self.job: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.uploaded = False

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:
            self.error = exc
        finally:
            self.client.close()

    def _run(self) -> None:
        self.client.me()  # a wrong token or an unreachable farm fails before packing
        self.stage = "trace"
        self.missing = missing_dependencies(self.blend)
        if self.missing and not self.allow_missing:
            raise _missing_error(self.missing)
        with tempfile.TemporaryDirectory(prefix="tessera-bundle-") as scratch:
            bundle = pack_scene(self.blend, Path(scratch), self._progress)
            spec = dict(self.spec, bundle=bundle.sha256, scene_path=bundle.scene_path)
            self.stage = "upload"
            self.uploaded = self.client.upload_bundle(
                bundle.zip_path, bundle.sha256, self._progress_upload
            )
        self.stage = "submit"
        self.job = self.client.submit(spec)

    def _progress(self, stage: str, done: int, total: int) -> None:
        self.stage, self.done, self.total = "pack" if stage == "zip" else stage, done, total

    def _progress_upload(self, done: int, total: int) -> None:
        self.done, self.total = done, total

    def fraction(self) -> float:
        base = {"connect": 0.0, "trace": 0.05, "pack": 0.1, "upload": 0.4, "submit": 0.95}
        span = {"pack": 0.3, "upload": 0.55}
        start = base.get(self.stage, 0.0)
        if self.stage in span and self.total:
            return start + span[self.stage] * self.done / self.total
        return start


class TESSERA_OT_submit_job(bpy.types.Operator):  # noqa: N801 (Blender naming)
    """Save, pack the scene with its files, upload it and submit it to the Tessera farm"""

    bl_idname = "tessera.submit_job"
    bl_label = "Submit to Tessera"

    _work: SubmitWork | None = None
    _thread: threading.Thread | None = None
    _timer: Any = None

    def invoke(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        if not bpy.data.filepath:
            self.report({"ERROR"}, "Save the .blend file first (File > Save As), then submit.")
            return {"CANCELLED"}
        if bpy.data.is_dirty:
            return context.window_manager.invoke_confirm(
                self,
                event,
                title="Submit to Tessera",
                message="The file has unsaved changes: save it and submit?",
                confirm_text="Save and Submit",
            )
        return self.execute(context)

    def execute(self, context: bpy.types.Context) -> set[str]:
        scene = context.scene
        settings = scene.tessera
        try:
            client = _client()
        except Exception as exc:
            return _fail(self, exc)
        try:
            if not bpy.data.filepath:
                raise SpecError(
                    "The .blend file was never saved: save it (File > Save As) before submitting."
                )
            spec = _job_spec(scene)
            missing = blender_missing_files()
            settings.missing_files = "\n".join(missing)
            if missing and not settings.allow_missing:
                raise _missing_error(missing)
            if bpy.data.is_dirty:
                bpy.ops.wm.save_mainfile()
        except Exception as exc:
            client.close()
            return _fail(self, exc)
        work = SubmitWork(client, Path(bpy.data.filepath), spec, settings.allow_missing)
        if bpy.app.background:
            work.run()
            return self._finish(context, work)
        self._work = work
        self._thread = threading.Thread(target=work.run, name="tessera-submit", daemon=True)
        self._thread.start()
        wm = context.window_manager
        wm.progress_begin(0, 100)
        self._timer = wm.event_timer_add(0.1, window=context.window)
        wm.modal_handler_add(self)
        context.workspace.status_text_set("Tessera: connecting...")
        return {"RUNNING_MODAL"}

    def modal(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        if event.type != "TIMER" or self._work is None or self._thread is None:
            return {"PASS_THROUGH"}
        work = self._work
        wm = context.window_manager
        wm.progress_update(int(work.fraction() * 100))
        with contextlib.suppress(Exception):
            context.workspace.status_text_set(f"Tessera: {work.stage}...")
        if self._thread.is_alive():
            return {"PASS_THROUGH"}
        wm.event_timer_remove(self._timer)
        wm.progress_end()
        with contextlib.suppress(Exception):
            context.workspace.status_text_set(None)
        return self._finish(context, work)

    def _finish(self, context: bpy.types.Context, work: SubmitWork) -> set[str]:
        settings = context.scene.tessera
        if work.missing:
            settings.missing_files = "\n".join(work.missing)
        if work.error is not None or work.job is None:
            return _fail(self, work.error or FarmError("The coordinator returned no job."))
        job = work.job
        settings.last_job_id = str(job["id"])
        settings.last_frame_path = ""
        settings.downloaded_frames = ""
        _apply(context.scene, {"job": job, "frames": []})
        self.report({"INFO"}, f"Submitted job {job['id']} to Tessera.")
        start_following()
        return {"FINISHED"}


# --- following the job ---------------------------------------------------------------


def poll_job(
    url: str,
    token: str,
    job_id: str,
    folder: Path,
    kinds: tuple[str, ...],
    downloaded: frozenset[int] = frozenset(),
) -> dict[str, Any]:
    """Fetch the job and download its finished frames not `downloaded` yet (files of an
    earlier job in the same folder are replaced). No bpy: it runs on a thread. Returns
    {"job": ..., "frames": [(frame, path)], "error": message or None}."""
    result: dict[str, Any] = {"job_id": job_id, "job": None, "frames": [], "error": None}
    try:
        with FarmClient(url, token) as client:
            job = client.job(job_id)
            result["job"] = job
            for frame in sorted(set(job.get("frames_done") or []) - downloaded):
                for kind in kinds:
                    client.download_frame(
                        job_id, frame, folder / frame_file_name(frame, kind), kind
                    )
                result["frames"].append((frame, str(folder / frame_file_name(frame, kinds[0]))))
    except FarmError as exc:
        result["error"] = str(exc)
    except OSError as exc:
        result["error"] = f"Cannot write the frames to {folder}: {exc.strerror or exc}."
    return result


def _job_folder(scene: Any) -> Path:
    return Path(output_folder(bpy.path.abspath(scene.render.filepath), bpy.data.filepath))


def _downloaded(settings: Any) -> frozenset[int]:
    return frozenset(int(x) for x in settings.downloaded_frames.split(",") if x.strip())


def _poll_args(scene: Any) -> tuple[str, str, str, Path, tuple[str, ...], frozenset[int]]:
    prefs = preferences()
    settings = scene.tessera
    kinds = ("exr", "png") if settings.preview_video else ("exr",)
    return (
        prefs.coordinator_url,
        prefs.token,
        settings.last_job_id,
        _job_folder(scene),
        kinds,
        _downloaded(settings),
    )


def _created(job: dict[str, Any]) -> float | None:
    try:
        return datetime.fromisoformat(str(job["created_at"])).timestamp()
    except (KeyError, ValueError):
        return None


def _apply(scene: Any, result: dict[str, Any]) -> None:
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
                _apply(scene, result)
    for window in getattr(bpy.context.window_manager, "windows", ()):
        for area in window.screen.areas:
            if area.type == "PROPERTIES":
                area.tag_redraw()
    following = _scenes_following()
    busy = _Following.thread is not None and _Following.thread.is_alive()
    if not following:
        return None if not busy else POLL_SECONDS
    if not busy:
        args = [_poll_args(scene) for scene in following]

        def run() -> None:
            for arg in args:
                _Following.results.put(poll_job(*arg))

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
    """Fetch the last job's status now and download its finished frames"""

    bl_idname = "tessera.refresh_job"
    bl_label = "Refresh"

    def execute(self, context: bpy.types.Context) -> set[str]:
        scene = context.scene
        if not scene.tessera.last_job_id:
            self.report({"ERROR"}, "No Tessera job was submitted from this scene yet.")
            return {"CANCELLED"}
        try:
            _client().close()  # online access and a token
        except Exception as exc:
            return _fail(self, exc)
        result = poll_job(*_poll_args(scene))
        _apply(scene, result)
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
            with _client() as client:
                job = client.control(job_id, self.action)
        except Exception as exc:
            return _fail(self, exc)
        _apply(scene, {"job": job, "frames": []})
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
    TESSERA_OT_test_connection,
    TESSERA_OT_join_farm,
    TESSERA_OT_estimate,
    TESSERA_OT_submit_job,
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
