"""The Jobs page: a table of the user's jobs with pause, resume, cancel and priority,
the selected job's frame strip, live tile grid and task log, and *Open output folder*.

`JobsTable` shows a list of `protocol.models.Job` (name, status, a progress bar, frames
done of total, an ETA, credits spent of those escrowed, priority, the coordinator's
message) and is built from plain models (`set_jobs`); `JobView` (app/gui/job_view.py)
shows one job's frames, tiles and tasks. On every refresh `JobsPage` fetches, in the
background through `TesseraClient`, the jobs, and for the selected job its tasks, the
preview PNGs of the selected frame's accepted tiles not fetched before, and the names of
the nodes rendering it. *Open output folder* downloads the selected job's finished frames
in the background (`app.follow.download_finished_frames`, as `tessera submit --wait
--out` does) into the remembered output folder, then opens it (`open_folder`, injectable:
tests pass their own instead of launching a file manager).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from PySide6.QtCore import Qt, QUrl, Signal
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTableWidget,
    QVBoxLayout,
    QWidget,
)

from app.connection import FarmConnection
from app.cost_text import cost_lines
from app.follow import FollowResult, download_finished_frames
from app.gui.background import BackgroundWork, ErrorReport, ProgressRelay
from app.gui.connection import AppSettings
from app.gui.farm_page import FarmPage
from app.gui.job_view import JobDetail, JobView, accepted_tiles, job_frames
from app.gui.tables import cell, configure_table, credits
from common.errors import TesseraError
from common.settings import load_settings
from protocol.client import TesseraClient
from protocol.models import FINISHED_JOB_STATES, Job, JobStatus, TaskStatus

#: Preview PNGs kept for the selected job (a 16x16 grid fills 256; more are refetched).
MAX_CACHED_PREVIEWS = 1024

JOB_COLUMNS = ("Name", "Status", "Progress", "Frames", "ETA", "Credits", "Priority", "Message")
PROGRESS_COLUMN = JOB_COLUMNS.index("Progress")
#: The key under which the app remembers the output folder (`AppSettings.last_folder`).
OUTPUT_FOLDER_KIND = "output"


def default_output_dir() -> Path:
    """Where frames go until the user picks a folder (`Settings.frames_dir`)."""
    return load_settings().frames_dir()


def open_in_file_manager(folder: Path) -> None:
    """Show `folder` in the desktop's file manager."""
    QDesktopServices.openUrl(QUrl.fromLocalFile(str(folder)))


def job_eta(job: Job, now: datetime | None = None) -> timedelta | None:
    """The time left at the rate the job's tasks finished since it was submitted; None
    when nothing finished yet or the job is not running; zero when it is finished."""
    progress = job.progress
    if job.status in FINISHED_JOB_STATES or progress.tasks_done >= progress.tasks_total:
        return timedelta(0)
    if job.status is JobStatus.PAUSED or progress.tasks_done <= 0:
        return None
    elapsed = ((now or datetime.now(UTC)) - job.created_at).total_seconds()
    if elapsed <= 0:
        return None
    left = progress.tasks_total - progress.tasks_done
    return timedelta(seconds=elapsed * left / progress.tasks_done)


