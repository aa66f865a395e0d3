"""The Submit page: pick or drop a .blend, see what Blender finds in it, choose how the farm
renders it, and submit.

Picking a scene starts its inspection in the background (`renderers.scene_info.
inspect_scene` with the app's one Blender worker); `SceneSummaryView` then shows what
it found (frames, resolution, engine, samples, camera, denoising, missing files) and is
built from a plain `SceneInfo`. Then, still in the background with the same worker, a
small colour preview of the first frame is rendered (`app.preview.
render_colour_preview`) and shown under the split's tile grid (`TileGrid.set_plan`), and
the scene is measured (`renderers.scene_probe.probe_scene`: its cost relative to the
benchmark scene). From then on every change of the options asks the coordinator what
the job would cost (`TesseraClient.estimate_job`, the coordinator's own estimate, the
one it escrows) and shows it next to the max price, with the balance, or the reason the
farm would refuse the job. The form's choices are a `protocol.models.JobOptions`, as the
CLI's flags are. Submit runs `app.submit.prepare_submission` (inspect, probe, pack) and
`app.submit.submit` (upload, submit) in the background, with their
pack and upload progress relayed to a progress bar, and emits `submitted(job)`: the main
window then opens the job on the Jobs page. Errors (a scene without a camera, a frame
range outside the scene, an unreachable coordinator) go to the app's banner through
`BackgroundWork.failed`, in the words of the error that was raised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from PySide6.QtCore import QTimer, Signal
from PySide6.QtGui import QColor, QDragEnterEvent, QDropEvent, QImage
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from app.connection import FarmConnection
from app.gui.background import BackgroundWork, ErrorReport, ProgressRelay
from app.gui.blender_access import BlenderAccess
from app.gui.connection import AppSettings
from app.gui.tile_grid import TileGrid
from app.job_spec import job_options, job_spec_for
from app.packing import Dependency, PackProgress, list_dependencies
from app.preview import ColourPreview, render_colour_preview
from app.submit import bundle_folder, prepare_submission, submit
from common.errors import TesseraError
from protocol.models import DEVICES, Job, JobEstimate, JobOptions
from renderers.scene_info import SceneInfo, inspect_scene
from renderers.scene_probe import SceneProbe, probe_scene

PACK_STAGES = {"trace": "Finding the files it uses", "copy": "Copying files", "zip": "Zipping"}
WHOLE_FRAMES, TILES = "Whole frames", "Tiles"
#: Options settle for this long before the page asks the coordinator for an estimate.
ESTIMATE_DELAY_MS = 300
REFUSED_STYLE = "color: #d64545; font-weight: bold"
#: Missing files in the dependency list (readable on light and dark windows).
MISSING_COLOUR = "#e0533f"


def preview_image(preview: ColourPreview) -> QImage:
    """A `ColourPreview` as a QImage (a copy: it does not borrow the bytes)."""
    image = QImage(
        preview.rgb, preview.width, preview.height, 3 * preview.width, QImage.Format.Format_RGB888
    )
    return image.copy()


def estimate_text(estimate: JobEstimate) -> str:
    """The estimate next to the max price, in words, with the numbers."""
    if estimate.refusal:
        return f"The farm would refuse this job: {estimate.refusal}"
    balance = f"(balance {estimate.balance:,.2f})"
    if estimate.credits == 0:
        return f"Free: only nodes that ask nothing will render it {balance}."
    return f"Up to {estimate.credits:,.2f} credits, held when you submit {balance}."


def frames_text(info: SceneInfo) -> str:
    """The scene's own range as the frames field writes it: '1-250' or '1-250x2'."""
    text = f"{info.frame_start}-{info.frame_end}"
    if info.frame_start == info.frame_end:
        text = str(info.frame_start)
    return text + (f"x{info.frame_step}" if info.frame_step > 1 else "")


def is_blend(path: Path) -> bool:
    return path.suffix.lower() == ".blend"


