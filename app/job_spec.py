"""From an artist's choices to a job spec: `JobOptions` (the CLI's flags, the Submit
page's form) plus an inspected scene make a `protocol.models.JobSpec`.

`job_options` builds the options and turns pydantic's complaint into a `UsageError`;
`job_spec_for` checks them against a `SceneInfo` (no Blender, no I/O); `describe_job`
inspects and probes the scene in a render worker first (its cost relative to the
benchmark scene and tiny previews of its frames, `renderers.scene_probe`), which is all
the coordinator needs to estimate the job. Packing and uploading are `app.submit`'s.
No Qt and no printing here.

Requirements: a job needs nodes with `MEMORY_MARGIN` times the peak memory the probe
estimates for its frame, as GPU memory (when it renders on a GPU) and as RAM, unless the
artist says otherwise (`--min-vram GB`, `--min-ram GB`; 0 asks for nothing). The margin
covers the estimate's error (within 2x of what Cycles reports, tested) and what the
probe does not see (GPU kernels, the node's own Blender).
"""

from __future__ import annotations

import math
import re
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from common.blender_versions import blender_series
from common.errors import UsageError
from coordinator.planning import margin_for
from protocol.models import (
    FramePreview,
    FrameRange,
    JobOptions,
    JobSpec,
    SceneSummary,
    TileGrid,
)
from protocol.output import MovieOutput
from protocol.requirements import JobRequirements, gb_to_mib
from renderers.auto_tiles import GridChoice, choose_grid, efficient_tile_pixels, grid_cost
from renderers.finish import check_finishable
from renderers.regions import effective_resolution
from renderers.scene_info import SceneInfo, inspect_scene, movie_problem
from renderers.scene_probe import PreviewImage, SceneProbe, preview_frames, probe_scene
from renderers.worker import RenderWorker

#: A placeholder hash for checking a spec before the bundle exists.
_NO_BUNDLE = "0" * 64
DEFAULT_OPTIONS = JobOptions()
#: A job's default memory requirements are this many times the probe's estimate.
MEMORY_MARGIN = 1.5
#: The options that become `JobSpec.requirements` rather than fields of their own.
_REQUIREMENT_OPTIONS = {"min_vram_gb", "min_ram_gb", "gpu", "pool"}


def job_options(**fields: Any) -> JobOptions:
    """`JobOptions(**fields)`, with a `UsageError` naming the option that is wrong."""
    try:
        return JobOptions.model_validate(fields)
    except ValidationError as exc:
        raise UsageError(
            f"Bad job options: {describe_validation_error(exc)}",
            hint="Change the option named above (see `tessera submit --help`).",
        ) from exc


@dataclass(frozen=True, slots=True)
class Described:
    """A scene inspected, probed and described by a job spec whose bundle is not packed
    yet (its `bundle` is a placeholder): enough to ask the coordinator for an estimate."""

    info: SceneInfo
    spec: JobSpec
    probe: SceneProbe | None = None


def describe_job(
    worker: RenderWorker,
    scene: Path,
    options: JobOptions = DEFAULT_OPTIONS,
    *,
    probe: bool = True,
    benchmark_scene: Path | None = None,
    measured: SceneProbe | None = None,
    info: SceneInfo | None = None,
    benchmark_memo: MutableMapping[str, float] | None = None,
) -> Described:
    """Inspect `scene`, check the job it makes and probe it (nothing is packed).

    `options` and the probe's arguments are `app.submit.prepare_submission`'s.
    `measured` is a probe made before (the desktop app probes a scene when it is chosen):
    it is reused when its previews are of the frames this job previews and at no more
    samples than the job renders, else the scene is probed again. `info`, the scene
    inspected before by the same worker, saves inspecting it again.
    """
    if info is None or info.path != scene.resolve():
        info = inspect_scene(worker, scene)
    # Check the spec before probing and packing: a bad option fails in a second.
    spec = job_spec_for(info, options)
    if not probe:
        return Described(info, spec, None)
    if measured is None or not probe_fits(measured, spec.frames, spec.effective_samples):
        measured = probe_scene(
            worker,
            info.path,
            spec.frames.frames(),
            samples=options.samples,
            info=info,
            benchmark_scene=benchmark_scene,
            denoise=options.denoise,
            benchmark_memo=benchmark_memo,
        )
    return Described(info, job_spec_for(info, options, measured=measured), measured)


