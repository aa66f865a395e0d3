"""The submit-time probe: how expensive a scene is, and tiny previews of its frames.

`probe_scene` runs on the submitter's machine, through the warm render worker that just
inspected the scene, and measures two things the farm cannot learn any other way:

- **cost**: the scene's render time per pixel-sample relative to the benchmark scene
  (the demo scene, frame 1, which the nodes' benchmark scores are measured with). Both
  scenes render the same pixel count at `COST_SAMPLES` and at `COST_BASE_SAMPLES`
  samples on the same machine in the same worker; the difference of the two times is
  the time of `COST_SAMPLES - COST_BASE_SAMPLES` samples, free of the fixed costs of a
  render (scene sync, writing the file). Each pair is timed `COST_REPEATS` times and the
  fastest kept (other load only ever slows a render). The first render of each scene
  (loading it, building its BVH) is never timed. The benchmark scene is the same on
  every probe, so its side can be remembered per machine (`benchmark_memo`: the caller
  keys it by Blender build, device and CPU) and only the scene's side is rendered.
- **memory**: the scene's peak render memory as a function of the pixels rendered,
  from two one-sample renders with the job's denoising (`renderers.scene_memory`); the
  app turns it into the job's default VRAM and RAM requirements.
- **previews**: the job's first, middle and last frame rendered at a size that fits
  `PREVIEW_MAX_SIDE` x `PREVIEW_MAX_SIDE` with the frame's aspect, at most
  `PREVIEW_MAX_SAMPLES` samples, seed 0, no denoising, as Rec.709 linear luminance
  (row 0 at the top). The coordinator refuses a flat or black tile where these show
  something else (coordinator/verify/upload_checks.py).

Limits, stated plainly: the cost comes from renders of a fraction of a second, so it is
noisy (+-30 % seen on a busy 2-core machine), it is measured on the submitter's CPU (a scene
that is cheap on a GPU but slow on a CPU, or the reverse, is priced by its CPU cost),
with adaptive sampling off, and on one frame. It is also measured by the submitter, who
could lie: the coordinator bounds it (`JobSpec.scene_cost`, 0.01 to 1000) and must treat
it as a claim. A probe takes about two seconds for the demo scene and grows with the
scene's cost (previews use fewer samples when one takes longer than
`PREVIEW_SECONDS`).

This module only drives the worker and reads its EXRs: no bpy (Blender runs in the
worker process), no network, no protocol models (the app converts `PreviewImage`).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from common.errors import UsageError, WorkerError
from renderers.demo_scene import DEMO_SCENE, ensure_demo_scene, generate_demo_scene
from renderers.exr import read_exr
from renderers.regions import effective_resolution
from renderers.scene_info import SceneInfo, inspect_scene
from renderers.scene_memory import MemoryModel, measure_memory
from renderers.worker import RenderRequest, RenderResult, RenderWorker

__all__ = [
    "BENCHMARK_FRAME",
    "COST_BASE_SAMPLES",
    "COST_SAMPLES",
    "MAX_COST",
    "MIN_COST",
    "PREVIEW_MAX_FRAMES",
    "PREVIEW_MAX_SAMPLES",
    "PREVIEW_MAX_SIDE",
    "PreviewImage",
    "SceneProbe",
    "preview_frames",
    "preview_percentage",
    "probe_scene",
]

#: Previews fit this many pixels on each side (protocol.models.FramePreview's limit).
PREVIEW_MAX_SIDE = 64
#: The most samples a preview pixel gets (coordinator/verify/upload_checks.py relies on it).
PREVIEW_MAX_SAMPLES = 16
PREVIEW_MAX_FRAMES = 3
#: A preview that took longer than this makes the next ones use fewer samples.
PREVIEW_SECONDS = 1.0
#: Luminance values are rounded to this many significant digits (keeps the spec small).
PREVIEW_DIGITS = 6

#: The benchmark scene's frame (farm_node/benchmark.py renders the same one).
BENCHMARK_FRAME = 1
COST_SAMPLES = 16
COST_BASE_SAMPLES = 1
COST_REPEATS = 2
#: Both scenes render this many pixels for their cost (the same count: a small render
#: keeps a many-core CPU less busy, and both should suffer that alike)...
COST_PIXELS = 8192
#: ...fewer for a scene whose COST_SAMPLES render would take longer than this...
COST_MAX_SECONDS = 1.5
#: ...but never fewer than this.
COST_MIN_PIXELS = 1024
#: A cost render this slow is not repeated (its noise is small next to its length).
COST_REPEAT_BELOW_SECONDS = 1.0
MIN_COST = 0.01
MAX_COST = 1000.0

_REC709 = np.array([0.2126, 0.7152, 0.0722], dtype=np.float64)


@dataclass(frozen=True, slots=True)
class PreviewImage:
    """A tiny render of one frame: linear Rec.709 luminance, row-major, row 0 at the top."""

    frame: int
    width: int
    height: int
    luminance: list[float]
    #: Samples per pixel it was rendered with (at most PREVIEW_MAX_SAMPLES).
    samples: int = PREVIEW_MAX_SAMPLES


@dataclass(frozen=True, slots=True)
class SceneProbe:
    """What `probe_scene` measured."""

    #: Render time per pixel-sample relative to the benchmark scene, MIN_COST..MAX_COST.
    cost: float
    previews: list[PreviewImage]
    #: Seconds per pixel-sample of the scene and of the benchmark scene on this machine.
    scene_seconds: float = 0.0
    benchmark_seconds: float = 0.0
    #: Wall-clock seconds the whole probe took.
    seconds: float = 0.0
    #: The scene's peak render memory by pixels rendered (`MemoryModel.peak`).
    memory: MemoryModel = field(default_factory=MemoryModel)
    #: Seconds one render of the scene costs whatever its pixels and samples (scene sync,
    #: BVH, writing the file): what every tile pays again (renderers.auto_tiles).
    fixed_seconds: float = 0.0
    #: Whether `benchmark_seconds` came from the caller's memo (not rendered this time).
    benchmark_remembered: bool = False


def preview_frames(frames: Sequence[int]) -> list[int]:
    """The job's first, middle and last frame, without repeats (at most 3)."""
    if not frames:
        raise UsageError("A scene probe needs at least one frame.")
    picked = [frames[0], frames[len(frames) // 2], frames[-1]]
    return list(dict.fromkeys(picked))[:PREVIEW_MAX_FRAMES]


def preview_percentage(resolution_x: int, resolution_y: int) -> int:
    """The largest resolution percentage (at most 100) whose frame fits the preview size;
    1 when even 1 % is larger (the preview is then scaled down after rendering)."""
    side = max(resolution_x, resolution_y)
    return max(1, min(100, PREVIEW_MAX_SIDE * 100 // side))


def probe_scene(
    worker: RenderWorker,
    scene: Path,
    frames: Sequence[int],
    *,
    samples: int | None,
    info: SceneInfo | None = None,
    benchmark_scene: Path | None = None,
    device: str = "CPU",
    timeout: float | None = 300.0,
    denoise: bool | None = None,
    benchmark_memo: MutableMapping[str, float] | None = None,
) -> SceneProbe:
    """Measure `scene`'s cost against the benchmark scene and render its previews.

    `frames` are the job's frames (previews of the first, middle and last); `samples` the
    job's samples (None: the scene's), which caps the preview samples; `info` the scene's
    inspection (done here when None; given, its `path` is what renders); `denoise` the
    job's denoising (None: the scene's), which the memory renders use.
    `benchmark_scene` defaults to the demo scene (generated when missing).
    `benchmark_memo` holds the benchmark scene's seconds per pixel-sample measured before
    on this machine, by pixel count (see the module): a known figure is used, a new one
    stored. The worker is left with the benchmark scene open, unless the memo knew it.
    Raises the worker's errors when a render fails,
    and UsageError for no frames or fewer than 1 sample.
    """
    started = time.monotonic()
    wanted = preview_frames(frames)
    if samples is not None and samples < 1:
        raise UsageError(f"A scene probe needs at least 1 sample, not {samples}.")
    if info is None:
        info = inspect_scene(worker, scene)
    # The path the worker opened when inspecting: the same string does not reload it.
    scene = info.path
    with tempfile.TemporaryDirectory(prefix="tessera-probe-") as scratch:
        run = _ProbeRun(worker, Path(scratch), device, timeout)
        previews, last_preview = _render_previews(
            run, scene, info, wanted, min(samples or info.samples, PREVIEW_MAX_SAMPLES)
        )
        # Keep a heavy scene's cost renders under COST_MAX_SECONDS, judging by the last
        # preview (an over-estimate: it includes the render's fixed costs).
        memory = measure_memory(
            lambda percentage: run.memory_render(
                scene, wanted[0], percentage, info.denoising if denoise is None else denoise
            ),
            info.resolution_x,
            info.resolution_y,
        )
        pixels, preview_samples, seconds = last_preview
        per_sample = seconds / max(1, pixels * preview_samples)
        target = round(COST_MAX_SECONDS / max(per_sample * COST_SAMPLES, 1e-12))
        target = max(COST_MIN_PIXELS, min(COST_PIXELS, target))
        scene_seconds = run.seconds_per_pixel_sample(
            scene, wanted[0], info.resolution_x, info.resolution_y, target
        )
        fixed_seconds = run.fixed_seconds
        memo_key = f"{target} px"
        benchmark_seconds = (benchmark_memo or {}).get(memo_key, 0.0)
        remembered = benchmark_seconds > 0
        if not remembered:
            # Inspecting loads the benchmark scene, so that load is never timed either.
            bench = inspect_scene(
                worker, benchmark_scene or _benchmark_scene(worker, Path(scratch))
            )
            benchmark_seconds = run.seconds_per_pixel_sample(
                bench.path, BENCHMARK_FRAME, bench.resolution_x, bench.resolution_y, target
            )
            if benchmark_memo is not None:
                benchmark_memo[memo_key] = benchmark_seconds
    cost = scene_seconds / max(benchmark_seconds, 1e-12)
    return SceneProbe(
        cost=min(MAX_COST, max(MIN_COST, cost)),
        previews=previews,
        scene_seconds=scene_seconds,
        benchmark_seconds=benchmark_seconds,
        seconds=time.monotonic() - started,
        memory=memory,
        fixed_seconds=fixed_seconds,
        benchmark_remembered=remembered,
    )


class _ProbeRun:
    """Renders through one worker into one scratch folder, every file under a new name
    (a new output path also makes Blender pick up changed settings with persistent data)."""

    def __init__(
        self, worker: RenderWorker, scratch: Path, device: str, timeout: float | None
    ) -> None:
        self.worker = worker
        self.scratch = scratch
        self.device = device.upper()
        self.timeout = timeout
        self.count = 0
        #: The fixed cost of one render, from the last `seconds_per_pixel_sample`.
        self.fixed_seconds = 0.0

    def render(
        self, scene: Path, frame: int, percentage: int, samples: int, denoise: bool = False
    ) -> RenderResult:
        self.count += 1
        request = RenderRequest(
            scene=scene,
            frame=frame,
            output=self.scratch / f"probe-{self.count:03d}.exr",
            samples=samples,
            percentage=percentage,
            seed=0,
            adaptive_sampling=False,
            denoise_data=denoise,
            denoise=denoise,
            device=self.device,
        )
        return self.worker.render(request, timeout=self.timeout)

    def memory_render(
        self, scene: Path, frame: int, percentage: int, denoise: bool
    ) -> tuple[int, int]:
        """(pixels, peak memory in bytes) of a one-sample render at `percentage`."""
        result = self.render(scene, frame, percentage, 1, denoise)
        return result.frame_width * result.frame_height, result.peak_memory

    def seconds_per_pixel_sample(
        self,
        scene: Path,
        frame: int,
        resolution_x: int,
        resolution_y: int,
        pixels: int,
    ) -> float:
        """Seconds per pixel-sample of `scene` at about `pixels` pixels (see the module).

        One untimed render first: it absorbs the scene's first sync (BVH build) after a
        load, a frame change or a resolution change."""
        percentage = _percentage_for_pixels(resolution_x, resolution_y, pixels)
        width, height = effective_resolution(resolution_x, resolution_y, percentage)
        self.render(scene, frame, percentage, COST_BASE_SAMPLES)
        best_high = best_low = math.inf
        for _ in range(COST_REPEATS):
            high = self.render(scene, frame, percentage, COST_SAMPLES).seconds
            low = self.render(scene, frame, percentage, COST_BASE_SAMPLES).seconds
            best_high, best_low = min(best_high, high), min(best_low, low)
            if high >= COST_REPEAT_BELOW_SECONDS:
                break
        # Timing noise can make the difference tiny or negative on a very cheap scene;
        # a floor of 5 % of the whole render keeps the ratio finite and positive.
        difference = max(best_high - best_low, 0.05 * best_high)
        per_pixel_sample = difference / (width * height * (COST_SAMPLES - COST_BASE_SAMPLES))
        # The time a render takes at no samples at all: its fixed cost.
        self.fixed_seconds = max(
            0.0, best_low - per_pixel_sample * width * height * COST_BASE_SAMPLES
        )
        return per_pixel_sample


def _render_previews(
    run: _ProbeRun, scene: Path, info: SceneInfo, frames: list[int], samples: int
) -> tuple[list[PreviewImage], tuple[int, int, float]]:
    """Previews of `frames` (in that order), and (pixels, samples, seconds) of the last one
    rendered, which is `frames[0]`: the cost renders follow on the same frame."""
    percentage = preview_percentage(info.resolution_x, info.resolution_y)
    width, height = effective_resolution(info.resolution_x, info.resolution_y, percentage)
    order = list(reversed(frames))
    run.render(scene, order[0], percentage, 1)  # loads the scene: not a preview, not timed
    previews: dict[int, PreviewImage] = {}
    last = (width * height, samples, 0.0)
    for frame in order:
        result = run.render(scene, frame, percentage, samples)
        last = (width * height, samples, result.seconds)
        preview = _preview_image(frame, result.output, samples)
        if preview is not None:
            previews[frame] = preview
        if result.seconds > PREVIEW_SECONDS and samples > 1:
            samples = max(1, math.floor(samples * PREVIEW_SECONDS / result.seconds))
    return [previews[f] for f in frames if f in previews], last


def _preview_image(frame: int, path: Path, samples: int) -> PreviewImage | None:
    """The luminance of a rendered preview, scaled to fit; None if it is not finite."""
    rgb = read_exr(path).combined_rgba()[..., :3].astype(np.float64)
    luminance: npt.NDArray[np.float64] = rgb @ _REC709
    if not np.isfinite(luminance).all():
        return None
    luminance = _fit(luminance, PREVIEW_MAX_SIDE)
    height, width = luminance.shape
    values = [float(f"{value:.{PREVIEW_DIGITS}g}") for value in luminance.ravel().tolist()]
    return PreviewImage(frame, width, height, values, samples)


def _fit(pixels: npt.NDArray[np.float64], side: int) -> npt.NDArray[np.float64]:
    """Box-average `pixels` down to fit side x side, keeping the aspect. Every source
    pixel goes to the preview pixel its centre falls in, so preview pixel j still covers
    the frame's [j / W, (j + 1) / W) as an unscaled render does."""
    height, width = pixels.shape
    if width <= side and height <= side:
        return pixels
    scale = side / max(width, height)
    out_w = max(1, min(side, round(width * scale)))
    out_h = max(1, min(side, round(height * scale)))
    columns = ((np.arange(width) + 0.5) * out_w / width).astype(np.int64)
    rows = ((np.arange(height) + 0.5) * out_h / height).astype(np.int64)
    sums = np.zeros((out_h, out_w), dtype=np.float64)
    counts = np.zeros((out_h, out_w), dtype=np.float64)
    np.add.at(sums, (rows[:, None], columns[None, :]), pixels)
    np.add.at(counts, (rows[:, None], columns[None, :]), 1.0)
    result: npt.NDArray[np.float64] = sums / counts
    return result


def _percentage_for_pixels(resolution_x: int, resolution_y: int, pixels: int) -> int:
    """The resolution percentage (1..100) whose frame has about `pixels` pixels."""
    exact = 100 * math.sqrt(pixels / (resolution_x * resolution_y))
    return max(1, min(100, round(exact)))


def _benchmark_scene(worker: RenderWorker, scratch: Path) -> Path:
    """The demo scene: the repository's copy, or one generated into `scratch` when that
    copy is missing and its folder is not writable (an installed app)."""
    try:
        return ensure_demo_scene(worker.build)
    except (OSError, WorkerError):
        if DEMO_SCENE.exists():
            return DEMO_SCENE
        return generate_demo_scene(worker.build, scratch / "benchmark" / "demo.blend")
