"""The finish step's parent side: requests, results, errors and the EXR fix-up.

A node finishes a frame by handing the scene and the merged multilayer EXR to its render
worker (`RenderWorker.finish(FinishRequest(...))`); inside Blender,
`renderers/worker_finish.py` runs the scene's compositor on the EXR and Blender's own
writer produces the deliverables. This module holds what the parent needs around that:

- `FinishRequest` / `FinishResult` / `FinishedFile`: the API. File paths in a result are
  relative to `FinishRequest.output_dir` and are Blender's own names for the frame
  (`render.frame_path(frame=N)` relative to the .blend's folder, sub-folders kept);
- the output path policy: '//x' and relative paths land at OUT/x; an absolute path
  lands at OUT/<path without its root> ('/tmp/shot_' -> OUT/tmp/shot_0005.png); any
  '..' in the output path or a File Output node's path is refused (`OutputPathError`);
  nothing is ever written outside `output_dir`;
- `add_view_layer_passes`: a multilayer EXR output gets the view-layer passes Blender
  stores beside 'Composite.Combined' (a compositor-only run has none): half for colour
  passes when the output is 16-bit, float for data passes, as Blender writes them;
- `place_files`: moves the staged files into `output_dir`, refusing any that escape.

Never imports bpy.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import OpenEXR

from common.errors import ExrError, SceneError
from renderers.scene_info import OutputInfo
from renderers.video import MovieSpec

__all__ = [
    "FINISH_ERROR_KINDS",
    "FinishRefusedError",
    "FinishRequest",
    "FinishResult",
    "FinishedFile",
    "OutputPathError",
    "UnsupportedOutputFormatError",
    "add_view_layer_passes",
    "check_finishable",
    "deliver_finished",
    "finish_message",
    "place_files",
]

FileKind = Literal["frame", "file_output"]

#: Every file format Blender 5.0 writes (the same set as worker_finish.KNOWN_FORMATS).
KNOWN_FORMATS = frozenset(
    {
        *("PNG", "JPEG", "JPEG2000", "TIFF", "OPEN_EXR", "OPEN_EXR_MULTILAYER", "WEBP"),
        *("BMP", "IRIS", "TARGA", "TARGA_RAW", "CINEON", "DPX", "HDR", "FFMPEG"),
    }
)


class OutputPathError(SceneError):
    """The scene's output path (or a File Output node's) cannot be written as asked."""

    default_hint = "Use an output path below the .blend's folder, e.g. //render/shot_####."


class UnsupportedOutputFormatError(SceneError):
    """The scene asks for an output format this Blender cannot write."""

    default_hint = "Pick PNG, JPEG, TIFF, OpenEXR or FFmpeg video in Output Properties."


class FinishRefusedError(SceneError):
    """The scene's output cannot be made from the farm's render (sequencer edit,
    another scene's Render Layers, a pass the merged frame lacks)."""


#: The worker's error kinds for the finish (renderers.worker_finish) -> errors here.
FINISH_ERROR_KINDS: dict[str, type[SceneError]] = {
    "output_path": OutputPathError,
    "output_format": UnsupportedOutputFormatError,
    "finish_refused": FinishRefusedError,
}


@dataclass(frozen=True, slots=True)
class FinishRequest:
    """Finish frame `frame` of `scene` from `merged_exr` into `output_dir`."""

    scene: Path
    merged_exr: Path
    frame: int
    output_dir: Path
    #: The bundle folder the scene must stay in, as for `RenderRequest.confine_to`.
    confine_to: Path | None = None
    timeout: float | None = 600.0
    #: The render size the frame was made at, as for `RenderRequest` (None: the file's).
    resolution: tuple[int, int] | None = None
    percentage: int | None = None


@dataclass(frozen=True, slots=True)
class FinishedFile:
    """One file written: its path relative to the output folder and what it is."""

    path: Path
    kind: FileKind


@dataclass(frozen=True, slots=True)
class FinishResult:
    """What a finish wrote into `output_dir`.

    `files[...].kind == "frame"` is the scene's main output for the frame (for a movie
    scene: a 16-bit PNG frame, to be encoded with `renderers.video.encode_movie(movie)`);
    "file_output" files come from File Output nodes. `blender_name` is the name Blender
    itself would give the frame, relative to the .blend's folder.
    """

    output_dir: Path
    files: list[FinishedFile]
    blender_name: str
    movie: MovieSpec | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def frame_file(self) -> Path:
        """The absolute path of the frame's main output."""
        return self.output_dir / next(f.path for f in self.files if f.kind == "frame")


def check_finishable(output: OutputInfo) -> None:
    """Refuse, from the inspection alone (before any render), a scene whose output the
    finish cannot produce: unknown format, an output path Blender cannot expand or
    that leaves the output folder, a sequencer edit. (A movie ffmpeg cannot encode is
    no refusal: its frames are still delivered; see `scene_info.movie_problem`.)"""
    if output.refusal:
        raise FinishRefusedError(output.refusal)
    if output.file_format not in KNOWN_FORMATS:
        raise UnsupportedOutputFormatError(
            f"The scene's output format {output.file_format!r} is not one Blender 5 writes "
            f"(known: {', '.join(sorted(KNOWN_FORMATS))})."
        )
    if output.path_error:
        raise OutputPathError(f"The scene's output path cannot be expanded: {output.path_error}")
    for what, path in [("The output path", output.filepath)] + [
        ("A File Output node path", p) for p in output.file_outputs
    ]:
        if ".." in path.replace("\\", "/").split("/"):
            raise OutputPathError(f"{what} '{path}' climbs out of its folder with '..'.")


def finish_message(request: FinishRequest, merged_size: tuple[int, int]) -> dict[str, Any]:
    """The worker's `finish` request for `request` (paths are added by the caller)."""
    return {
        "op": "finish",
        "frame": request.frame,
        "confine_to": None,
        "resolution": list(request.resolution) if request.resolution else None,
        "percentage": request.percentage,
        "merged_size": list(merged_size),
    }


def deliver_finished(
    reply: dict[str, Any], staged: Path, merged_copy: Path, request: FinishRequest, seconds: float
) -> FinishResult:
    """The worker's reply made good: view-layer passes added to a multilayer output,
    files moved from the staging folder into `request.output_dir`, the result typed."""
    files = [FinishedFile(Path(f["path"]), f["kind"]) for f in reply["files"]]
    if reply.get("multilayer_half") is not None:
        add_view_layer_passes(
            staged / reply["main"], merged_copy, half=bool(reply["multilayer_half"])
        )
    place_files(staged, request.output_dir, [f.path for f in files])
    movie = reply.get("movie")
    return FinishResult(
        output_dir=request.output_dir,
        files=files,
        blender_name=str(reply["blender_name"]),
        movie=None if movie is None else MovieSpec.from_worker(movie),
        seconds=seconds,
        warnings=[str(w) for w in reply.get("warnings", ())],
    )


def place_files(staged: Path, output_dir: Path, relative: list[Path]) -> None:
    """Move `relative` files from `staged` to the same place under `output_dir`,
    refusing any path that would leave it."""
    root = output_dir.resolve()
    for rel in relative:
        target = (output_dir / rel).resolve()
        if rel.is_absolute() or os.path.commonpath([root, target]) != str(root):
            raise OutputPathError(f"Refusing to write {rel}: it is outside {output_dir}.")
    for rel in relative:
        target = output_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staged / rel, target)