def job_spec_for(
    info: SceneInfo,
    options: JobOptions = DEFAULT_OPTIONS,
    *,
    measured: SceneProbe | None = None,
    bundle: str = _NO_BUNDLE,
    scene_path: str = "scene.blend",
) -> JobSpec:
    """The job spec of an inspected scene with `options` (no Blender, no I/O): the
    scene's cost and previews from `measured` when given (else cost 1.0, no previews),
    and a placeholder bundle unless one is named. Raises `UsageError` for options that
    do not fit the scene, and the scene's own error when its output cannot be finished
    (an unknown format, a path leaving the output folder, a sequencer edit)."""
    if options.finish and info.output is not None:
        check_finishable(info.output)  # refused before any render: the finish would fail
    fields: dict[str, object] = {
        **options.model_dump(exclude={"frames", "any_blender", *_REQUIREMENT_OPTIONS}),
        "name": options.name or info.path.stem,
        "frames": _frame_range(options.frames, info),
        "requirements": requirements_for(info, options, measured),
        # Nodes of the series that saved the scene only, unless the artist allows any.
        "blender_version": None if options.any_blender else blender_series(info.file_version),
    }
    if measured is not None:
        fields["scene_cost"] = round(measured.cost, 4)
        fields["previews"] = [frame_preview(image) for image in measured.previews]
    return spec_with_bundle(info, bundle, scene_path, fields)


def requirements_for(
    info: SceneInfo, options: JobOptions, measured: SceneProbe | None
) -> JobRequirements:
    """The job's requirements: the artist's, else `MEMORY_MARGIN` times the probe's
    memory estimate for the job's frame size (none when the scene was not probed)."""
    width, height = effective_resolution(
        info.resolution_x, info.resolution_y, options.percentage or info.resolution_percentage
    )
    peak_mib = 0
    if measured is not None and measured.memory.measured:
        peak_mib = math.ceil(measured.memory.peak(width * height) / (1 << 20))
    default = math.ceil(peak_mib * MEMORY_MARGIN)
    return JobRequirements(
        min_vram_mib=default if options.min_vram_gb is None else gb_to_mib(options.min_vram_gb),
        min_ram_mib=default if options.min_ram_gb is None else gb_to_mib(options.min_ram_gb),
        gpu=options.gpu or "",
        pool=options.pool or "",
        measured_peak_mib=peak_mib,
    )


def tile_choice(
    info: SceneInfo,
    options: JobOptions,
    *,
    auto_nodes: int | None = None,
    measured: SceneProbe | None = None,
) -> tuple[JobOptions, GridChoice]:
    """The options with their grid settled, and what that grid costs (an estimate from
    the margins' pixels, renderers.auto_tiles). With `auto_nodes` (`--tiles auto`) the
    grid is chosen for that many nodes and the job's frames, with tiles no smaller than
    the scene's efficient size when `measured` (a probe) gives its fixed cost per render;
    else it is the options'."""
    spec = job_spec_for(info, options)
    width, height = spec.effective_size()
    margin = margin_for(spec)
    if auto_nodes is None:
        return options, grid_cost(width, height, spec.tiles.columns, spec.tiles.rows, margin)
    smallest = None
    if measured is not None:
        smallest = efficient_tile_pixels(
            measured.fixed_seconds, measured.scene_seconds, spec.effective_samples
        )
    choice = choose_grid(
        width,
        height,
        nodes=max(1, auto_nodes),
        frames=len(spec.frames.frames()),
        margin=margin,
        min_tile_pixels=smallest,
    )
    tiles = TileGrid(columns=choice.columns, rows=choice.rows)
    return options.model_copy(update={"tiles": tiles}), choice


def probe_fits(measured: SceneProbe, frames: FrameRange, samples: int) -> bool:
    """Whether a probe made before serves a job of `frames` at `samples`: its previews
    are of the frames the job would preview, at no more samples than the job renders."""
    wanted = preview_frames(frames.frames())
    shown = [image.frame for image in measured.previews]
    return shown == wanted and all(image.samples <= samples for image in measured.previews)


def frame_preview(image: PreviewImage) -> FramePreview:
    """A probe's preview as the job spec carries it."""
    return FramePreview(
        frame=image.frame, width=image.width, height=image.height, luminance=image.luminance
    )


