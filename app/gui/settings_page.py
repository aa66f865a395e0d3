"""The Settings page: which farm the app talks to, the Blender builds, the node's cache, and
the app's look.

- **Farm**: a coordinator URL and token, or LAN mode: a farm's name and join secret (the
  app finds the coordinator with zeroconf and joins it, as `tessera node --lan` does), with
  the address of this machine to search from (blank: every network).
- **Blender**: the builds found (`renderers.builds.find_builds`, in the background) and
  those added with *Add Blender…*: a Blender executable, or a Python interpreter that has
  the bpy module. A path is identified in the background by running it, remembered when
  it is Blender, and refused in the banner when it is not.
- **Cache**: the node's data folder and its size limit (the Provide page's node gets
  them as `--data` and `--cache-gb`).
- **Look**: System, Light or Dark.

The page edits values and emits them (`connection_changed`, `lan_farm_chosen`,
`theme_changed`); the main window saves the connection and applies it. Mistakes in what
was typed go to `invalid`, which the main window routes to its banner. No farm logic here.
"""

from __future__ import annotations

import re
from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QButtonGroup,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QRadioButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from app.connection import FarmConnection
from app.gui.background import BackgroundWork, ErrorReport
from app.gui.connection import AppSettings, LanFarm
from app.gui.theme import THEME_LABELS
from app.node_process import DEFAULT_CACHE_GB
from common.errors import BlenderNotFoundError
from renderers.builds import BlenderBuild, find_builds, probe_bpy, probe_executable

#: Farm names go into zeroconf service names and TXT records: keep them short and plain.
FARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,39}$")
BLENDER_HINT = (
    "Choose the blender executable of a Blender installation (e.g. /opt/blender-4.2/blender), "
    "or a Python interpreter that has the bpy module."
)


def identify_blender(path: Path) -> BlenderBuild:
    """The Blender build at `path`: a Blender executable, or a Python with bpy. Raises
    `BlenderNotFoundError` saying why it is not one (runs it: background only)."""
    if not path.exists():
        raise BlenderNotFoundError(f"There is no file at {path}.", hint=BLENDER_HINT)
    try:
        return probe_executable(path)
    except BlenderNotFoundError as error:
        reason = error.message
    if path.is_file() and path.stat().st_mode & 0o111:
        build = probe_bpy(path)
        if build is not None:
            return build
    raise BlenderNotFoundError(f"{path} is not Blender: {reason}.", hint=BLENDER_HINT)


def list_builds(added: list[Path]) -> list[tuple[BlenderBuild, bool]]:
    """Every build found (bpy of this Python, `blender` on PATH) and every added one that
    still works, each with whether it was added by hand (background only)."""
    rows = {build.path.resolve(): (build, False) for build in find_builds()}
    for path in added:
        try:
            build = identify_blender(path)
        except BlenderNotFoundError:
            continue  # removed or broken since: not offered, still remembered
        known = rows.get(build.path.resolve())
        rows[build.path.resolve()] = (known[0] if known else build, True)
    return list(rows.values())