def eta_text(job: Job, now: datetime | None = None) -> str:
    """'-' (finished), '…' (no rate yet), '0:42', '1:05:00', '3 d'."""
    if job.status in FINISHED_JOB_STATES:
        return "-"
    eta = job_eta(job, now)
    if eta is None:
        return "…"
    seconds = round(eta.total_seconds())
    if seconds >= 3 * 86400:
        return f"{seconds // 86400} d"
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def credits_text(job: Job) -> str:
    """'1.25 of 4.00': credits paid for accepted tasks, of those escrowed at submit."""
    return f"{credits(job.credits_spent)} of {credits(job.credits_escrowed)}"


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
            self.setItem(row, 4, cell(eta_text(job), align_right=True, tooltip="Time left"))
            spent = cell(
                credits_text(job),
                align_right=True,
                tooltip="Credits paid for accepted tiles, of those held (what is left comes"
                " back when the job ends)\n" + "\n".join(cost_lines(job)),
            )
            self.setItem(row, 5, spent)
            self.setItem(row, 6, cell(str(job.priority), align_right=True))
            self.setItem(row, 7, cell(job.message, tooltip=job.message))
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
    """The jobs table, the buttons that act on the selected job, and its job view.

    `app_settings` remembers the output folder (`output_dir` is the one used until the
    user picks another; default `default_output_dir()`); `open_folder(path)` shows a
    folder (default: the desktop's file manager). `frames_downloaded(folder)` is emitted
    once *Open output folder* has downloaded the finished frames, before the folder opens.
    """

    frames_downloaded = Signal(object)  # Path

    def __init__(
        self,
        work: BackgroundWork,
        connection: FarmConnection,
        parent: QWidget | None = None,
        *,
        app_settings: AppSettings | None = None,
        output_dir: Path | None = None,
        open_folder: Callable[[Path], None] | None = None,
    ) -> None:
        super().__init__(work, connection, parent)
        self._store = app_settings
        remembered = app_settings.last_folder(OUTPUT_FOLDER_KIND) if app_settings else ""
        self._output_dir = Path(remembered) if remembered else output_dir or default_output_dir()
        self._open_folder = open_folder or open_in_file_manager
        self._downloading = False
        self._relay = ProgressRelay(self)
        self._relay.changed.connect(self._on_download_progress)
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
        self.priority = QSpinBox()
        self.priority.setRange(0, 100)
        self.priority.setPrefix("Priority ")
        self.priority.setToolTip("Higher runs first among your jobs (0-100)")
        self.priority_button = QPushButton("Set")
        self.priority_button.setToolTip("Give the selected job this priority")
        self.priority_button.clicked.connect(self._on_set_priority)
        self.open_button = QPushButton("Open output folder")
        self.open_button.clicked.connect(self.open_output_folder)
        self.folder_button = QPushButton("Folder…")
        self.folder_button.clicked.connect(self._on_choose_folder)
        self.download_progress = QProgressBar()
        self.download_progress.setMaximumWidth(160)
        self.download_progress.hide()
        self._update_folder_tooltips()
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
        buttons.addWidget(self.priority)
        buttons.addWidget(self.priority_button)
        output = QHBoxLayout()
        output.addStretch(1)
        output.addWidget(self.download_progress)
        output.addWidget(self.open_button)
        output.addWidget(self.folder_button)
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(self.table)
        splitter.addWidget(self.view)
        splitter.setStretchFactor(0, 1)
        splitter.setStretchFactor(1, 2)
        layout = QVBoxLayout(self)
        layout.addLayout(buttons)
        layout.addWidget(splitter, 1)
        layout.addLayout(output)
        self._on_selection_changed()

    @property
    def output_dir(self) -> Path:
        """Where *Open output folder* puts frames (in a folder per scene)."""
        return self._output_dir

    def set_output_dir(self, folder: Path) -> None:
        """Use `folder` from now on, and remember it for the next start."""
        self._output_dir = folder
        if self._store is not None:
            self._store.save_last_folder(OUTPUT_FOLDER_KIND, folder)
        self._update_folder_tooltips()

    def select_a_job(self) -> bool:
        """Select the first unfinished job listed, else the first job; False when none."""
        jobs = list(self._jobs.values())
        unfinished = [job for job in jobs if job.status not in FINISHED_JOB_STATES]
        chosen = (unfinished or jobs)[:1]
        if chosen:
            self.select_job(chosen[0].id)
        return bool(chosen)

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
        unfinished = status is not None and status not in FINISHED_JOB_STATES
        self.priority.setEnabled(unfinished)
        self.priority_button.setEnabled(unfinished)
        if job is not None and not self.priority.hasFocus():
            self.priority.setValue(job.priority)
        has_frames = job is not None and bool(job.frames_done)
        self.open_button.setEnabled(has_frames and not self._downloading)
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

    def _on_set_priority(self) -> None:
        job_id, priority = self.table.selected_job_id(), self.priority.value()
        if job_id is not None:
            self.run_action(lambda client: client.set_priority(job_id, priority))

    # --- output folder ----------------------------------------------------------------------

    def open_output_folder(self) -> None:
        """Download the selected job's finished frames (those not there yet) into the
        output folder in the background, then open the job's folder."""
        job = self._jobs.get(self.table.selected_job_id() or "")
        if job is None or self._downloading:
            return
        self._downloading = True
        self.open_button.setEnabled(False)
        self.download_progress.setRange(0, max(1, len(job.frames_done)))
        self.download_progress.setValue(0)
        self.download_progress.setFormat(f"%v of {len(job.frames_done)} frame(s)")
        self.download_progress.show()
        connection, out_dir, report = self._connection, self._output_dir, self._relay.report

        def download() -> FollowResult:
            written = 0

            def on_frame(_files: object) -> None:
                nonlocal written
                written += 1
                report(written)

            with connection.client() as client:
                return download_finished_frames(client, job, out_dir, on_frame)

        self._work.submit(download, self._on_downloaded, self._on_download_failed)

    def _on_download_progress(self, value: object) -> None:
        if self._downloading and isinstance(value, int):
            self.download_progress.setValue(value)

    def _on_downloaded(self, result: FollowResult) -> None:
        self._finish_download()
        self.summary.setText(
            f"{len(result.frames)} frame(s) downloaded to {result.folder}"
            if result.frames
            else f"The finished frames are in {result.folder}"
        )
        self.frames_downloaded.emit(result.folder)
        self._open_folder(result.folder)

    def _on_download_failed(self, report: ErrorReport) -> None:
        self._finish_download()
        self._work.failed.emit(report)

    def _finish_download(self) -> None:
        self._downloading = False
        self.download_progress.hide()
        self._on_selection_changed()

    def _on_choose_folder(self) -> None:
        chosen = QFileDialog.getExistingDirectory(
            self, "Where finished frames go", str(self._output_dir)
        )
        if chosen:
            self.set_output_dir(Path(chosen))

    def _update_folder_tooltips(self) -> None:
        self.open_button.setToolTip(
            f"Download the finished frames to {self._output_dir}/<scene> and open it"
        )
        self.folder_button.setToolTip(f"Frames go to {self._output_dir}; choose another folder")
