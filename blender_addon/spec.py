"""The job spec the coordinator expects (`protocol.models.JobSpec` on the wire), built as
plain JSON from the open scene and the panel's options, and checked as the coordinator
would check it, so a job that cannot work is refused before anything is packed.

No bpy import: the scene is passed in (any object with Blender's attributes).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

DEVICES = ("ANY", "CPU", "GPU", "CUDA", "OPTIX", "HIP", "METAL", "ONEAPI")
MAX_TILES_PER_AXIS = 64
MAX_FRAMES_PER_JOB = 100_000
NO_BUNDLE = "0" * 64


class SpecError(Exception):
    """The scene or the options cannot make a job; `str()` is the message to show."""


def scene_summary(scene: Any, blender_version: str) -> dict[str, Any]:
    """What the coordinator is told about the scene (`SceneSummary`)."""
    render = scene.render
    cycles = getattr(scene, "cycles", None)
    return {
        "name": scene.name[:200] or "Scene",
        "frame_start": int(scene.frame_start),
        "frame_end": int(scene.frame_end),
        "resolution_x": int(render.resolution_x),
        "resolution_y": int(render.resolution_y),
        "resolution_percentage": int(render.resolution_percentage),
        "samples": max(1, int(cycles.samples)) if cycles is not None else 1,
        "adaptive_sampling": bool(cycles.use_adaptive_sampling) if cycles is not None else False,
        "denoising": bool(cycles.use_denoising) if cycles is not None else False,
        "camera": scene.camera.name if scene.camera is not None else None,
        "engine": str(render.engine),
        "blender_version": blender_version,
        "fps": _fps(render),
        "movie": movie_summary(scene),
    }


#: Blender's movie file extension per container (`render.ffmpeg.format`).
MOVIE_EXTENSIONS = {
    "MPEG4": ".mp4",
    "MKV": ".mkv",
    "WEBM": ".webm",
    "AVI": ".avi",
    "QUICKTIME": ".mov",
    "OGG": ".ogv",
    "FLASH": ".flv",
    "MPEG1": ".mpg",
    "MPEG2": ".dvd",
    "DV": ".dv",
}


def _fps(render: Any) -> float:
    fps = float(render.fps) / float(render.fps_base or 1.0)
    return fps if 0 < fps <= 1000 else 24.0


def movie_summary(scene: Any) -> dict[str, Any] | None:
    """The scene's movie settings (`MovieOutput`) when it writes a movie, so the farm
    encodes it from the finished frames; None for image output."""
    render = scene.render
    settings = render.image_settings
    if getattr(settings, "media_type", "") != "VIDEO" and settings.file_format != "FFMPEG":
        return None
    ffmpeg = render.ffmpeg
    path = render.filepath.replace("\\", "/")
    name = path[2:] if path.startswith("//") else Path(path.rstrip("/")).name or "movie"
    if not name or ".." in name.split("/") or name.startswith("/"):
        return None  # the finish refuses such a path with its reason; no movie to name
    if not ffmpeg.codec or ffmpeg.format not in MOVIE_EXTENSIONS:
        return None  # an old file's codec Blender 5 no longer knows: frames only
    return {
        "name": movie_name(name, int(scene.frame_start), int(scene.frame_end), ffmpeg.format),
        "container": str(ffmpeg.format),
        "codec": str(ffmpeg.codec),
        "fps": _fps(render),
        "crf": str(ffmpeg.constant_rate_factor),
        "preset": str(ffmpeg.ffmpeg_preset),
        "gop": max(0, min(1000, int(ffmpeg.gopsize))),
        "bitrate_kbps": max(1, int(ffmpeg.video_bitrate)),
        "color_mode": str(settings.color_mode),
    }


def movie_name(path: str, start: int, end: int, container: str) -> str:
    """A movie's name as Blender gives it: the run of '#' becomes the frame range (none:
    the range is appended), then the container's extension."""
    hashes = re.search(r"#+", path)
    if hashes is None:
        name = f"{path}{start:04d}-{end:04d}"
    else:
        width = len(hashes.group())
        name = path[: hashes.start()] + f"{start:0{width}d}-{end:0{width}d}" + path[hashes.end() :]
    return name + MOVIE_EXTENSIONS.get(container, "")


def check_scene(summary: dict[str, Any]) -> None:
    """Refuse a scene the farm cannot render (no camera, not Cycles)."""
    if summary["camera"] is None:
        raise SpecError(
            "The scene has no active camera: select a camera and press Ctrl+Numpad0, then"
            " submit again."
        )
    if summary["engine"] != "CYCLES":
        raise SpecError(
            f"The scene renders with {summary['engine']}; the Tessera farm renders Cycles only"
            " (Render Properties > Render Engine)."
        )


def parse_frames(text: str) -> dict[str, int]:
    """'7', '1-24' or '1-24x2'."""
    match = re.fullmatch(r"\s*(-?\d+)(?:\s*-\s*(-?\d+)(?:\s*x\s*(\d+))?)?\s*", text or "")
    if match is None:
        raise SpecError(f"'{text}' is not a frame range: write N, A-B or A-BxSTEP (e.g. 1-24).")
    start = int(match.group(1))
    end = int(match.group(2)) if match.group(2) is not None else start
    step = int(match.group(3)) if match.group(3) is not None else 1
    return {"start": start, "end": end, "step": max(1, step)}


