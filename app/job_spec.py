"""From an artist's choices to a job spec: `JobOptions` (the CLI's flags, the Submit
page's form) plus an inspected scene make a `protocol.models.JobSpec`.

`job_options` builds the options and turns pydantic's complaint into a `UsageError`;
`job_spec_for` checks them against a `SceneInfo` (no Blender, no I/O); `describe_job`
inspects and probes the scene in a render worker first (its cost relative to the
benchmark scene and tiny previews of its frames, `renderers.scene_probe`), which is all
the coordinator needs to estimate the job. Packing and uploading are `app.submit`'s.
No Qt and no printing here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from common.errors import UsageError
from protocol.models import FramePreview, FrameRange, JobOptions, JobSpec, SceneSummary
from renderers.scene_info import SceneInfo, inspect_scene
from renderers.scene_probe import PreviewImage, SceneProbe, preview_frames, probe_scene
from renderers.worker import RenderWorker

#: A placeholder hash for checking a spec before the bundle exists.
_NO_BUNDLE = "0" * 64
DEFAULT_OPTIONS = JobOptions()


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
    do not fit the scene."""
    fields: dict[str, object] = {
        **options.model_dump(exclude={"frames"}),
        "name": options.name or info.path.stem,
        "frames": _frame_range(options.frames, info),
    }
    if measured is not None:
        fields["scene_cost"] = round(measured.cost, 4)
        fields["previews"] = [frame_preview(image) for image in measured.previews]
    return spec_with_bundle(info, bundle, scene_path, fields)


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
        denoising=info.denoising,
        camera=info.camera,
        engine=info.engine,
        blender_version=info.blender_version,
    )


def describe_validation_error(error: ValidationError) -> str:
    """pydantic's errors as one readable sentence: 'samples: must be >= 1; ...'."""
    parts = []
    for item in error.errors():
        message = str(item.get("msg", "")).removeprefix("Value error, ")
        where = ".".join(str(part) for part in item.get("loc", ()))
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)