#: Channel suffixes of passes Blender writes as half in a 16-bit multilayer EXR.
_COLOUR_LETTERS = {"R", "G", "B", "A"}


def add_view_layer_passes(output: Path, merged_exr: Path, *, half: bool) -> None:
    """Add the merged frame's view-layer passes to a finished multilayer EXR, as
    Blender's own render writes them next to 'Composite.Combined'."""
    try:
        finished = OpenEXR.File(str(output), separate_channels=True)
        merged = OpenEXR.File(str(merged_exr), separate_channels=True)
    except Exception as exc:
        raise ExrError(f"Cannot read {output.name} or {merged_exr.name}: {exc}") from exc
    composite = [p for p in finished.parts if p.name().startswith("Composite.")]
    if not composite:
        raise ExrError(f"{output.name} has no Composite layer to add the passes to.")
    base = {k: v for k, v in composite[0].header.items() if k not in _STRUCTURAL}
    parts = [OpenEXR.Part(p.header, p.channels) for p in composite]
    for part in merged.parts:
        colour = {name.rsplit(".", 1)[-1] for name in part.channels} <= _COLOUR_LETTERS
        channels: dict[str, Any] = {}
        for name, channel in part.channels.items():
            pixels = channel.pixels
            if half and colour and pixels.dtype == np.float32:
                pixels = pixels.astype(np.float16)
            channels[name] = OpenEXR.Channel(np.ascontiguousarray(pixels))
        parts.append(OpenEXR.Part({**base, "name": part.name()}, channels))
    temporary = output.with_name(output.name + ".tmp")
    OpenEXR.File(parts).write(str(temporary))
    temporary.replace(output)


_STRUCTURAL = frozenset({"name", "channels", "chunkCount", "type", "view"})