def _frame_range(frames: str | None, info: SceneInfo) -> FrameRange:
    try:
        if frames is None:
            return FrameRange(
                start=info.frame_start, end=info.frame_end, step=max(1, info.frame_step)
            )
        return FrameRange.parse(frames)
    except ValidationError as exc:
        detail = describe_validation_error(exc)
        if not detail.lower().startswith("frames"):
            detail = f"frames {frames or 'of the scene'}: {detail}"
        raise UsageError(
            detail[:1].upper() + detail[1:],
            hint='Write frames as "N", "A-B" or "A-BxSTEP", e.g. "1-24" or "1-24x2".',
        ) from exc
    except ValueError as exc:
        raise UsageError(
            str(exc), hint='Write frames as "N", "A-B" or "A-BxSTEP", e.g. "1-24".'
        ) from exc


def spec_with_bundle(
    info: SceneInfo, bundle: str, scene_path: str, options: dict[str, object]
) -> JobSpec:
    """A spec of `options` (a spec's fields) for `bundle`; `UsageError` when they do not
    fit the scene."""
    fields = {**options, "bundle": bundle, "scene_path": scene_path, "scene": scene_summary(info)}
    try:
        return JobSpec.model_validate(fields)
    except ValidationError as exc:
        raise UsageError(
            f"This job does not fit {info.path.name}: {describe_validation_error(exc)}",
            hint="Change the option named above (see `tessera submit --help`).",
        ) from exc


def scene_summary(info: SceneInfo) -> SceneSummary:
    """What the coordinator is told about the scene (it checks the spec against it)."""
    return SceneSummary(
        name=info.name,
        frame_start=info.frame_start,
        frame_end=info.frame_end,
        resolution_x=info.resolution_x,
        resolution_y=info.resolution_y,
        resolution_percentage=info.resolution_percentage,
        samples=info.samples,
        adaptive_sampling=info.adaptive_sampling,
        adaptive_threshold=info.adaptive_threshold,
        adaptive_min_samples=info.adaptive_min_samples,
        denoising=info.denoising,
        camera=info.camera,
        engine=info.engine,
        blender_version=info.blender_version,
        fps=info.fps if 0 < info.fps <= 1000 else 24.0,
        movie=movie_output(info),
    )


#: Blender's movie file extension per container (`render.ffmpeg.format`).
_MOVIE_EXTENSIONS = {
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


def movie_name(path: str, start: int, end: int, movie: dict[str, Any]) -> str:
    """A movie's file name as Blender gives it: the run of '#' becomes the frame range
    ('shot_####' -> 'shot_0001-0004'; none: the range is appended), then the container's
    extension (the inspection reports the path unexpanded for movies)."""
    name = path.replace("\\", "/")
    if name.endswith(tuple(_MOVIE_EXTENSIONS.values())):
        return name
    hashes = re.search(r"#+", name)
    if hashes is None:
        name = f"{name}{start:04d}-{end:04d}"
    else:
        width = len(hashes.group())
        span = f"{start:0{width}d}-{end:0{width}d}"
        name = name[: hashes.start()] + span + name[hashes.end() :]
    return name + _MOVIE_EXTENSIONS.get(str(movie.get("container")), "")


def movie_output(info: SceneInfo) -> MovieOutput | None:
    """The scene's movie settings, when it writes a movie the farm can encode."""
    output = info.output
    if output is None or output.movie is None or not output.frame_path:
        return None
    if movie_problem(output) is not None:
        return None  # frames only, as `inspect` warns
    movie = output.movie
    return MovieOutput(
        name=movie_name(output.frame_path, info.frame_start, info.frame_end, movie),
        container=str(movie["container"]),
        codec=str(movie["codec"]),
        fps=float(movie["fps"]) / float(movie.get("fps_base") or 1.0),
        crf=str(movie.get("crf", "MEDIUM")),
        preset=str(movie.get("preset", "GOOD")),
        gop=int(movie.get("gop", 18)),
        bitrate_kbps=max(1, int(movie.get("bitrate_kbps", 6000))),
        color_mode=str(movie.get("color_mode", "RGB")),
    )


def describe_validation_error(error: ValidationError) -> str:
    """pydantic's errors as one readable sentence: 'samples: must be >= 1; ...'."""
    parts = []
    for item in error.errors():
        message = str(item.get("msg", "")).removeprefix("Value error, ")
        where = ".".join(str(part) for part in item.get("loc", ()))
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)
