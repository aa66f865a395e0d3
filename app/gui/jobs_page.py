"""The Jobs page: a table of the user's jobs with pause, resume and cancel, and the
selected job's frame strip and live tile grid.

`JobsTable` shows a list of `protocol.models.Job` (name, status, a progress bar, frames
done of total, priority, the coordinator's message) and is built from plain models
(`set_jobs`); `JobView` (app/gui/job_view.py) shows one job's frames and tiles. On every
refresh `JobsPage` fetches, in the background through `TesseraClient`, the jobs, and for
the selected job its tasks, the preview PNGs of the selected frame's accepted tiles not
fetched before, and the names of the nodes rendering it. What a job costs is not shown
yet: the coordinator's job model carries no credits, and summing the wallet's latest
ledger entries per job would be wrong for long histories.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSplitter,
    QTableWidget,
    QVBoxLayout,
    QWidget,
)

from app.gui.background import BackgroundWork
from app.gui.connection import FarmConnection
from app.gui.farm_page import FarmPage
from app.gui.job_view import JobDetail, JobView, accepted_tiles, job_frames
from app.gui.tables import cell, configure_table
from common.errors import TesseraError
from protocol.client import TesseraClient
from protocol.models import FINISHED_JOB_STATES, Job, JobStatus, TaskStatus

#: Preview PNGs kept for the selected job (a 16x16 grid fills 256; more are refetched).
MAX_CACHED_PREVIEWS = 1024

JOB_COLUMNS = ("Name", "Status", "Progress", "Frames", "Priority", "Message")
PROGRESS_COLUMN = JOB_COLUMNS.index("Progress")


def job_percent(job: Job) -> int:
    """Finished tasks as a percentage (tasks, not frames: tiles fill a frame gradually)."""
    total = job.progress.tasks_total
    return 100 * job.progress.tasks_done // total if total else 0


class JobsTable(QTableWidget):
    """The jobs, newest first as the coordinator lists them; keeps the selection by id."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        configure_table(self, JOB_COLUMNS)
        self._ids: list[str] = []

    def set_jobs(self, jobs: Sequence[Job]) -> None:
        selected = self.selected_job_id()
        self.setRowCount(len(jobs))
        self._ids = [job.id for job in jobs]
        for row, job in enumerate(jobs):
            progress = job.progress
            self.setItem(row, 0, cell(job.name, tooltip=job.id))
            self.setItem(row, 1, cell(job.status.value))
            bar = QProgressBar()
            bar.setRange(0, 100)
            bar.setValue(job_percent(job))
            self.setCellWidget(row, PROGRESS_COLUMN, bar)
            frames = f"{progress.frames_done}/{progress.frames_total}"
            self.setItem(row, 3, cell(frames, align_right=True))
            self.setItem(row, 4, cell(str(job.priority), align_right=True))
            self.setItem(row, 5, cell(job.message, tooltip=job.message))
        if selected in self._ids:
            self.selectRow(self._ids.index(selected))

    def select_job(self, job_id: str) -> bool:
        """Select the row of `job_id`; False when the table does not list it."""
        if job_id not in self._ids:
            return False
        self.selectRow(self._ids.index(job_id))
        return True

    def selected_job_id(self) -> str | None:
        rows = self.selectionModel().selectedRows() if self.selectionModel() else []
        if not rows or rows[0].row() >= len(self._ids):
            return None
        return self._ids[rows[0].row()]

    def progress_bar(self, row: int) -> QProgressBar:
        widget = self.cellWidget(row, PROGRESS_COLUMN)
        assert isinstance(widget, QProgressBar)
        return widget


@dataclass(frozen=True, slots=True)
class _DetailRequest:
    """What a refresh fetches beyond the job list (captured on the GUI thread)."""

    job_id: str | None
    frame: int | None
    known_previews: frozenset[str]


@dataclass(frozen=True, slots=True)
class JobsData:
    jobs: list[Job]
    detail: JobDetail | None


def fetch_detail(
    client: TesseraClient, job: Job, frame: int | None, known: frozenset[str]
) -> JobDetail:
    """A job's tasks, the previews of `frame`'s accepted tiles not in `known`, and the
    names of the nodes rendering it (worker thread)."""
    tasks = client.tasks(job.id)
    if frame is None:
        frames = job_frames(job)
        frame = frames[0] if frames else None
    previews: dict[str, bytes] = {}
    if frame is not None:
        wanted = [task for task in accepted_tiles(tasks, frame) if task.id not in known]
        if wanted:
            with tempfile.TemporaryDirectory(prefix="tessera-previews-") as scratch:
                for task in wanted:
                    path = client.download_task_preview(task.id, Path(scratch) / f"{task.id}.png")
                    previews[task.id] = path.read_bytes()
    names: dict[str, str] = {}
    if any(task.status is TaskStatus.ACTIVE for task in tasks):
        try:
            names = {node.id: node.capabilities.name for node in client.nodes()}
        except TesseraError:
            names = {}  # the tile then shows the node's id
    return JobDetail(job.id, frame, tasks, previews, names)


