"""The Provide page: share this machine with a farm.

It shows what this machine offers (CPU, memory, NVIDIA GPUs with live load, temperature
and VRAM through NVML; without one, that the node renders on the CPU), lets the user
choose the device, the price per work unit and when to render (always, when the computer
is idle, between hours), and has a start/stop switch that runs `tessera node` as a child
process (`app.node_process.NodeProcess`, Qt-free like the machine probe and the token
checks), exactly the command a studio runs, with its log in the node's data folder and
the last lines on the page. Tasks done and credits earned come from the
coordinator (the node's row of GET /nodes, and the provider's wallet).

Widgets are built from plain models: `MachineView.set_machine(MachineReport)`,
`EarningsView.set_stats(ProviderStats)`. Every probe, file read and request runs through
`BackgroundWork`; the process is started and stopped there too. No farm logic here: the
node itself (farm_node) leases, renders and uploads.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Sequence
from pathlib import Path

from PySide6.QtCore import QTimer, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QVBoxLayout,
    QWidget,
)

from app.connection import FarmConnection
from app.gui.background import BackgroundWork, ErrorReport
from app.gui.connection import AppSettings, ProvideChoices
from app.gui.tables import cell, configure_table, credits
from app.node_process import (
    DEFAULT_CACHE_GB,
    MachineReport,
    NodeLaunch,
    NodeProcess,
    NodeState,
    ProviderStats,
    check_provider_token,
    fetch_provider_stats,
    join_as_provider,
    probe_machine,
)
from common.errors import TesseraError
from renderers.devices import NvidiaGpu

NO_GPU_TEXT = "No NVIDIA GPU found: this node renders on the CPU."
GPU_COLUMNS = ("GPU", "Load", "Temperature", "VRAM")
WHEN_CHOICES = (
    ("always", "Always"),
    ("idle", "When this computer is idle"),
    ("hours", "Between these hours"),
)
STATUS_MS = 2000
# --- widgets ------------------------------------------------------------------------------


def _mib(value: int) -> str:
    return f"{value / 1024:.1f} GiB" if value >= 1024 else f"{value} MiB"


class MachineView(QWidget):
    """This machine's CPU and memory, and a row per NVIDIA GPU (or the CPU-only note)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.summary = QLabel("Looking at this machine…")
        self.summary.setWordWrap(True)
        self.no_gpu = QLabel(NO_GPU_TEXT)
        self.no_gpu.hide()
        self.gpus = QTableWidget()
        configure_table(self.gpus, GPU_COLUMNS)
        self.gpus.setMaximumHeight(120)
        self.gpus.hide()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.summary)
        layout.addWidget(self.no_gpu)
        layout.addWidget(self.gpus)

    def set_machine(self, machine: MachineReport) -> None:
        self.summary.setText(
            f"{machine.cpu}, {machine.threads} threads, {_mib(machine.ram_mib)} of memory"
        )
        self.set_gpus(machine.gpus)

    def set_gpus(self, gpus: Sequence[NvidiaGpu]) -> None:
        self.no_gpu.setVisible(not gpus)
        self.gpus.setVisible(bool(gpus))
        self.gpus.setRowCount(len(gpus))
        for row, gpu in enumerate(gpus):
            load = "-" if gpu.utilization_percent is None else f"{gpu.utilization_percent} %"
            temperature = "-" if gpu.temperature_c is None else f"{gpu.temperature_c} °C"
            vram = f"{_mib(gpu.memory_used_mib)} of {_mib(gpu.memory_total_mib)}"
            cells = (
                cell(gpu.name, tooltip=f"driver {gpu.driver_version}"),
                cell(load, align_right=True),
                cell(temperature, align_right=True),
                cell(vram, align_right=True),
            )
            for column, item in enumerate(cells):
                self.gpus.setItem(row, column, item)