class SettingsPage(QWidget):
    """Farm, Blender, cache and look. `save` applies the farm choice."""

    connection_changed = Signal(object)  # FarmConnection
    lan_farm_chosen = Signal(object)  # LanFarm
    theme_changed = Signal(str)
    invalid = Signal(object)  # ErrorReport
    builds_listed = Signal()

    def __init__(
        self,
        connection: FarmConnection,
        work: BackgroundWork | None = None,
        app_settings: AppSettings | None = None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self._work = work
        self._store = app_settings
        self._listing = False
        self._listed = False
        lan = app_settings.lan_farm() if app_settings is not None else None

        # farm
        self.coordinator_mode = QRadioButton("A coordinator (URL and token)")
        self.lan_mode = QRadioButton("A farm on my LAN (name and secret)")
        modes = QButtonGroup(self)
        modes.addButton(self.coordinator_mode)
        modes.addButton(self.lan_mode)
        self.url = QLineEdit(connection.url)
        self.url.setPlaceholderText("http://127.0.0.1:8400")
        self.token = QLineEdit(connection.token or "")
        self.token.setEchoMode(QLineEdit.EchoMode.Password)
        self.token.setPlaceholderText("the token the farm's admin gave you")
        self.lan_farm = QLineEdit(lan.name if lan else "")
        self.lan_farm.setPlaceholderText("e.g. studio")
        self.lan_secret = QLineEdit(lan.secret if lan else "")
        self.lan_secret.setEchoMode(QLineEdit.EchoMode.Password)
        self.lan_secret.setPlaceholderText("the farm's join secret")
        self.lan_interface = QLineEdit(lan.interface if lan else "")
        self.lan_interface.setPlaceholderText("blank: every network (e.g. 192.168.1.20)")
        self.save = QPushButton("Save and reconnect")
        self.save.clicked.connect(self._on_save_clicked)
        (self.lan_mode if lan else self.coordinator_mode).setChecked(True)
        self.coordinator_mode.toggled.connect(self._on_mode_changed)
        farm = QFormLayout()
        farm.addRow(self.coordinator_mode)
        farm.addRow("Coordinator URL:", self.url)
        farm.addRow("Access token:", self.token)
        farm.addRow(self.lan_mode)
        farm.addRow("Farm name:", self.lan_farm)
        farm.addRow("Join secret:", self.lan_secret)
        farm.addRow("Search from:", self.lan_interface)
        farm.addRow("", self.save)

        # blender
        self.builds = QListWidget()
        self.builds.setMaximumHeight(110)
        self.builds.setWordWrap(True)
        self.builds.addItem("Looking for Blender…")
        self.add_button = QPushButton("Add Blender…")
        self.add_button.clicked.connect(self._on_add_clicked)
        self.find_button = QPushButton("Look again")
        self.find_button.clicked.connect(self.list_builds)
        blender_buttons = QHBoxLayout()
        blender_buttons.addWidget(self.add_button)
        blender_buttons.addWidget(self.find_button)
        blender_buttons.addStretch(1)
        blender = QVBoxLayout()
        blender.addWidget(self.builds)
        blender.addLayout(blender_buttons)

        # cache
        self.cache_folder = QLineEdit(app_settings.cache_folder() if app_settings else "")
        self.cache_folder.setPlaceholderText("blank: the node folder in Tessera's data folder")
        self.cache_folder.editingFinished.connect(self._on_cache_changed)
        choose = QPushButton("Choose…")
        choose.clicked.connect(self._on_choose_cache_clicked)
        self.cache_gb = QDoubleSpinBox()
        self.cache_gb.setRange(1.0, 100_000.0)
        self.cache_gb.setDecimals(0)
        self.cache_gb.setSuffix(" GiB")
        self.cache_gb.setValue(app_settings.cache_gb() if app_settings else DEFAULT_CACHE_GB)
        self.cache_gb.valueChanged.connect(self._on_cache_changed)
        folder_row = QHBoxLayout()
        folder_row.addWidget(self.cache_folder, 1)
        folder_row.addWidget(choose)
        cache = QFormLayout()
        cache.addRow("Node folder:", folder_row)
        cache.addRow("Scene cache limit:", self.cache_gb)

        # look
        self.theme = QComboBox()
        for key, label in THEME_LABELS.items():
            self.theme.addItem(label, key)
        current = app_settings.theme() if app_settings else "system"
        self.theme.setCurrentIndex(list(THEME_LABELS).index(current))
        self.theme.currentIndexChanged.connect(self._on_theme_changed)
        look = QFormLayout()
        look.addRow("Theme:", self.theme)

        grid = QGridLayout()
        grid.addWidget(_box("Farm", farm), 0, 0, 2, 1)
        grid.addWidget(_box("Blender", blender), 0, 1)
        grid.addWidget(_box("Node cache", cache), 1, 1)
        grid.addWidget(_box("Look", look), 2, 0)
        grid.setColumnStretch(0, 1)
        grid.setColumnStretch(1, 1)
        content = QWidget()
        inner = QVBoxLayout(content)
        inner.addWidget(QLabel("<h2>Settings</h2>"))
        inner.addLayout(grid)
        inner.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(content)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(scroll)
        self._on_mode_changed()

    # --- farm ----------------------------------------------------------------------------

    def _on_mode_changed(self) -> None:
        coordinator = self.coordinator_mode.isChecked()
        for field in (self.url, self.token):
            field.setEnabled(coordinator)
        for field in (self.lan_farm, self.lan_secret, self.lan_interface):
            field.setEnabled(not coordinator)

    def _on_save_clicked(self) -> None:
        if self.lan_mode.isChecked():
            self._save_lan()
            return
        url = self.url.text().strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            self.invalid.emit(
                ErrorReport(
                    f"{url or 'An empty text'} is not a coordinator URL.",
                    "Write it with its scheme, e.g. http://127.0.0.1:8400.",
                )
            )
            return
        if self._store is not None:
            self._store.save_lan_farm(None)
        self.connection_changed.emit(FarmConnection(url, self.token.text().strip() or None))

    def _save_lan(self) -> None:
        name = self.lan_farm.text().strip()
        secret = self.lan_secret.text()
        interface = self.lan_interface.text().strip()
        problem: ErrorReport | None = None
        if not FARM_NAME.match(name):
            problem = ErrorReport(
                f"'{name}' is not a farm name." if name else "The farm has no name.",
                "Use up to 40 letters, digits, spaces, dots, dashes or underscores, as the "
                "farm's coordinator was started with (--farm NAME).",
            )
        elif not secret.strip():
            problem = ErrorReport(
                "The join secret is empty.",
                "Ask whoever runs the farm for its secret (--secret S).",
            )
        elif interface and not _is_ipv4(interface):
            problem = ErrorReport(
                f"'{interface}' is not an address of this machine.",
                "Write an IPv4 address such as 192.168.1.20, or leave it blank.",
            )
        if problem is not None:
            self.invalid.emit(problem)
            return
        farm = LanFarm(name, secret, interface)
        if self._store is not None:
            self._store.save_lan_farm(farm)
        self.lan_farm_chosen.emit(farm)

    def show_connection(self, connection: FarmConnection) -> None:
        """Show the connection the app uses now (e.g. a local farm or a LAN farm's)."""
        self.url.setText(connection.url)
        self.token.setText(connection.token or "")

    # --- blender -------------------------------------------------------------------------

    def refresh(self) -> None:
        """List the builds the first time the page is shown."""
        if not self._listed:
            self.list_builds()

    def list_builds(self) -> None:
        if self._work is None or self._listing:
            return
        self._listing = True
        added = self._store.blender_paths() if self._store is not None else []
        self._work.submit(lambda: list_builds(added), self._on_builds_listed, self._on_list_failed)

    def _on_builds_listed(self, builds: list[tuple[BlenderBuild, bool]]) -> None:
        self._listing = False
        self._listed = True
        self.builds.clear()
        for build, added in builds:
            self.builds.addItem(build.label + (" — added" if added else ""))
            self.builds.item(self.builds.count() - 1).setToolTip(str(build.path))
        if not builds:
            self.builds.addItem("No Blender found: add one with Add Blender…")
        self.builds_listed.emit()

    def _on_list_failed(self, report: ErrorReport) -> None:
        self._listing = False
        self.builds.clear()
        self.builds.addItem("Could not list the Blender builds (see the message above).")
        if self._work is not None:
            self._work.failed.emit(report)

    def _on_add_clicked(self) -> None:
        start = self._store.last_folder("blender") if self._store is not None else ""
        path, _filter = QFileDialog.getOpenFileName(self, "Choose a Blender executable", start)
        if path:
            if self._store is not None:
                self._store.save_last_folder("blender", Path(path).parent)
            self.add_blender(Path(path))

    def add_blender(self, path: Path) -> None:
        """Identify `path` in the background; remember and list it if it is Blender, else
        say why in the banner."""
        if self._work is None:
            return
        self.add_button.setEnabled(False)
        self._work.submit(
            lambda: identify_blender(path),
            lambda build: self._on_blender_identified(path, build),
            self._on_blender_refused,
        )

    def _on_blender_identified(self, path: Path, build: BlenderBuild) -> None:
        self.add_button.setEnabled(True)
        if self._store is not None:
            paths = self._store.blender_paths()
            if path not in paths:
                self._store.save_blender_paths([*paths, path])
        self.list_builds()

    def _on_blender_refused(self, report: ErrorReport) -> None:
        self.add_button.setEnabled(True)
        if self._work is not None:
            self._work.failed.emit(report)

    # --- cache and look ------------------------------------------------------------------

    def _on_choose_cache_clicked(self) -> None:
        folder = QFileDialog.getExistingDirectory(
            self, "Choose the node's folder", self.cache_folder.text()
        )
        if folder:
            self.cache_folder.setText(folder)
            self._on_cache_changed()

    def _on_cache_changed(self) -> None:
        if self._store is not None:
            self._store.save_cache(self.cache_folder.text().strip(), self.cache_gb.value())

    def _on_theme_changed(self) -> None:
        theme = str(self.theme.currentData())
        if self._store is not None:
            self._store.save_theme(theme)
        self.theme_changed.emit(theme)


def _is_ipv4(text: str) -> bool:
    parts = text.split(".")
    return len(parts) == 4 and all(p.isdigit() and 0 <= int(p) <= 255 for p in parts)


def _box(title: str, layout: QFormLayout | QVBoxLayout) -> QGroupBox:
    box = QGroupBox(title)
    box.setLayout(layout)
    return box
