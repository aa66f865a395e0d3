"""The app's main window: a menu, a toolbar, a sidebar of pages, the error banner, the page
stack and a status line.

It composes the pages, owns the one `BackgroundWork` (whose `failed` signal feeds the
banner), the one `BlenderAccess` (the Blender worker the Submit page inspects and packs
with) and the `LocalFarmControl` of *Start local farm*; it refreshes the visible page
every few seconds, hands a new connection (from the Settings page, a LAN farm joined in
the background, or a local farm) to every page that talks to the farm, opens a job
submitted from the Submit page on the Jobs page, applies the theme, and stops the
Provide page's node and the local farm when it closes. It holds no farm logic and makes
no network call itself.

Shortcuts: Ctrl+1..6 the pages, Ctrl+O open a scene, Ctrl+L start or stop the local farm,
F5 refresh, Ctrl+Q quit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from PySide6.QtCore import QSize, Qt, QTimer
from PySide6.QtGui import QAction, QCloseEvent, QIcon, QKeySequence, QPalette
from PySide6.QtWidgets import (
    QApplication,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMainWindow,
    QStackedWidget,
    QStyle,
    QToolBar,
    QVBoxLayout,
    QWidget,
)

from app.connection import FarmConnection
from app.gui.background import BackgroundWork
from app.gui.blender_access import BlenderAccess
from app.gui.connection import AppSettings, LanFarm
from app.gui.error_banner import ErrorBanner
from app.gui.farm_page import FarmPage
from app.gui.jobs_page import JobsPage
from app.gui.local_farm_action import LocalFarmControl, LocalFarmInfo
from app.gui.nodes_page import NodesPage
from app.gui.provide_page import ProvidePage
from app.gui.settings_page import SettingsPage
from app.gui.submit_page import SubmitPage
from app.gui.theme import app_icon, apply_theme, monochrome_icon
from app.gui.wallet_page import WalletPage
from protocol.client import TesseraClient
from protocol.discovery import find_coordinator
from protocol.models import Job, Role

PAGES = ("submit", "jobs", "nodes", "wallet", "provide", "settings")
REFRESH_MS = 3000
#: How long joining a LAN farm listens for its coordinator.
LAN_SEARCH_SECONDS = 10.0
_PAGE_ICONS = {
    "submit": QStyle.StandardPixmap.SP_ArrowUp,
    "jobs": QStyle.StandardPixmap.SP_FileDialogDetailedView,
    "nodes": QStyle.StandardPixmap.SP_ComputerIcon,
    "wallet": QStyle.StandardPixmap.SP_DriveHDIcon,
    "provide": QStyle.StandardPixmap.SP_MediaPlay,
    "settings": QStyle.StandardPixmap.SP_FileDialogContentsView,
}


#: Standard icons drawn in black, unreadable on a dark theme unless recoloured.
_BLACK_ICONS = frozenset(
    {
        QStyle.StandardPixmap.SP_ArrowUp,
        QStyle.StandardPixmap.SP_MediaPlay,
        QStyle.StandardPixmap.SP_MediaStop,
    }
)


def join_lan_farm(farm: LanFarm, node_name: str) -> FarmConnection:
    """Find `farm`'s coordinator on the LAN and trade its secret for a requester token,
    to submit and follow jobs (background only: listens with zeroconf, then asks the
    coordinator). The Provide page joins as a provider itself when it starts a node."""
    from common.errors import CoordinatorUnreachableError

    found = find_coordinator(
        farm.name, farm.secret, interface=farm.interface or None, timeout=LAN_SEARCH_SECONDS
    )
    if found is None:
        raise CoordinatorUnreachableError(
            f"No coordinator of farm '{farm.name}' with that secret answered on the LAN.",
            hint="Check the farm's name and secret, that its coordinator runs with --lan, and "
            "that both machines are on the same network ('Search from' on the Settings page).",
        )
    with TesseraClient(found.url, retries=1) as anonymous:
        token = anonymous.join_lan_farm(node_name, farm.secret, role=Role.REQUESTER).token
    return FarmConnection(found.url, token)


class MainWindow(QMainWindow):
    """`show_page(name)` switches pages (names in `PAGES`); `page(name)` returns one.

    `node_args` are added to the command line of every node the app starts (the Provide
    page's and the local farm's; tests pass --no-benchmark). `lan_interfaces`: the
    addresses the Nodes page listens on for LAN nodes (`lan_browser.ALL_INTERFACES`:
    every one; None, the default: no LAN listing)."""

    def __init__(
        self,
        connection: FarmConnection,
        app_settings: AppSettings | None = None,
        refresh_ms: int = REFRESH_MS,
        blender: BlenderAccess | None = None,
        node_args: Sequence[str] = (),
        home: Path | None = None,
        lan_interfaces: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.work = BackgroundWork(self)
        self.blender = blender or BlenderAccess()
        self._app_settings = app_settings
        self._connection = connection
        self._own_connection = connection  # to return to when the local farm stops
        home = home or self.blender.settings().home
        self.banner = ErrorBanner()
        self.work.failed.connect(self.banner.show_error)

        self.submit = SubmitPage(self.work, connection, self.blender, app_settings)
        self.submit.submitted.connect(self._on_submitted)
        self.jobs = JobsPage(self.work, connection, app_settings=app_settings)
        self.nodes = NodesPage(self.work, connection, lan_interfaces=lan_interfaces)
        self.wallet = WalletPage(self.work, connection)
        self.provide = ProvidePage(self.work, connection, app_settings, home, node_args)
        self.settings = SettingsPage(connection, self.work, app_settings)
        self.settings.connection_changed.connect(self._on_connection_changed)
        self.settings.lan_farm_chosen.connect(self._on_lan_farm_chosen)
        self.settings.invalid.connect(self.banner.show_error)
        self.settings.theme_changed.connect(self._on_theme_changed)
        self._pages: dict[str, QWidget] = {
            "submit": self.submit,
            "jobs": self.jobs,
            "nodes": self.nodes,
            "wallet": self.wallet,
            "provide": self.provide,
            "settings": self.settings,
        }
        self.local_farm = LocalFarmControl(self.work, home, node_args, self)
        self.local_farm.started.connect(self._on_local_farm_started)
        self.local_farm.stopped.connect(self._on_local_farm_stopped)
        self.local_farm.failed.connect(lambda _report: self._update_local_farm_action())

        self.sidebar = QListWidget()
        for name in PAGES:
            self.sidebar.addItem(QListWidgetItem(name.capitalize()))
        self.sidebar.setIconSize(QSize(20, 20))
        self.sidebar.setFixedWidth(150)
        self.stack = QStackedWidget()
        for name in PAGES:
            self.stack.addWidget(self._pages[name])
        self.sidebar.currentRowChanged.connect(self._on_page_changed)

        content = QVBoxLayout()
        content.addWidget(self.banner)
        content.addWidget(self.stack, 1)
        central = QWidget()
        layout = QHBoxLayout(central)
        layout.addWidget(self.sidebar)
        layout.addLayout(content, 1)
        self.setCentralWidget(central)
        self.farm_status = QLabel()
        self.farm_status.setWordWrap(False)
        self.statusBar().addWidget(self.farm_status, 1)
        self._build_actions()
        self._update_icons()
        self.setWindowIcon(app_icon())
        self._set_title(connection)
        if app_settings is not None and app_settings.theme() != "system":
            self._on_theme_changed(app_settings.theme())

        self._timer = QTimer(self)
        self._timer.setInterval(refresh_ms)
        self._timer.timeout.connect(self.refresh_current)
        if app_settings is not None and (geometry := app_settings.window_geometry()):
            self.restoreGeometry(geometry)
        else:
            self.resize(1100, 680)
        self.show_page("jobs")
        self._timer.start()

    # --- actions -------------------------------------------------------------------------

    def _action(self, text: str, shortcut: str, slot: Callable[[], object]) -> QAction:
        action = QAction(text, self)
        action.setShortcut(QKeySequence(shortcut))
        action.triggered.connect(lambda _checked=False: slot())
        self.addAction(action)
        return action

    def _build_actions(self) -> None:
        self.open_action = self._action("&Open scene…", "Ctrl+O", self._on_open_scene)
        # One owner for Ctrl+O: the menu's action (the Submit page's button has it too,
        # and a shortcut with two owners fires neither).
        self.submit.choose_button.setShortcut(QKeySequence())
        self.local_farm_action = self._action(
            "Start &local farm", "Ctrl+L", self._on_local_farm_triggered
        )
        self.local_farm_action.setToolTip(
            "Run a coordinator and a node on this machine and switch to them (Ctrl+L)"
        )
        self.refresh_action = self._action("&Refresh", "F5", self.refresh_current)
        self.quit_action = self._action("&Quit", "Ctrl+Q", self.close)
        self.page_actions = [
            self._action(
                f"&{index + 1} {name.capitalize()}",
                f"Ctrl+{index + 1}",
                lambda name=name: self.show_page(name),  # type: ignore[misc]
            )
            for index, name in enumerate(PAGES)
        ]
        menu = self.menuBar()
        farm_menu = menu.addMenu("&File")
        farm_menu.addAction(self.open_action)
        farm_menu.addAction(self.local_farm_action)
        farm_menu.addSeparator()
        farm_menu.addAction(self.quit_action)
        view_menu = menu.addMenu("&View")
        for action in self.page_actions:
            view_menu.addAction(action)
        view_menu.addSeparator()
        view_menu.addAction(self.refresh_action)
        toolbar = QToolBar("Main")
        toolbar.setObjectName("mainToolbar")
        toolbar.setMovable(False)
        toolbar.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        toolbar.addAction(self.refresh_action)
        toolbar.addAction(self.local_farm_action)
        self.addToolBar(toolbar)

    # --- pages ---------------------------------------------------------------------------

    def page(self, name: str) -> QWidget:
        return self._pages[name]

    def show_page(self, name: str) -> None:
        self.sidebar.setCurrentRow(PAGES.index(name))

    def current_page(self) -> str:
        return PAGES[self.stack.currentIndex()]

    def connection(self) -> FarmConnection:
        return self._connection

    def refresh_current(self) -> None:
        page = self.stack.currentWidget()
        if isinstance(page, FarmPage | ProvidePage | SettingsPage):
            page.refresh()

    def _on_page_changed(self, row: int) -> None:
        self.stack.setCurrentIndex(row)
        self.refresh_current()

    def _on_open_scene(self) -> None:
        self.show_page("submit")
        self.submit.choose_button.click()

    # --- connections ---------------------------------------------------------------------

    def _apply_connection(self, connection: FarmConnection, page: str = "jobs") -> None:
        self._connection = connection
        for widget in self._pages.values():
            if isinstance(widget, FarmPage | SubmitPage | ProvidePage):
                widget.set_connection(connection)
        self._set_title(connection)
        self.banner.hide()
        self.show_page(page)

    def _on_connection_changed(self, connection: FarmConnection) -> None:
        if self._app_settings is not None:
            self._app_settings.save_connection(connection)
        self._own_connection = connection
        self._apply_connection(connection)

    def _on_lan_farm_chosen(self, farm: LanFarm) -> None:
        name = self.provide.name.text().strip() or "tessera-app"
        self.farm_status.setText(f"Looking for farm '{farm.name}' on the LAN…")

        def joined(connection: FarmConnection) -> None:
            self.farm_status.setText(f"Joined farm '{farm.name}' at {connection.url} as {name}")
            self.settings.show_connection(connection)
            self._on_connection_changed(connection)

        def failed(report: object) -> None:
            self.farm_status.setText("")
            self.work.failed.emit(report)

        self.work.submit(lambda: join_lan_farm(farm, name), joined, failed)

    def _on_local_farm_triggered(self) -> None:
        if self.local_farm.busy:
            return
        if self.local_farm.running:
            self.farm_status.setText("Stopping the local farm…")
            self.local_farm.stop()
        else:
            self.farm_status.setText("Starting a local farm (a coordinator and a node)…")
            lan = self._app_settings.lan_farm() if self._app_settings is not None else None
            self.local_farm.start(lan)
        self._update_local_farm_action()

    def _on_local_farm_started(self, info: LocalFarmInfo) -> None:
        self.farm_status.setText(info.join_instructions())
        self.farm_status.setToolTip(f"Its files and logs: {info.folder}")
        self._update_local_farm_action()
        self._apply_connection(info.connection, page="nodes")

    def _on_local_farm_stopped(self) -> None:
        self.farm_status.setText("The local farm stopped.")
        self.farm_status.setToolTip("")
        self._update_local_farm_action()
        self._apply_connection(self._own_connection)

    def _update_local_farm_action(self) -> None:
        running = self.local_farm.running
        self.local_farm_action.setText("Stop &local farm" if running else "Start &local farm")
        self._update_icons()
        if not running and not self.local_farm.busy and "Starting" in self.farm_status.text():
            self.farm_status.setText("")

    def _on_submitted(self, job: Job) -> None:
        self.jobs.select_job(job.id)
        self.show_page("jobs")

    def _on_theme_changed(self, theme: str) -> None:
        application = QApplication.instance()
        if isinstance(application, QApplication):
            apply_theme(application, theme)
        self._update_icons()

    def _update_icons(self) -> None:
        """The style's standard icons; the black ones in the theme's text colour."""
        colour = QApplication.palette().color(QPalette.ColorRole.WindowText)

        def icon(kind: QStyle.StandardPixmap) -> QIcon:
            standard = self.style().standardIcon(kind)
            return monochrome_icon(standard, colour) if kind in _BLACK_ICONS else standard

        for row, name in enumerate(PAGES):
            item = self.sidebar.item(row)
            if item is not None:
                item.setIcon(icon(_PAGE_ICONS[name]))
        self.refresh_action.setIcon(icon(QStyle.StandardPixmap.SP_BrowserReload))
        running = self.local_farm.running
        self.local_farm_action.setIcon(
            icon(
                QStyle.StandardPixmap.SP_MediaStop
                if running
                else QStyle.StandardPixmap.SP_MediaPlay
            )
        )

    def _set_title(self, connection: FarmConnection) -> None:
        local = self.local_farm.info
        if local is not None and local.connection == connection:
            self.setWindowTitle(f"Tessera — local farm at {connection.url}")
        else:
            self.setWindowTitle(f"Tessera — {connection.url}")

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 (Qt's name)
        self._timer.stop()
        if self._app_settings is not None:
            self._app_settings.save_window_geometry(self.saveGeometry())
        node = self.provide.stop_work()
        self.nodes.shutdown()
        self.work.shutdown(last=[node.close, self.local_farm.close])
        self.blender.close()
        super().closeEvent(event)