class EarningsView(QWidget):
    """Tasks done and credits earned by this node, and the provider's balance."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.status = QLabel("-")
        self.tasks = QLabel("-")
        self.earned = QLabel("-")
        self.balance = QLabel("-")
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow("On the farm:", self.status)
        form.addRow("Tasks done:", self.tasks)
        form.addRow("Credits earned:", self.earned)
        form.addRow("Provider balance:", self.balance)

    def set_stats(self, stats: ProviderStats) -> None:
        node = stats.node
        if node is None:
            self.status.setText("not registered yet")
            self.tasks.setText("0")
            self.earned.setText(credits(0.0))
        else:
            status: str = "SUSPENDED" if node.suspended else node.paused or node.status
            if node.current_task:
                status += f" (rendering {node.current_task})"
            self.status.setText(status)
            failed = f", {node.tasks_failed} failed" if node.tasks_failed else ""
            self.tasks.setText(f"{node.tasks_completed}{failed}")
            self.earned.setText(credits(node.earned))
        if stats.wallet is not None:
            self.balance.setText(f"{credits(stats.wallet.balance)} credits")


class ProvidePage(QWidget):
    """The machine, the sharing choices, the switch, the earnings and the node's log.

    `sharing_changed(bool)` is emitted once the node has started or stopped."""

    sharing_changed = Signal(bool)
    loaded = Signal()

    def __init__(
        self,
        work: BackgroundWork,
        connection: FarmConnection,
        app_settings: AppSettings | None = None,
        home: Path | None = None,
        node_args: Sequence[str] = (),
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self._work = work
        self._connection = connection
        self._store = app_settings
        self._home = home
        self._node_args = tuple(node_args)
        self.node = NodeProcess()
        self._machine: MachineReport | None = None
        self._probing = False
        self._ticking = False
        self._sharing_as: tuple[FarmConnection, str] | None = None
        choices = app_settings.provide_choices() if app_settings is not None else ProvideChoices()

        self.machine = MachineView()
        self.name = QLineEdit(choices.name or socket.gethostname())
        self.device = QComboBox()
        self.device.addItem(choices.device)
        self.price = QDoubleSpinBox()
        self.price.setRange(0.0, 1_000_000.0)
        self.price.setDecimals(2)
        self.price.setValue(choices.price)
        self.price.setSuffix(" credits / work unit")
        self.price.setToolTip("A work unit is a megapixel times a sample; 0: free for everyone")
        self.token = QLineEdit(choices.token)
        self.token.setEchoMode(QLineEdit.EchoMode.Password)
        self.token.setPlaceholderText("blank: the token of the Settings page")
        self.when = QComboBox()
        for key, label in WHEN_CHOICES:
            self.when.addItem(label, key)
        self.when.setCurrentIndex(max(0, [k for k, _ in WHEN_CHOICES].index(choices.when)))
        self.idle_minutes = QDoubleSpinBox()
        self.idle_minutes.setRange(0.5, 240.0)
        self.idle_minutes.setValue(choices.idle_minutes)
        self.idle_minutes.setSuffix(" min idle")
        self.hours_from = QSpinBox()
        self.hours_to = QSpinBox()
        for box, value in ((self.hours_from, choices.hours[0]), (self.hours_to, choices.hours[1])):
            box.setRange(0, 23)
            box.setValue(value)
            box.setSuffix(":00")
        self.when.currentIndexChanged.connect(self._on_when_changed)
        self.gpu_temp_max = QSpinBox()
        self.gpu_temp_max.setRange(0, 110)
        self.gpu_temp_max.setValue(int(choices.gpu_temp_max))
        self.gpu_temp_max.setSuffix(" °C")
        self.gpu_temp_max.setSpecialValueText("no limit")
        self.gpu_temp_max.setToolTip("Pause while a GPU is hotter than this, until 5 °C cooler")

        self.switch = QPushButton("Start sharing")
        self.switch.setCheckable(True)
        self.switch.clicked.connect(self._on_switch_clicked)
        self.state = QLabel("Not sharing.")
        self.state.setWordWrap(True)
        self.earnings = EarningsView()
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(200)
        self.log.setPlaceholderText("The node's last messages appear here.")

        share = QFormLayout()
        share.addRow("Node name:", self.name)
        share.addRow("Device:", self.device)
        share.addRow("Price:", self.price)
        share.addRow("Provider token:", self.token)
        hours = QHBoxLayout()
        hours.addWidget(QLabel("from"))
        hours.addWidget(self.hours_from)
        hours.addWidget(QLabel("to"))
        hours.addWidget(self.hours_to)
        hours.addStretch(1)
        timing = QFormLayout()
        timing.addRow("Render:", self.when)
        timing.addRow("Idle after:", self.idle_minutes)
        timing.addRow("Hours:", hours)
        timing.addRow("Pause GPU above:", self.gpu_temp_max)
        machine_box = _group("This machine", self.machine)
        choices_box = QGroupBox("What to share")
        choices_box.setLayout(share)
        timing_box = QGroupBox("When to render")
        timing_box.setLayout(timing)
        switch_row = QHBoxLayout()
        switch_row.addWidget(self.switch)
        switch_row.addWidget(self.state, 1)
        top = QHBoxLayout()
        top.addWidget(choices_box, 1)
        top.addWidget(timing_box, 1)
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("<h2>Provide</h2>"))
        layout.addWidget(machine_box)
        layout.addLayout(top)
        layout.addLayout(switch_row)
        layout.addWidget(_group("Earnings", self.earnings))
        layout.addWidget(self.log, 1)
        self._on_when_changed()

        self._timer = QTimer(self)
        self._timer.setInterval(STATUS_MS)
        self._timer.timeout.connect(self._tick)

    # --- public --------------------------------------------------------------------------

    def set_connection(self, connection: FarmConnection) -> None:
        self._connection = connection

    def set_machine(self, machine: MachineReport) -> None:
        """Show `machine` and offer its devices (keeps the chosen one when offered)."""
        self._machine = machine
        self.machine.set_machine(machine)
        chosen = self.device.currentText()
        self.device.clear()
        self.device.addItems(machine.devices)
        if chosen in machine.devices:
            self.device.setCurrentText(chosen)

    def choices(self) -> ProvideChoices:
        return ProvideChoices(
            name=self.name.text().strip(),
            device=self.device.currentText(),
            price=self.price.value(),
            when=str(self.when.currentData()),
            hours=(self.hours_from.value(), self.hours_to.value()),
            idle_minutes=self.idle_minutes.value(),
            gpu_temp_max=float(self.gpu_temp_max.value()),
            token=self.token.text().strip(),
        )

    def refresh(self) -> None:
        """Probe the machine (the first time, then the GPUs' live figures) and, while
        sharing, the node's state and earnings."""
        if not self._probing and (self._machine is None or self._machine.gpus):
            self._probing = True
            self._work.submit(probe_machine, self._on_probed, self._on_probe_failed)
        self._tick()

    def is_sharing(self) -> bool:
        return self._sharing_as is not None

    def stop_work(self) -> NodeProcess:
        """Stop the page's timer; the node to close when the app closes (its `close`
        blocks: run it in the background)."""
        self._timer.stop()
        return self.node

    # --- start and stop ------------------------------------------------------------------

    def _launch(self, choices: ProvideChoices, connection: FarmConnection) -> NodeLaunch:
        home = self._home or Path.home() / ".local" / "share" / "tessera"
        folder = self._store.cache_folder() if self._store is not None else ""
        cache_gb = self._store.cache_gb() if self._store is not None else DEFAULT_CACHE_GB
        executables = self._store.blender_executables() if self._store is not None else []
        return NodeLaunch(
            coordinator=connection.url,
            token=connection.token or "",
            name=choices.name,
            data_dir=Path(folder) if folder else home / "node",
            device=choices.device,
            price=choices.price,
            cache_gb=cache_gb,
            when=choices.when,
            hours=choices.hours,
            idle_after=choices.idle_minutes * 60.0,
            gpu_temp_max=choices.gpu_temp_max,
            blender=executables[0] if executables else None,
            extra_args=self._node_args,
        )

    def _on_switch_clicked(self, checked: bool) -> None:
        if checked:
            self._start()
        else:
            self._stop()

    def _start(self) -> None:
        choices = self.choices()
        if not choices.name:
            self._refuse(ErrorReport("The node needs a name.", "Write one under 'Node name'."))
            return
        if choices.when == "hours" and choices.hours[0] == choices.hours[1]:
            self._refuse(
                ErrorReport(
                    "The hours to render start and end at the same time.",
                    "Choose two different hours, e.g. from 22:00 to 7:00.",
                )
            )
            return
        if self._store is not None:
            self._store.save_provide_choices(choices)
        connection = FarmConnection(self._connection.url, choices.token or self._connection.token)
        launch = self._launch(choices, connection)
        # In LAN mode the app holds a requester token: the node joins as a provider itself.
        lan = self._store.lan_farm() if self._store is not None and not choices.token else None
        self._set_busy("Checking the token and starting the node…")

        def start() -> FarmConnection:
            node_connection = connection
            if lan is not None:
                node_connection = join_as_provider(connection.url, lan.secret, choices.name)
            check_provider_token(node_connection)
            self.node.start(dataclasses.replace(launch, token=node_connection.token or ""))
            return node_connection

        self._work.submit(
            start,
            lambda joined: self._on_started(joined, choices.name),
            self._on_start_failed,
        )

    def _on_started(self, connection: FarmConnection, name: str) -> None:
        self._sharing_as = (connection, name)
        self.switch.setEnabled(True)
        self.switch.setChecked(True)
        self.switch.setText("Stop sharing")
        self.state.setText(f"Sharing as {name} with {connection.url}: starting…")
        self._timer.start()
        self.sharing_changed.emit(True)
        self._tick()

    def _on_start_failed(self, report: ErrorReport) -> None:
        self._show_stopped("Not sharing.")
        self._work.failed.emit(report)

    def _stop(self) -> None:
        self._set_busy("Stopping the node: it finishes or hands back its task…")
        self._timer.stop()
        self._work.submit(self.node.stop, self._on_stopped, self._on_stop_failed)

    def _on_stopped(self, state: NodeState) -> None:
        self._show_stopped("Not sharing.")
        self._show_log(state.log_tail)
        self.sharing_changed.emit(False)

    def _on_stop_failed(self, report: ErrorReport) -> None:
        self._show_stopped("Not sharing.")
        self._work.failed.emit(report)
        self.sharing_changed.emit(False)

    def _set_busy(self, text: str) -> None:
        self.switch.setEnabled(False)
        self._set_choices_enabled(False)
        self.state.setText(text)

    def _set_choices_enabled(self, enabled: bool) -> None:
        """The choices are the running node's command line: fixed while it runs."""
        widgets: tuple[QWidget, ...] = (self.name, self.device, self.price, self.token, self.when)
        for widget in widgets:
            widget.setEnabled(enabled)
        if enabled:
            self._on_when_changed()
        else:
            for timing in (self.idle_minutes, self.hours_from, self.hours_to):
                timing.setEnabled(False)
        self.gpu_temp_max.setEnabled(enabled)

    def _show_stopped(self, text: str) -> None:
        self._sharing_as = None
        self._timer.stop()
        self._set_choices_enabled(True)
        self.switch.setEnabled(True)
        self.switch.setChecked(False)
        self.switch.setText("Start sharing")
        self.state.setText(text)

    def _refuse(self, report: ErrorReport) -> None:
        self.switch.setChecked(False)
        self._work.failed.emit(report)

    # --- live figures --------------------------------------------------------------------

    def _on_probed(self, machine: MachineReport) -> None:
        self._probing = False
        first = self._machine is None
        if first:
            self.set_machine(machine)
        else:
            self.machine.set_gpus(machine.gpus)
        self.loaded.emit()

    def _on_probe_failed(self, report: ErrorReport) -> None:
        self._probing = False
        self._work.failed.emit(report)

    def _tick(self) -> None:
        """Fetch the node's state and earnings in the background (never two at once)."""
        if self._ticking or self._sharing_as is None:
            return
        self._ticking = True
        connection, name = self._sharing_as

        def fetch() -> tuple[NodeState, ProviderStats | None, ErrorReport | None]:
            state = self.node.state()
            try:
                return state, fetch_provider_stats(connection, name), None
            except TesseraError as error:
                # The node is what matters here; the coordinator may be restarting.
                return state, None, ErrorReport(error.message, error.hint)

        self._work.submit(fetch, self._on_ticked, self._on_tick_failed)

    def _on_ticked(
        self, result: tuple[NodeState, ProviderStats | None, ErrorReport | None]
    ) -> None:
        self._ticking = False
        state, stats, problem = result
        self._show_log(state.log_tail)
        if self._sharing_as is None:
            return
        if not state.running:
            last = state.log_tail.splitlines()[-1:] or ["(no message)"]
            self._show_stopped(f"The node stopped (exit code {state.exit_code}): {last[0]}")
            self._work.failed.emit(
                ErrorReport(
                    f"This machine's node stopped: {last[0]}",
                    "The page shows its last messages; fix what they say and start again.",
                )
            )
            self.sharing_changed.emit(False)
            return
        connection, name = self._sharing_as
        if stats is not None:
            self.earnings.set_stats(stats)
            registered = stats.node is not None
            self.state.setText(
                f"Sharing as {name} with {connection.url}"
                + ("" if registered else ": starting (benchmark and registration)…")
            )
        elif problem is not None:
            self.state.setText(f"Sharing as {name}; the coordinator does not answer now.")
        self.loaded.emit()

    def _on_tick_failed(self, report: ErrorReport) -> None:
        self._ticking = False
        self._work.failed.emit(report)

    def _show_log(self, text: str) -> None:
        if text != self.log.toPlainText():
            self.log.setPlainText(text)

    def _on_when_changed(self) -> None:
        when = self.when.currentData()
        self.idle_minutes.setEnabled(when == "idle")
        self.hours_from.setEnabled(when == "hours")
        self.hours_to.setEnabled(when == "hours")


def _group(title: str, widget: QWidget) -> QGroupBox:
    box = QGroupBox(title)
    QVBoxLayout(box).addWidget(widget)
    return box
