"""The base of every page that shows data from the farm (Jobs, Nodes, Wallet).

A page fetches through `TesseraClient` on a worker thread (`fetch`, run by
`BackgroundWork`) and shows the result on the GUI thread (`present`). `refresh()` never
stacks a second request on one in flight: it marks the data in flight stale, which is
shown when it lands and then fetched again. `loaded` is emitted each time fresh data is
on screen (screenshots and tests wait for it), so not for stale data, nor for data
fetched while a button's action (`run_action`) is still running: the refresh that
follows the action brings the data that shows its effect. Errors are not
handled here: they go to the `BackgroundWork.failed` sink, so they all reach the one
banner of the main window.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QWidget

from app.connection import FarmConnection
from app.gui.background import BackgroundWork, ErrorReport
from protocol.client import TesseraClient


class FarmPage(QWidget):
    """Subclasses implement `fetch(client)` (worker thread) and `present(data)` (GUI thread)."""

    loaded = Signal()

    def __init__(
        self, work: BackgroundWork, connection: FarmConnection, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self._work = work
        self._connection = connection
        self._refreshing = False
        self._stale = False
        self._actions_running = 0

    def set_connection(self, connection: FarmConnection) -> None:
        self._connection = connection

    def refresh(self) -> None:
        """Fetch the page's data in the background unless a fetch is already running."""
        if self._refreshing:
            self._stale = True  # e.g. an action landed: fetch again after this one
            return
        self._refreshing = True
        connection = self._connection
        self._work.submit(
            lambda: self._fetch_with(connection), self._on_fetched, self._on_fetch_failed
        )

    def _fetch_with(self, connection: FarmConnection) -> Any:
        with connection.client() as client:
            return self.fetch(client)

    def _on_fetched(self, data: Any) -> None:
        self._refreshing = False
        self.present(data)
        if self._stale:
            self._stale = False
            self.refresh()
        elif not self._actions_running:
            self.loaded.emit()

    def _on_fetch_failed(self, report: ErrorReport) -> None:
        self._refreshing = False
        self._stale = False
        self._work.failed.emit(report)

    def run_action(self, action: Callable[[TesseraClient], object]) -> None:
        """Run `action(client)` in the background (a button's effect), then refresh."""
        connection = self._connection

        def call() -> object:
            with connection.client() as client:
                return action(client)

        self._actions_running += 1
        self._work.submit(call, self._on_action_done, self._on_action_failed)

    def _on_action_done(self, _result: object) -> None:
        self._actions_running -= 1
        self.refresh()

    def _on_action_failed(self, report: ErrorReport) -> None:
        self._actions_running -= 1
        self._work.failed.emit(report)
        self.refresh()

    def fetch(self, client: TesseraClient) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def present(self, data: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError
