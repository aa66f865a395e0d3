"""One job seen close up: its frame strip and the tile grid of the selected frame, and
on a second tab its task log.

`JobView.set_job(job, tasks, previews)` is built from plain models (a `Job`, its
`Task` list, preview PNG bytes keyed by task id); the Jobs page fetches those in the
background (`JobDetail`) and hands them over. Picking a frame in the strip emits
`frame_changed`, so the page fetches that frame's previews next.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from PySide6.QtCore import Signal
from PySide6.QtGui import QImage
from PySide6.QtWidgets import QHBoxLayout, QLabel, QTabWidget, QVBoxLayout, QWidget

from app.cost_text import cost_lines
from app.gui.task_log import TaskLog
from app.gui.tile_grid import STATE_COLOURS, TILE_KINDS, FrameStrip, TileGrid, TileState
from protocol.models import Job, Task, TaskStatus

#: The frame strip lists at most this many frames (a long animation is scrolled through
#: by its first frames; the rest show once earlier ones finish).
MAX_STRIP_FRAMES = 2000


@dataclass(frozen=True, slots=True)
class JobDetail:
    """What the Jobs page fetched for its selected job: every task, the previews not
    fetched before (for `frame`'s accepted tiles) and the names of the rendering nodes."""

    job_id: str
    frame: int | None
    tasks: list[Task]
    previews: dict[str, bytes] = field(default_factory=dict)
    node_names: dict[str, str] = field(default_factory=dict)


def job_frames(job: Job) -> list[int]:
    frames = job.spec.frames.frames()
    return list(frames[:MAX_STRIP_FRAMES])


def accepted_tiles(tasks: Sequence[Task], frame: int) -> list[Task]:
    """The tile tasks of `frame` whose result was accepted (they have a preview)."""
    return [
        task
        for task in tasks
        if task.frame == frame and task.kind in TILE_KINDS and task.status is TaskStatus.COMPLETED
    ]


def _legend() -> str:
    swatches = []
    for state in (
        TileState.QUEUED,
        TileState.RENDERING,
        TileState.CHECKING,
        TileState.ACCEPTED,
        TileState.REJECTED,
    ):
        colour = STATE_COLOURS[state].name()
        swatches.append(f"<span style='color:{colour}'>■</span> {state.value}")
    return " &nbsp; ".join(swatches)


class JobView(QWidget):
    """The selected job's frames and the tiles of one of them; its task log."""

    frame_changed = Signal(int)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.heading = QLabel("Select a job to watch its tiles.")
        #: What the job cost: per successful frame, success rate, waste, estimate vs final.
        self.cost = QLabel()
        self.cost.setWordWrap(True)
        self.strip = FrameStrip()
        self.grid = TileGrid()
        self.tile_summary = QLabel()
        legend = QLabel(_legend())
        self.log = TaskLog()
        self._job: Job | None = None
        self._frame: int | None = None
        self.strip.frame_selected.connect(self._on_frame_selected)
        footer = QHBoxLayout()
        footer.addWidget(self.tile_summary, 1)
        footer.addWidget(legend)
        tiles = QWidget()
        tiles_layout = QVBoxLayout(tiles)
        tiles_layout.setContentsMargins(0, 0, 0, 0)
        tiles_layout.addWidget(self.strip)
        tiles_layout.addWidget(self.grid, 1)
        tiles_layout.addLayout(footer)
        self.tabs = QTabWidget()
        self.tabs.addTab(tiles, "Tiles")
        self.tabs.addTab(self.log, "Task log")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.heading)
        layout.addWidget(self.cost)
        layout.addWidget(self.tabs, 1)
        self._tasks: list[Task] = []
        self._previews: Mapping[str, QImage | bytes] = {}
        self._node_names: Mapping[str, str] = {}

    @property
    def job_id(self) -> str | None:
        return self._job.id if self._job is not None else None

    @property
    def frame(self) -> int | None:
        return self._frame

    def set_job(
        self,
        job: Job | None,
        tasks: Sequence[Task] = (),
        previews: Mapping[str, QImage | bytes] | None = None,
        node_names: Mapping[str, str] | None = None,
    ) -> None:
        """Show `job` (None: nothing selected) with its tasks and the previews known."""
        if job is None:
            self._job, self._frame = None, None
            self.heading.setText("Select a job to watch its tiles.")
            self.cost.clear()
            self.strip.set_frames([], [], None)
            self.grid.clear()
            self.tile_summary.clear()
            self.log.set_tasks([])
            return
        if self._job is None or self._job.id != job.id:
            self._frame = None
        self._job = job
        self._tasks = list(tasks)
        self._previews = previews or {}
        self._node_names = node_names or {}
        frames = job_frames(job)
        if self._frame not in frames:
            self._frame = frames[0] if frames else None
        done = len(job.frames_done)
        self.heading.setText(
            f"<b>{job.name}</b> — {job.status.value}, {done} of "
            f"{job.progress.frames_total} frame(s) done"
        )
        self.cost.setText("Cost: " + "<br>".join(html.escape(line) for line in cost_lines(job)))
        self.strip.set_frames(frames, job.frames_done, self._frame)
        self.log.set_tasks(self._tasks, self._node_names)
        self._show_frame()

    def _show_frame(self) -> None:
        job, frame = self._job, self._frame
        if job is None or frame is None:
            self.grid.clear()
            return
        tiles = job.spec.tiles
        self.grid.set_tiles(
            tiles.columns,
            tiles.rows,
            [task for task in self._tasks if task.frame == frame],
            self._previews,
            frame_size=job.spec.effective_size(),
            node_names=self._node_names,
        )
        counts = self.grid.counts()
        total = tiles.columns * tiles.rows
        self.tile_summary.setText(
            f"Frame {frame}: {counts[TileState.ACCEPTED]} of {total} tile(s) accepted"
        )

    def _on_frame_selected(self, frame: int) -> None:
        if frame == self._frame:
            return
        self._frame = frame
        self._show_frame()
        self.frame_changed.emit(frame)