def build_spec(
    summary: dict[str, Any],
    *,
    name: str,
    frames: dict[str, int],
    tiles: tuple[int, int] = (1, 1),
    priority: int = 50,
    device: str = "ANY",
    max_price: float = 0.0,
    max_credits: float | None = None,
    bundle: str = NO_BUNDLE,
    scene_path: str = "scene.blend",
    preview_video: bool = False,
) -> dict[str, Any]:
    """A `JobSpec` as JSON, checked against the scene. Raises `SpecError`."""
    check_scene(summary)
    start, end, step = frames["start"], frames["end"], frames["step"]
    if end < start:
        raise SpecError(f"Frames {start}-{end}: the end is before the start.")
    if start < summary["frame_start"] or end > summary["frame_end"]:
        raise SpecError(
            f"Frames {start}-{end} are outside the scene's range "
            f"{summary['frame_start']}-{summary['frame_end']}."
        )
    if len(range(start, end + 1, step)) > MAX_FRAMES_PER_JOB:
        raise SpecError(f"At most {MAX_FRAMES_PER_JOB} frames per job.")
    columns, rows = tiles
    if not (1 <= columns <= MAX_TILES_PER_AXIS and 1 <= rows <= MAX_TILES_PER_AXIS):
        raise SpecError(f"Tiles are 1 to {MAX_TILES_PER_AXIS} per side.")
    percentage = summary["resolution_percentage"]
    width = max(1, summary["resolution_x"] * percentage // 100)
    height = max(1, summary["resolution_y"] * percentage // 100)
    if columns > width or rows > height:
        raise SpecError(f"{columns}x{rows} tiles do not fit a {width}x{height} frame.")
    if device not in DEVICES:
        raise SpecError(f"Unknown device {device}; choose one of {', '.join(DEVICES)}.")
    spec: dict[str, Any] = {
        "name": (name or summary["name"])[:200],
        "bundle": bundle,
        "scene_path": scene_path,
        "scene": summary,
        "frames": {"start": start, "end": end, "step": step},
        "tiles": {"columns": columns, "rows": rows},
        "priority": max(0, min(100, int(priority))),
        "device": device,
        "max_price": max(0.0, float(max_price)),
        "max_credits": None if max_credits is None else max(0.0, float(max_credits)),
        # The scene's own files (compositor, colour management, format, names).
        "finish": True,
    }
    if preview_video:  # sent only when asked: a coordinator without the field accepts the rest
        spec["preview_video"] = True
    return spec


def frame_file_name(frame: int, kind: str = "exr") -> str:
    """`frame_0007.exr`, numbered as Blender's `####` (as `tessera submit` names them)."""
    return f"frame_{frame:04d}.{kind}"


def output_folder(render_filepath_abs: str, blend_path: str) -> str:
    """The folder frames go to: the scene's output folder (its render path's folder),
    else a `tessera_frames` folder beside the .blend."""
    path = render_filepath_abs or ""
    if path:
        return path if path.endswith(("/", os.sep)) else str(Path(path).parent)
    return str(Path(blend_path).parent / "tessera_frames")


def describe_job(job: dict[str, Any], now: float, created: float | None) -> dict[str, Any]:
    """What the panel shows of a job: status, frames done/total, credits, ETA (seconds)."""
    progress = job.get("progress") or {}
    total = int(progress.get("frames_total") or 0)
    done = int(progress.get("frames_done") or 0)
    tasks_total = int(progress.get("tasks_total") or 0)
    tasks_done = int(progress.get("tasks_done") or 0)
    eta: float | None = None
    if created is not None and tasks_done and tasks_total > tasks_done:
        elapsed = max(0.0, now - created)
        eta = elapsed / tasks_done * (tasks_total - tasks_done)
    return {
        "status": str(job.get("status", "")),
        "frames_done": done,
        "frames_total": total,
        "credits_spent": float(job.get("credits_spent") or 0.0),
        "credits_escrowed": float(job.get("credits_escrowed") or 0.0),
        "eta": eta,
        "message": str(job.get("message") or ""),
        "cost": cost_lines(job.get("cost") or {}),
    }


def cost_lines(cost: dict[str, Any]) -> list[str]:
    """The job's `cost` object (docs/billing.md) as two short lines for the panel:
    credits per successful frame with the final bill against the estimate, and the
    share of delivered results accepted with the render time wasted."""
    if not cost:
        return []
    per_frame = cost.get("credits_per_frame")
    rate = cost.get("success_rate")
    first = "-" if per_frame is None else f"{float(per_frame):.3g}"
    second = "-" if rate is None else f"{float(rate) * 100:.0f}%"
    return [
        f"{first} credits/frame; final {float(cost.get('final') or 0):.3g}"
        f" (estimate {float(cost.get('estimate') or 0):.3g})",
        f"{second} of results accepted; {float(cost.get('wasted_seconds') or 0):.1f} s wasted",
    ]


FINISHED = frozenset({"completed", "failed", "canceled"})
