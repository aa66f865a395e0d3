"""The Jobs page: a table of the user's jobs with pause, resume and cancel.

`JobsTable` shows a list of `protocol.models.Job` (name, status, a progress bar, frames
done of total, priority, the coordinator's message) and is built from plain models
(`set_jobs`). `JobsPage` fetches the jobs through `TesseraClient.jobs()` in the
background and sends the buttons' requests the same way. What a job costs is not shown
yet: the coordinator's job model carries no credits, and summing the wallet's latest
ledger entries per job would be wrong for long histories.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QVBoxLayout,
    QWidget,
)

from app.gui.background import BackgroundWork
from app.gui.connection import FarmConnection
from app.gui.farm_page import FarmPage
from app.gui.tables import cell, configure_table
from protocol.client import TesseraClient
from protocol.models import FINISHED_JOB_STATES, Job, JobStatus

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

    def selected_job_id(self) -> str | None:
        rows = self.selectionModel().selectedRows() if self.selectionModel() else []
        if not rows or rows[0].row() >= len(self._ids):
            return None
        return self._ids[rows[0].row()]

    def progress_bar(self, row: int) -> QProgressBar:
        widget = self.cellWidget(row, PROGRESS_COLUMN)
        assert isinstance(widget, QProgressBar)
        return widget


class JobsPage(FarmPage):
    """The jobs table and the buttons that act on the selected job."""

    def __init__(
        self, work: BackgroundWork, connection: FarmConnection, parent: QWidget | None = None
    ) -> None:
        super().__init__(work, connection, parent)
        self.table = JobsTable()
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
        self._jobs: dict[str, Job] = {}

        buttons = QHBoxLayout()
        buttons.addWidget(self.summary, 1)
        for button in (self.pause_button, self.resume_button, self.cancel_button):
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addLayout(buttons)
        layout.addWidget(self.table)
        self._on_selection_changed()

    def fetch(self, client: TesseraClient) -> list[Job]:
        return client.jobs()

    def present(self, data: list[Job]) -> None:
        self._jobs = {job.id: job for job in data}
        self.table.set_jobs(data)
        running = sum(job.status not in FINISHED_JOB_STATES for job in data)
        self.summary.setText(
            f"{len(data)} job(s), {running} unfinished" if data else "No jobs yet."
        )
        self._on_selection_changed()

    def _on_selection_changed(self) -> None:
        job = self._jobs.get(self.table.selected_job_id() or "")
        status = job.status if job is not None else None
        self.pause_button.setEnabled(status in (JobStatus.QUEUED, JobStatus.ACTIVE))
        self.resume_button.setEnabled(status is JobStatus.PAUSED)
        self.cancel_button.setEnabled(status is not None and status not in FINISHED_JOB_STATES)

    def _act_on_selected(self, action: Callable[[TesseraClient, str], Job]) -> None:
        job_id = self.table.selected_job_id()
        if job_id is None:
            return
        self.run_action(lambda client: action(client, job_id))
