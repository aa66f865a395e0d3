"""The panel's submitting operators: *Estimate* and *Submit to Tessera* (the job spec
from the panel, the missing files, saving, packing, uploading). Following the job is in
follow.py, the preferences' operators in connect.py.

Every failure is one `self.report({'ERROR'}, message)` and `{'CANCELLED'}`, never a
traceback. In background mode (`bpy.app.background`) submit runs synchronously; in the
UI the network runs on a thread and the result reaches Blender's main thread through a
modal timer.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
from pathlib import Path
from typing import Any

import bpy

from .client import FarmClient, FarmError
from .follow import apply_result, start_following
from .packing import missing_dependencies, pack_scene
from .session import fail, farm_client
from .spec import (
    SpecError,
    build_spec,
    parse_frames,
    scene_summary,
)

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
        preview_video=settings.preview_video,
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
            with farm_client() as client:
                estimate = client.estimate(spec)
        except Exception as exc:
            settings.estimate = ""
            return fail(self, exc)
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
            try:
                return context.window_manager.invoke_confirm(
                    self,
                    event,
                    title="Submit to Tessera",
                    message="The file has unsaved changes: save it and submit?",
                    confirm_text="Save and Submit",
                )
            except TypeError:  # Blender before 4.1: no words of our own on the button
                return context.window_manager.invoke_confirm(self, event)
        return self.execute(context)

    def execute(self, context: bpy.types.Context) -> set[str]:
        scene = context.scene
        settings = scene.tessera
        try:
            client = farm_client()
        except Exception as exc:
            return fail(self, exc)
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
            return fail(self, exc)
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
            return fail(self, work.error or FarmError("The coordinator returned no job."))
        job = work.job
        settings.last_job_id = str(job["id"])
        settings.last_frame_path = ""
        settings.downloaded_frames = ""
        settings.downloaded_files = ""
        apply_result(context.scene, {"job": job, "frames": []})
        self.report({"INFO"}, f"Submitted job {job['id']} to Tessera.")
        start_following()
        return {"FINISHED"}


CLASSES = (TESSERA_OT_estimate, TESSERA_OT_submit_job)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
