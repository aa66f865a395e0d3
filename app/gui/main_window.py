"""The app's main window: a sidebar of pages, the error banner, and the page stack.

It composes the pages, owns the one `BackgroundWork` (whose `failed` signal feeds the
banner) and the one `BlenderAccess` (the Blender worker the Submit page inspects and
packs with), refreshes the visible farm page every few seconds, hands a new connection
from the Settings page to every page that talks to the farm, and opens a job submitted
from the Submit page on the Jobs page. It holds no farm logic and makes no network call
itself: pages fetch through `TesseraClient` in the background.
"""

from __future__ import annotations

from PySide6.QtCore import QTimer
from PySide6.QtGui import QCloseEvent
from PySide6.QtWidgets import (
    QHBoxLayout,
    QListWidget,
    QMainWindow,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from app.gui.background import BackgroundWork
from app.gui.blender_access import BlenderAccess
from app.gui.connection import AppSettings, FarmConnection
from app.gui.error_banner import ErrorBanner
from app.gui.farm_page import FarmPage
from app.gui.jobs_page import JobsPage
from app.gui.nodes_page import NodesPage
from app.gui.simple_pages import PlaceholderPage, SettingsPage
from app.gui.submit_page import SubmitPage
from app.gui.wallet_page import WalletPage
from protocol.models import Job

PAGES = ("submit", "jobs", "nodes", "wallet", "provide", "settings")
REFRESH_MS = 3000


class MainWindow(QMainWindow):
    """`show_page(name)` switches pages (names in `PAGES`); `page(name)` returns one."""

    def __init__(
        self,
        connection: FarmConnection,
        app_settings: AppSettings | None = None,
        refresh_ms: int = REFRESH_MS,
        blender: BlenderAccess | None = None,
    ) -> None:
        super().__init__()
        self.work = BackgroundWork(self)
        self.blender = blender or BlenderAccess()
        self._app_settings = app_settings
        self.banner = ErrorBanner()
        self.work.failed.connect(self.banner.show_error)

        self.submit = SubmitPage(self.work, connection, self.blender, app_settings)
        self.submit.submitted.connect(self._on_submitted)
        self.jobs = JobsPage(self.work, connection)
        self.nodes = NodesPage(self.work, connection)
        self.wallet = WalletPage(self.work, connection)
        self.settings = SettingsPage(connection)
        self.settings.connection_changed.connect(self._on_connection_changed)
        self.settings.invalid.connect(self.banner.show_error)
        self._pages: dict[str, QWidget] = {
            "submit": self.submit,
            "jobs": self.jobs,
            "nodes": self.nodes,
            "wallet": self.wallet,
            "provide": PlaceholderPage(
                "Provide",
                [
                    "share this machine: devices, price and when to render",
                    "live GPU load, temperature and memory",
                    "tasks done and credits earned, with a start/stop switch",
                ],
            ),
            "settings": self.settings,
        }

        self.sidebar = QListWidget()
        self.sidebar.addItems([name.capitalize() for name in PAGES])
        self.sidebar.setFixedWidth(140)
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
        self._set_title(connection)

        self._timer = QTimer(self)
        self._timer.setInterval(refresh_ms)
        self._timer.timeout.connect(self.refresh_current)
        if app_settings is not None and (geometry := app_settings.window_geometry()):
            self.restoreGeometry(geometry)
        else:
            self.resize(1100, 680)
        self.show_page("jobs")
        self._timer.start()

    def page(self, name: str) -> QWidget:
        return self._pages[name]

    def show_page(self, name: str) -> None:
        self.sidebar.setCurrentRow(PAGES.index(name))

    def current_page(self) -> str:
        return PAGES[self.stack.currentIndex()]

    def refresh_current(self) -> None:
        page = self.stack.currentWidget()
        if isinstance(page, FarmPage):
            page.refresh()

    def _on_page_changed(self, row: int) -> None:
        self.stack.setCurrentIndex(row)
        self.refresh_current()

    def _on_connection_changed(self, connection: FarmConnection) -> None:
        if self._app_settings is not None:
            self._app_settings.save_connection(connection)
        for page in self._pages.values():
            if isinstance(page, FarmPage | SubmitPage):
                page.set_connection(connection)
        self._set_title(connection)
        self.banner.hide()
        self.show_page("jobs")

    def _on_submitted(self, job: Job) -> None:
        self.jobs.select_job(job.id)
        self.show_page("jobs")

    def _set_title(self, connection: FarmConnection) -> None:
        self.setWindowTitle(f"Tessera — {connection.url}")

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 (Qt's name)
        self._timer.stop()
        if self._app_settings is not None:
            self._app_settings.save_window_geometry(self.saveGeometry())
        self.work.shutdown()
        self.blender.close()
        super().closeEvent(event)
