"""Planning: the tasks a job needs, of every kind, and who can run them.

Every task the farm ever creates is described here as a `NewTask` (a job's render tiles,
a duplicate sample's window, a backup copy of a slow tile, a frame's denoise and its
finish) and written by `coordinator.task_states`. Pure: no database, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from coordinator.matching import Candidate, node_meets
from protocol.models import (
    JobSpec,
    NodeCapabilities,
    Region,
    RenderAssignment,
    TaskKind,
)
from renderers.regions import PixelRect, RegionPlan, Tile, plan_grid, render_margin

__all__ = [
    "NewTask",
    "backup_task",
    "denoise_task",
    "finish_task",
    "frame_assignments",
    "lease_device",
    "margin_for",
    "node_can_run",
    "plan_assignments",
    "plan_for",
    "plan_of_tasks",
    "render_tasks",
    "task_count",
    "verify_task",
]


@dataclass(frozen=True, slots=True)
class NewTask:
    """A task about to be inserted (queued, no attempts yet)."""

    id: str
    job_id: str
    kind: TaskKind
    frame: int
    tile_index: int
    assignment: str | None = None
    denoise_input: str | None = None
    verifies: str | None = None
    excluded_owners: str = ""
    backs_up: str | None = None


def plan_for(spec: JobSpec) -> RegionPlan:
    """The region plan of every frame of a job (the same for all its frames)."""
    width, height = spec.effective_size()
    return plan_grid(width, height, spec.tiles.columns, spec.tiles.rows, margin_for(spec))


def plan_of_tasks(spec: JobSpec, assignments: dict[int, RenderAssignment]) -> RegionPlan:
    """The plan a frame's tiles were really rendered with: their assignments' regions.
    A job planned under an older margin rule (before the margin was derived) keeps its
    own margins; without an assignment for every tile, `plan_for(spec)`."""
    plan = plan_for(spec)
    if any(tile.index not in assignments for tile in plan.tiles):
        return plan
    tiles = []
    for tile in plan.tiles:
        core, render = assignments[tile.index].core_region, assignments[tile.index].render_region
        tiles.append(
            Tile(
                tile.index,
                tile.column,
                tile.row,
                PixelRect(core.x0, core.y0, core.x1, core.y1),
                PixelRect(render.x0, render.y0, render.x1, render.y1),
            )
        )
    margin = max(max(t.core.x0 - t.render.x0, t.render.x1 - t.core.x1) for t in tiles)
    return RegionPlan(plan.width, plan.height, margin, tuple(tiles))


def margin_for(spec: JobSpec) -> int:
    """Pixels every region of the job renders beyond its core (renderers.regions)."""
    scene = spec.scene
    return render_margin(
        scene.adaptive_sampling,
        samples=spec.effective_samples,
        adaptive_threshold=scene.adaptive_threshold,
        adaptive_min_samples=scene.adaptive_min_samples,
    )


def task_count(spec: JobSpec) -> int:
    """How many render tasks the job has, from arithmetic alone (nothing is built)."""
    return len(spec.frames.frames()) * spec.tiles.columns * spec.tiles.rows


def frame_assignments(spec: JobSpec, frame: int) -> list[tuple[int, RenderAssignment]]:
    """(tile index, assignment) of the render tasks of one frame of a job.

    Every assignment names the render settings the job is priced for (its effective
    samples and percentage, the scene's declared resolution): a node forces them, so it
    never renders more than was paid for, whatever the .blend holds.
    """
    plan = plan_for(spec)
    return [
        (
            tile.index,
            RenderAssignment(
                frame=frame,
                width=plan.width,
                height=plan.height,
                render_region=Region(**_rect(tile.render)),
                core_region=Region(**_rect(tile.core)),
                whole_frame=plan.is_whole_frame,
                samples=spec.effective_samples,
                percentage=spec.effective_percentage,
                resolution_x=spec.scene.resolution_x,
                resolution_y=spec.scene.resolution_y,
                denoise_data=spec.wants_denoise and not plan.is_whole_frame,
                denoise_in_render=spec.wants_denoise and plan.is_whole_frame,
            ),
        )
        for tile in plan.tiles
    ]


def plan_assignments(spec: JobSpec) -> list[tuple[int, RenderAssignment]]:
    """(tile index, assignment) of every render task of a job, frame by frame. Callers
    bound `task_count(spec)` first: this builds every one of them."""
    first = frame_assignments(spec, spec.frames.start)
    return [
        (index, assignment.model_copy(update={"frame": frame}))
        for frame in spec.frames.frames()
        for index, assignment in first
    ]


def render_tasks(job_id: str, assignments: list[tuple[int, RenderAssignment]]) -> list[NewTask]:
    """The render tasks of a new job."""
    return [
        NewTask(
            id=f"{job_id}-f{a.frame}-t{index}",
            job_id=job_id,
            kind=TaskKind.RENDER,
            frame=a.frame,
            tile_index=index,
            assignment=a.model_dump_json(),
        )
        for index, a in assignments
    ]


def verify_task(
    tile: Any, number: int, window: RenderAssignment, excluded_owners: set[str]
) -> NewTask:
    """The `number`th duplicate sample of `tile` (a task row): a window of it, rendered
    by a node of none of `excluded_owners`."""
    return NewTask(
        id=f"{tile['id']}-v{number}",
        job_id=tile["job_id"],
        kind=TaskKind.VERIFY,
        frame=tile["frame"],
        tile_index=tile["tile_index"],
        assignment=window.model_dump_json(),
        verifies=tile["id"],
        excluded_owners=",".join(sorted(excluded_owners)),
    )


def backup_task(tile: Any, number: int) -> NewTask:
    """The `number`th backup copy of a slow render task (a task row)."""
    return NewTask(
        id=f"{tile['id']}-b{number}",
        job_id=tile["job_id"],
        kind=TaskKind.BACKUP,
        frame=tile["frame"],
        tile_index=tile["tile_index"],
        assignment=tile["assignment"],
        backs_up=tile["id"],
    )


def denoise_task(job_id: str, frame: int, merged_sha: str) -> NewTask:
    """The denoise of a merged frame (its id is fixed: a frame is denoised once)."""
    return _frame_task(job_id, frame, TaskKind.DENOISE, merged_sha)


def finish_task(job_id: str, frame: int, frame_sha: str) -> NewTask:
    """The finish of a final frame into the scene's own files (once per frame)."""
    return _frame_task(job_id, frame, TaskKind.FINISH, frame_sha)


def _frame_task(job_id: str, frame: int, kind: TaskKind, input_sha: str) -> NewTask:
    """A whole frame's task on a stored input; its id is fixed (`-denoise`, `-finish`)."""
    return NewTask(
        id=f"{job_id}-f{frame}-{kind.value}",
        job_id=job_id,
        kind=kind,
        frame=frame,
        tile_index=0,
        denoise_input=input_sha,
    )


def node_can_run(
    caps: NodeCapabilities, spec: JobSpec, pools: frozenset[str] = frozenset()
) -> bool:
    """Whether a node declaring `caps`, serving `pools`, meets the job's requirements
    (its price aside); see `coordinator.matching`."""
    return node_meets(Candidate(caps, pools), spec)


def lease_device(spec: JobSpec) -> str:
    """The device a lease names: a job that takes any device renders on CPU, so that the
    tiles of one frame never mix device classes."""
    return "CPU" if spec.device == "ANY" else spec.device


def _rect(rect: Any) -> dict[str, int]:
    return {"x0": rect.x0, "y0": rect.y0, "x1": rect.x1, "y1": rect.y1}