class JobsPage(FarmPage):
    """The jobs table, the buttons that act on the selected job, and its job view."""

    def __init__(
        self, work: BackgroundWork, connection: FarmConnection, parent: QWidget | None = None
    ) -> None:
        super().__init__(work, connection, parent)
        self.table = JobsTable()
        self.view = JobView()
        self.summary = QLabel("Loading jobs…")
        self.pause_button = QPushButton("Pause")
        self.resume_button = QPushButton("Resume")
        self.cancel_button = QPushButton("Cancel job")
        self.pause_button.setToolTip("Running tiles finish; no new ones start")
        self.cancel_button.setToolTip("Stop the job; finished frames stay downloadable")
        self.pause_button.clicked.connect(lambda: self._act_on_selected(TesseraClient.pause))
        self.resume_button.clicked.connect(lambda: self._act_on_selected(TesseraClient.resume))
        self.cancel_button.clicked.connect(lambda: self._act_on_selected(TesseraClient.cancel))
        self.table.itemSelectionChanged.connect(self._on_selection_changed)
        self.view.frame_changed.connect(lambda _frame: self.refresh())
        self._jobs: dict[str, Job] = {}
        self._detail: JobDetail | None = None
        self._previews: dict[str, bytes] = {}
        self._request = _DetailRequest(None, None, frozenset())
        self._pending_selection: str | None = None

        buttons = QHBoxLayout()
        buttons.addWidget(self.summary, 1)
        for button in (self.pause_button, self.resume_button, self.cancel_button):
            buttons.addWidget(button)
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(self.table)
        splitter.addWidget(self.view)
        splitter.setStretchFactor(0, 1)
        splitter.setStretchFactor(1, 2)
        layout = QVBoxLayout(self)
        layout.addLayout(buttons)
        layout.addWidget(splitter, 1)
        self._on_selection_changed()

    def select_job(self, job_id: str) -> None:
        """Select `job_id` now if listed, else as soon as a refresh lists it."""
        if not self.table.select_job(job_id):
            self._pending_selection = job_id
            self.refresh()

    def refresh(self) -> None:
        if self._refreshing:
            super().refresh()  # marks the data in flight stale: fetched again after
            return
        job_id = self.table.selected_job_id() or self._pending_selection
        frame = self.view.frame if self.view.job_id == job_id else None
        self._request = _DetailRequest(job_id, frame, frozenset(self._previews))
        super().refresh()

    def fetch(self, client: TesseraClient) -> JobsData:
        request = self._request
        jobs = client.jobs()
        job = next((job for job in jobs if job.id == request.job_id), None)
        if job is None:
            return JobsData(jobs, None)
        return JobsData(jobs, fetch_detail(client, job, request.frame, request.known_previews))

    def present(self, data: JobsData) -> None:
        self._jobs = {job.id: job for job in data.jobs}
        if data.detail is not None:
            if self._detail is None or self._detail.job_id != data.detail.job_id:
                self._previews = {}
            if len(self._previews) > MAX_CACHED_PREVIEWS:
                self._previews = {}
            self._previews.update(data.detail.previews)
            self._detail = data.detail
        self.table.blockSignals(True)  # one selection update below, not one per row
        try:
            self.table.set_jobs(data.jobs)
            pending = self._pending_selection
            if pending is not None and self.table.select_job(pending):
                self._pending_selection = None
        finally:
            self.table.blockSignals(False)
        running = sum(job.status not in FINISHED_JOB_STATES for job in data.jobs)
        self.summary.setText(
            f"{len(data.jobs)} job(s), {running} unfinished" if data.jobs else "No jobs yet."
        )
        self._on_selection_changed()

    def _on_selection_changed(self) -> None:
        job_id = self.table.selected_job_id()
        job = self._jobs.get(job_id or "")
        status = job.status if job is not None else None
        self.pause_button.setEnabled(status in (JobStatus.QUEUED, JobStatus.ACTIVE))
        self.resume_button.setEnabled(status is JobStatus.PAUSED)
        self.cancel_button.setEnabled(status is not None and status not in FINISHED_JOB_STATES)
        detail = self._detail
        if job is None:
            self.view.set_job(None)
        elif detail is not None and detail.job_id == job.id:
            self.view.set_job(job, detail.tasks, self._previews, detail.node_names)
        else:
            self.view.set_job(job)  # its tasks arrive with the refresh asked for here
            self.refresh()

    def _act_on_selected(self, action: Callable[[TesseraClient, str], Job]) -> None:
        job_id = self.table.selected_job_id()
        if job_id is None:
            return
        self.run_action(lambda client: action(client, job_id))
