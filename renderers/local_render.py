"""Render one frame on this machine through one warm worker, tile by tile if asked.

This is the farm's render path without the farm: the same region plan, the same
per-tile requests a node would receive, the same merge and the same single denoise of
the merged frame. `tessera render-local` and the tile benchmarks use it, and the tests
use it to prove that tiling changes no pixel.

It never touches the network and never imports bpy.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UsageError
from renderers.denoise import denoise_frame
from renderers.devices import parse_cycles_devices, resolve_device
from renderers.exr import ExrImage, read_exr, write_exr
from renderers.merge import merge_tiles
from renderers.preview import write_preview_png
from renderers.regions import (
    RegionPlan,
    Tile,
    border_fractions,
    effective_resolution,
    plan_frame,
    plan_grid,
)
from renderers.scene_info import SceneInfo, inspect_scene
from renderers.worker import ProgressCallback, RenderRequest, RenderWorker

MAX_PERCENTAGE = 32767  # Blender's own limit for resolution_percentage


@dataclass(frozen=True, slots=True)
class LocalRenderOptions:
    """What to render; None means "as the scene says"."""

    frame: int | None = None
    grid: tuple[int, int] = (1, 1)
    samples: int | None = None
    percentage: int | None = None
    seed: int | None = None
    adaptive_sampling: bool | None = None
    denoise: bool | None = None
    device: str = "CPU"
    threads: int = 0
    tile_timeout: float | None = None
    preview: bool = True
    #: Pixels rendered around each tile instead of the derived margin (None: derived,
    #: see renderers.regions.render_margin). For experiments that measure the margin.
    margin: int | None = None

    def validate(self) -> None:
        columns, rows = self.grid
        if columns < 1 or rows < 1:
            raise UsageError(f"A tile grid needs at least 1x1, got {columns}x{rows}.")
        if self.samples is not None and self.samples < 1:
            raise UsageError(f"--samples must be at least 1, got {self.samples}.")
        if self.percentage is not None and not 1 <= self.percentage <= MAX_PERCENTAGE:
            raise UsageError(
                f"--percentage must be between 1 and {MAX_PERCENTAGE}, got {self.percentage}."
            )
        if self.threads < 0:
            raise UsageError(f"--threads must be 0 (all cores) or more, got {self.threads}.")
        if self.margin is not None and self.margin < 0:
            raise UsageError(f"A tile margin must be 0 or more pixels, got {self.margin}.")


@dataclass(frozen=True, slots=True)
class TileDone:
    """Reported after each tile: which one, how many are done, and how long it took."""

    tile: Tile
    done: int
    total: int
    seconds: float


TileCallback = Callable[[TileDone], None]


@dataclass(slots=True)
class LocalRenderResult:
    output: Path
    preview: Path | None
    scene: SceneInfo
    frame: int
    width: int
    height: int
    plan: RegionPlan
    device: str
    denoised: bool
    render_seconds: float = 0.0
    merge_seconds: float = 0.0
    denoise_seconds: float = 0.0
    wall_seconds: float = 0.0
    tile_seconds: list[float] = field(default_factory=list)
    #: Seconds per stage summed over the tiles: Blender's own (see RenderResult.stages)
    #: plus `read` (reading each tile's EXR back here).
    stage_seconds: dict[str, float] = field(default_factory=dict)


def plan_for_scene(scene: SceneInfo, options: LocalRenderOptions) -> RegionPlan:
    """The region plan for a scene: grid over the effective resolution, with a margin when
    adaptive sampling is on (its convergence mask crosses tile edges)."""
    percentage = options.percentage or scene.resolution_percentage
    width, height = effective_resolution(scene.resolution_x, scene.resolution_y, percentage)
    adaptive = (
        scene.adaptive_sampling if options.adaptive_sampling is None else options.adaptive_sampling
    )
    columns, rows = options.grid
    if options.margin is not None:
        return plan_grid(width, height, columns, rows, margin=options.margin)
    return plan_frame(
        width,
        height,
        columns,
        rows,
        adaptive_sampling=adaptive,
        samples=options.samples or scene.samples,
        adaptive_threshold=scene.adaptive_threshold,
        adaptive_min_samples=scene.adaptive_min_samples,
    )


def render_frame_local(
    worker: RenderWorker,
    scene_path: Path,
    output: Path,
    options: LocalRenderOptions,
    *,
    on_tile: TileCallback | None = None,
    on_progress: ProgressCallback | None = None,
) -> LocalRenderResult:
    """Render one frame of `scene_path` to `output` (multilayer EXR) and a PNG beside it."""
    started = time.monotonic()
    options.validate()
    scene = inspect_scene(worker, scene_path)
    device = _resolve(worker, options.device)
    frame = scene.frame_start if options.frame is None else options.frame
    plan = plan_for_scene(scene, options)
    denoise = scene.denoising if options.denoise is None else options.denoise
    result = LocalRenderResult(
        output=output,
        preview=None,
        scene=scene,
        frame=frame,
        width=plan.width,
        height=plan.height,
        plan=plan,
        device=device,
        denoised=denoise,
    )
    with tempfile.TemporaryDirectory(prefix="tessera-tiles-") as scratch:
        tile_images: dict[int, ExrImage] = {}
        for tile in plan.tiles:
            tile_path = Path(scratch) / f"tile_{tile.index:04d}.exr"
            request = RenderRequest(
                scene=scene.path,
                frame=frame,
                output=tile_path,
                border=None
                if plan.is_whole_frame
                else border_fractions(tile.render, plan.width, plan.height),
                samples=options.samples,
                percentage=options.percentage,
                seed=options.seed,
                adaptive_sampling=options.adaptive_sampling,
                denoise_data=denoise,
                device=device,
                threads=options.threads,
            )
            rendered = worker.render(request, on_progress=on_progress, timeout=options.tile_timeout)
            result.tile_seconds.append(rendered.seconds)
            result.render_seconds += rendered.seconds
            for stage, seconds in rendered.stages.items():
                result.stage_seconds[stage] = result.stage_seconds.get(stage, 0.0) + seconds
            read_started = time.monotonic()
            tile_images[tile.index] = read_exr(tile_path)
            result.stage_seconds["read"] = (
                result.stage_seconds.get("read", 0.0) + time.monotonic() - read_started
            )
            if on_tile is not None:
                on_tile(TileDone(tile, len(tile_images), len(plan.tiles), rendered.seconds))
        merge_started = time.monotonic()
        frame_image = merge_tiles(plan, tile_images)
        result.merge_seconds = time.monotonic() - merge_started
    if denoise:
        denoise_started = time.monotonic()
        frame_image = denoise_frame(worker, frame_image, samples=options.samples or scene.samples)
        result.denoise_seconds = time.monotonic() - denoise_started
    output.parent.mkdir(parents=True, exist_ok=True)
    write_exr(output, frame_image)
    if options.preview:
        result.preview = write_preview_png(frame_image, output.with_suffix(".png"))
    result.wall_seconds = time.monotonic() - started
    return result


def _resolve(worker: RenderWorker, requested: str) -> str:
    if requested.upper() == "CPU":
        return "CPU"
    return resolve_device(requested, parse_cycles_devices(worker.devices()))