class SceneSummaryView(QWidget):
    """What Blender found in a scene; `set_info(None)` empties it."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.fields: dict[str, QLabel] = {}
        form = QFormLayout()
        for name in ("Scene", "Frames", "Resolution", "Engine", "Samples", "Camera", "Denoising"):
            label = QLabel("—")
            label.setWordWrap(True)
            self.fields[name] = label
            form.addRow(f"{name}:", label)
        self.missing_heading = QLabel()
        self.missing = QListWidget()
        self.missing.setMaximumHeight(110)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(form)
        layout.addWidget(self.missing_heading)
        layout.addWidget(self.missing)
        self.dependencies_heading = QLabel()
        self.dependencies = QListWidget()
        self.dependencies.setMaximumHeight(130)
        layout.addWidget(self.dependencies_heading)
        layout.addWidget(self.dependencies)
        self.set_info(None)

    def set_info(self, info: SceneInfo | None) -> None:
        self.missing.clear()
        self.dependencies.clear()
        self.dependencies_heading.hide()
        self.dependencies.hide()
        if info is None:
            for label in self.fields.values():
                label.setText("—")
            self.missing_heading.setText("")
            self.missing_heading.hide()
            self.missing.hide()
            return
        step = f", every {info.frame_step}" if info.frame_step > 1 else ""
        count = len(range(info.frame_start, info.frame_end + 1, max(1, info.frame_step)))
        adaptive = " (adaptive)" if info.adaptive_sampling else ""
        texts = {
            "Scene": f"{info.path.name} (scene '{info.name}', Blender {info.file_version})",
            "Frames": f"{info.frame_start}–{info.frame_end}{step}: {count} frame(s)",
            "Resolution": f"{info.resolution_x}×{info.resolution_y} at "
            f"{info.resolution_percentage}% = {info.width}×{info.height}",
            "Engine": "Cycles" if info.engine == "CYCLES" else info.engine,
            "Samples": f"{info.samples}{adaptive}",
            "Camera": info.camera or "none",
            "Denoising": info.denoiser if info.denoising else "off",
        }
        for name, text in texts.items():
            self.fields[name].setText(text)
        problems = [f"Missing: {path}" for path in info.missing_files]
        problems += [w for w in info.warnings if not w.startswith("Missing file: ")]
        self.missing.addItems(problems)
        if info.missing_files:
            self.missing_heading.setText(
                f"<b>{len(info.missing_files)} missing file(s)</b>: they will render as "
                "pink or empty. Fix the paths in Blender and save, or submit anyway."
            )
        else:
            self.missing_heading.setText("All files the scene uses were found.")
        self.missing_heading.show()
        self.missing.setVisible(bool(problems))

    def set_dependencies(self, dependencies: Sequence[Dependency]) -> None:
        """List every file the scene uses (blender-asset-tracer's view), missing first."""
        self.dependencies.clear()
        for dep in dependencies:
            mark = "✗ missing" if dep.missing else "✓"
            item = QListWidgetItem(f"{mark}  {dep.kind}: {dep.path}")
            item.setToolTip(str(dep.path))
            if dep.missing:
                item.setForeground(QColor(MISSING_COLOUR))
            self.dependencies.addItem(item)
        missing = sum(dep.missing for dep in dependencies)
        self.dependencies_heading.setText(
            f"Files the scene uses: {len(dependencies)}"
            + (f", <b>{missing} missing</b>" if missing else ", all found")
            if dependencies
            else "The scene uses no other files."
        )
        self.dependencies_heading.show()
        self.dependencies.setVisible(bool(dependencies))

    def dependency_lines(self) -> list[str]:
        return [self.dependencies.item(row).text() for row in range(self.dependencies.count())]

    def texts(self) -> dict[str, str]:
        return {name: label.text() for name, label in self.fields.items()}

    def problems(self) -> list[str]:
        return [self.missing.item(row).text() for row in range(self.missing.count())]


class SubmitPage(QWidget):
    """Scene, summary, options, Submit; `submitted` carries the new `Job`."""

    submitted = Signal(object)  # Job
    inspected = Signal(object)  # SceneInfo, once shown
    previewed = Signal(object)  # QImage, once drawn under the tile grid
    measured = Signal(object)  # SceneProbe, once the scene's cost is known
    estimated = Signal(object)  # JobEstimate, once shown
    dependencies_listed = Signal(object)  # list[Dependency], once shown

    def __init__(
        self,
        work: BackgroundWork,
        connection: FarmConnection,
        blender: BlenderAccess,
        app_settings: AppSettings | None = None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self._work = work
        self._connection = connection
        self._blender = blender
        self._store = app_settings
        self._scene: Path | None = None
        self._info: SceneInfo | None = None
        self._preview: QImage | None = None
        self._probe: SceneProbe | None = None
        self._estimate: JobEstimate | None = None
        self._estimate_asked = 0  # the newest request; older answers are dropped
        self._estimate_timer = QTimer(self)
        self._estimate_timer.setSingleShot(True)
        self._estimate_timer.setInterval(ESTIMATE_DELAY_MS)
        self._estimate_timer.timeout.connect(self.request_estimate)
        self._busy = False
        self._relay = ProgressRelay(self)
        self._relay.changed.connect(self._on_progress)
        self.setAcceptDrops(True)

        self.choose_button = QPushButton("Choose .blend…")
        self.choose_button.setShortcut("Ctrl+O")
        self.choose_button.setToolTip("Pick a scene (Ctrl+O), or drop a .blend on this page")
        self.choose_button.clicked.connect(self._on_choose)
        self.scene_label = QLabel("Drop a .blend file here, or choose one.")
        self.scene_label.setWordWrap(True)
        picker = QHBoxLayout()
        picker.addWidget(self.choose_button)
        picker.addWidget(self.scene_label, 1)

        self.summary = SceneSummaryView()
        scene_box = QGroupBox("Scene")
        QVBoxLayout(scene_box).addWidget(self.summary)

        self.frames = QLineEdit()
        self.frames.setPlaceholderText("the scene's range")
        self.frames.setToolTip('"N", "A-B" or "A-BxSTEP", e.g. "1-24" or "1-24x2"')
        self.split = QComboBox()
        self.split.addItems([WHOLE_FRAMES, TILES])
        self.split.setToolTip("Tiles let several nodes render one frame at once")
        self.columns = QSpinBox()
        self.rows = QSpinBox()
        for spin in (self.columns, self.rows):
            spin.setRange(1, 16)
            spin.setValue(2)
        self.split.currentTextChanged.connect(self._on_split_changed)
        grid = QHBoxLayout()
        grid.addWidget(self.split)
        grid.addWidget(self.columns)
        grid.addWidget(QLabel("columns ×"))
        grid.addWidget(self.rows)
        grid.addWidget(QLabel("rows"))
        grid.addStretch(1)
        self.samples = QSpinBox()
        self.samples.setRange(0, 1_000_000)
        self.samples.setSpecialValueText("as in the scene")
        self.percentage = QSpinBox()
        self.percentage.setRange(0, 1000)
        self.percentage.setSuffix(" %")
        self.percentage.setSpecialValueText("as in the scene")
        self.denoise = QComboBox()
        self.denoise.addItems(["As in the scene", "On", "Off"])
        self.device = QComboBox()
        self.device.addItems(list(DEVICES))
        self.device.setToolTip("ANY: whichever device a node offers")
        self.max_price = QDoubleSpinBox()
        self.max_price.setRange(0, 1_000_000)
        self.max_price.setDecimals(2)
        self.max_price.setToolTip("Credits per work unit you pay at most (0: free nodes only)")
        self.max_credits = QDoubleSpinBox()
        self.max_credits.setRange(0, 1_000_000_000)
        self.max_credits.setDecimals(2)
        self.max_credits.setSpecialValueText("no limit")
        self.max_credits.setToolTip("Refuse the job if it may cost more than this (0: no limit)")
        self.estimate = QLabel("Choose a scene to see what it would cost.")
        self.estimate.setWordWrap(True)
        # Room for two lines: a form row does not grow for a wrapped label by itself.
        self.estimate.setMinimumHeight(2 * self.estimate.fontMetrics().lineSpacing() + 4)
        self.plan = TileGrid()
        self.plan.set_placeholder("The frame's preview appears here")
        self.plan.setToolTip("How each frame is split, over a quick preview of the first frame")
        self.priority = QSpinBox()
        self.priority.setRange(0, 100)
        self.priority.setValue(50)
        self.preview_video = QCheckBox("Assemble an H.264 MP4 preview of the frames")
        self.raw_only = QCheckBox("Raw passes only (skip the compositor and output format)")
        self.raw_only.setToolTip(
            "Deliver only the multilayer EXR of every pass instead of the scene's own files"
        )
        options = QFormLayout()
        options.addRow("Frames:", self.frames)
        options.addRow("Split:", grid)
        options.addRow("Samples:", self.samples)
        options.addRow("Resolution:", self.percentage)
        options.addRow("Denoising:", self.denoise)
        options.addRow("Device:", self.device)
        options.addRow("Max price:", self.max_price)
        options.addRow("Max credits:", self.max_credits)
        options.addRow("Estimate:", self.estimate)
        options.addRow("Priority:", self.priority)
        options.addRow("Preview video:", self.preview_video)
        options.addRow("Output:", self.raw_only)
        options_box = QGroupBox("How to render")
        options_box.setLayout(options)

        self.submit_button = QPushButton("Submit")
        self.submit_button.setShortcut("Ctrl+Return")
        self.submit_button.setToolTip("Pack, upload and queue the job (Ctrl+Enter)")
        self.submit_button.clicked.connect(self.start_submit)
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.hide()
        actions = QHBoxLayout()
        actions.addWidget(self.status, 1)
        actions.addWidget(self.progress)
        actions.addWidget(self.submit_button)

        for spin in (self.columns, self.rows, self.samples, self.percentage, self.priority):
            spin.valueChanged.connect(self._on_options_changed)
        for decimal in (self.max_price, self.max_credits):
            decimal.valueChanged.connect(self._on_options_changed)
        for combo in (self.split, self.denoise, self.device):
            combo.currentIndexChanged.connect(self._on_options_changed)
        self.frames.textChanged.connect(self._on_options_changed)
        right = QVBoxLayout()
        right.addWidget(options_box)
        right.addWidget(self.plan, 1)
        columns = QHBoxLayout()
        columns.addWidget(scene_box, 1)
        columns.addLayout(right, 1)
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("<h2>Submit</h2>"))
        layout.addLayout(picker)
        layout.addLayout(columns, 1)
        layout.addLayout(actions)
        self._on_split_changed(self.split.currentText())
        self._update_buttons()

    # --- state ---------------------------------------------------------------------------

    @property
    def scene(self) -> Path | None:
        return self._scene

    @property
    def info(self) -> SceneInfo | None:
        return self._info

    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def probe(self) -> SceneProbe | None:
        """The scene's measurement (its cost), once made."""
        return self._probe

    @property
    def last_estimate(self) -> JobEstimate | None:
        return self._estimate

    def set_connection(self, connection: FarmConnection) -> None:
        self._connection = connection

    def _set_busy(self, text: str) -> None:
        self._busy = bool(text)
        self.status.setText(text)
        if text:
            self.progress.setRange(0, 0)  # indeterminate until a stage reports numbers
            self.progress.show()
        else:
            self.progress.hide()
        self._update_buttons()

    def _update_buttons(self) -> None:
        self.choose_button.setEnabled(not self._busy)
        self.submit_button.setEnabled(not self._busy and self._info is not None)

    def _on_split_changed(self, text: str) -> None:
        tiled = text == TILES
        self.columns.setEnabled(tiled)
        self.rows.setEnabled(tiled)

    def _on_options_changed(self, *_args: object) -> None:
        self._show_plan()
        if self._info is not None and self._probe is not None:
            self._estimate_timer.start()  # restarted by each change: one request at the end

    def _show_plan(self) -> None:
        info = self._info
        if info is None:
            self.plan.clear()
            return
        percentage = self.percentage.value() or info.resolution_percentage
        size = (
            max(1, info.resolution_x * percentage // 100),
            max(1, info.resolution_y * percentage // 100),
        )
        tiles = self.options().tiles
        self.plan.set_plan(tiles.columns, tiles.rows, size, self._preview)

    # --- cost estimate -------------------------------------------------------------------------

    def request_estimate(self) -> None:
        """Ask the coordinator, in the background, what the job as set up would cost."""
        info, measured = self._info, self._probe
        if info is None or measured is None:
            return
        self._estimate_asked += 1
        asked = self._estimate_asked
        try:
            spec = job_spec_for(info, self.options(), measured=measured)
        except TesseraError as exc:
            self._estimate = None
            self.estimate.setStyleSheet(REFUSED_STYLE)
            self.estimate.setText(exc.message)
            return
        self.estimate.setStyleSheet("")
        self.estimate.setText("Asking the farm…")
        connection = self._connection

        def ask() -> JobEstimate:
            with connection.client() as client:
                return client.estimate_job(spec)

        self._work.submit(
            ask,
            lambda estimate: self._on_estimated(asked, estimate),
            lambda report: self._on_estimate_failed(asked, report),
        )

    def _on_estimated(self, asked: int, estimate: JobEstimate) -> None:
        if asked != self._estimate_asked:
            return
        self._estimate = estimate
        self.estimate.setStyleSheet(REFUSED_STYLE if estimate.refusal else "")
        self.estimate.setText(estimate_text(estimate))
        self.estimate.setToolTip(estimate.refusal_hint)
        self.estimated.emit(estimate)

    def _on_estimate_failed(self, asked: int, report: ErrorReport) -> None:
        if asked == self._estimate_asked:
            self._estimate = None
            self.estimate.setStyleSheet("")
            self.estimate.setText("No estimate: the farm did not answer.")
        self._work.failed.emit(report)

    # --- choosing and inspecting ------------------------------------------------------------

    def _on_choose(self) -> None:
        folder = self._store.last_folder("scenes") if self._store is not None else ""
        path, _filter = QFileDialog.getOpenFileName(
            self, "Choose a scene", folder, "Blender scenes (*.blend)"
        )
        if path:
            self.load_scene(Path(path))

    def load_scene(self, path: Path) -> None:
        """Inspect `path` in the background, then show its summary (or the error)."""
        if self._busy:
            return
        if self._store is not None:
            self._store.save_last_folder("scenes", path.parent)
        self._scene, self._info = path, None
        self._preview, self._probe, self._estimate = None, None, None
        self._estimate_asked += 1
        self.estimate.setStyleSheet("")
        self.estimate.setText("Known once the scene is measured.")
        self.scene_label.setText(str(path))
        self.summary.set_info(None)
        self.plan.clear()
        self._set_busy(f"Inspecting {path.name} in Blender…")
        blender = self._blender
        self._work.submit(
            lambda: inspect_scene(blender.worker(), path),
            lambda info: self._on_inspected(path, info),
            lambda report: self._on_failed(report, f"{path.name} cannot be rendered."),
        )

    def _on_inspected(self, path: Path, info: SceneInfo) -> None:
        if path != self._scene:
            return
        self._info = info
        self.summary.set_info(info)
        self.frames.setPlaceholderText(f"{frames_text(info)} (the scene's range)")
        self._show_plan()
        self.inspected.emit(info)
        self._work.submit(
            lambda: list_dependencies(path),
            lambda deps: self._on_dependencies(path, deps),
            self._work.failed.emit,  # the banner says why; inspection goes on
        )
        self._set_busy(f"Rendering a preview of {path.name}…")
        blender = self._blender
        self._work.submit(
            lambda: render_colour_preview(blender.worker(), info),
            lambda preview: self._on_previewed(path, info, preview),
            lambda report: self._on_measure_failed(path, report),
        )

    def _on_dependencies(self, path: Path, dependencies: list[Dependency]) -> None:
        if path != self._scene:
            return
        self.summary.set_dependencies(dependencies)
        self.dependencies_listed.emit(dependencies)

    def _on_previewed(self, path: Path, info: SceneInfo, preview: ColourPreview) -> None:
        if path != self._scene:
            return
        self._preview = preview_image(preview)
        self._show_plan()
        self.previewed.emit(self._preview)
        self.status.setText(f"Measuring how long {path.name} takes to render…")
        options, blender = self.options(), self._blender

        def measure() -> SceneProbe:
            try:
                frames = job_spec_for(info, options).frames.frames()
            except TesseraError:
                frames = range(info.frame_start, info.frame_end + 1)  # fixed at submit
            return probe_scene(
                blender.worker(),
                info.path,
                frames,
                samples=options.samples,
                info=info,
                benchmark_memo=blender.benchmark_memo(),
            )

        self._work.submit(
            measure,
            lambda probe: self._on_measured(path, probe),
            lambda report: self._on_measure_failed(path, report),
        )

    def _on_measured(self, path: Path, probe: SceneProbe) -> None:
        if path != self._scene:
            return
        self._probe = probe
        self._set_busy("")
        self.status.setText(f"{path.name} is ready to submit.")
        self.measured.emit(probe)
        self.request_estimate()

    def _on_measure_failed(self, path: Path, report: ErrorReport) -> None:
        if path != self._scene:
            return
        # The scene was inspected, so it can still be submitted (the submit measures it).
        self._on_failed(report, f"{path.name} could not be previewed or measured.")

    def _on_failed(self, report: ErrorReport, status: str) -> None:
        self._set_busy("")
        self.status.setText(status)
        self._work.failed.emit(report)

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:  # noqa: N802 (Qt's name)
        if not self._busy and self._dropped_blend(event) is not None:
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event: QDropEvent) -> None:  # noqa: N802 (Qt's name)
        path = self._dropped_blend(event)
        if path is None or self._busy:
            event.ignore()
            return
        event.acceptProposedAction()
        self.load_scene(path)

    @staticmethod
    def _dropped_blend(event: QDragEnterEvent | QDropEvent) -> Path | None:
        for url in event.mimeData().urls():
            if url.isLocalFile() and is_blend(Path(url.toLocalFile())):
                return Path(url.toLocalFile())
        return None

    # --- submitting ------------------------------------------------------------------------

    def options(self) -> JobOptions:
        """The form's choices (None: the scene's own); `UsageError` names a bad one."""
        tiled = self.split.currentText() == TILES
        return job_options(
            frames=self.frames.text().strip() or None,
            tiles={
                "columns": self.columns.value() if tiled else 1,
                "rows": self.rows.value() if tiled else 1,
            },
            samples=self.samples.value() or None,
            percentage=self.percentage.value() or None,
            denoise={0: None, 1: True, 2: False}[self.denoise.currentIndex()],
            device=self.device.currentText(),
            max_price=self.max_price.value(),
            priority=self.priority.value(),
            max_credits=self.max_credits.value() or None,
            preview_video=self.preview_video.isChecked(),
            finish=not self.raw_only.isChecked(),
        )

    def start_submit(self) -> None:
        """Probe, pack, upload and submit the scene in the background."""
        scene = self._scene
        if self._busy or scene is None or self._info is None:
            return
        work = _submission_work(
            self._blender,
            self._connection,
            scene,
            self.options(),
            self._relay.report,
            self._probe,
        )
        self._set_busy(f"Measuring {scene.name} and rendering its previews…")
        self._work.submit(
            work,
            self._on_submitted,
            lambda report: self._on_failed(report, "The job was not submitted."),
        )

    def _on_progress(self, value: object) -> None:
        if not self._busy:
            return
        if isinstance(value, PackProgress):
            self.status.setText(f"Packing: {PACK_STAGES.get(value.stage, value.stage)}…")
            self._show_fraction(value.done, value.total)
        elif isinstance(value, tuple) and len(value) == 2:
            done, total = value
            self.status.setText(f"Uploading: {done / 1e6:.1f} of {total / 1e6:.1f} MB")
            self._show_fraction(done, total)

    def _show_fraction(self, done: int, total: int) -> None:
        if total <= 0:
            self.progress.setRange(0, 0)
            return
        self.progress.setRange(0, 1000)
        self.progress.setValue(min(1000, 1000 * done // total))

    def _on_submitted(self, job: Job) -> None:
        self._set_busy("")
        text = f"Submitted {job.name}: {job.progress.tasks_total} task(s)."
        if job.warning:  # no registered node meets the job's requirements
            text += f" It waits: {job.warning}"
        self.status.setText(text)
        self.submitted.emit(job)


def _submission_work(
    blender: BlenderAccess,
    connection: FarmConnection,
    scene: Path,
    options: JobOptions,
    report: Callable[[object], None],
    measured: SceneProbe | None = None,
) -> Callable[[], Job]:
    """The background half of Submit: prepare (inspect, probe, pack), upload, submit."""

    def run() -> Job:
        with bundle_folder(blender.bundles_dir()) as bundle_dir:
            prepared = prepare_submission(
                blender.worker(),
                scene,
                options,
                bundle_dir=Path(bundle_dir),
                on_pack=report,
                measured=measured,
                benchmark_memo=blender.benchmark_memo(),
            )
            with connection.client() as client:
                return submit(client, prepared, on_upload=lambda done, total: report((done, total)))

    return run
