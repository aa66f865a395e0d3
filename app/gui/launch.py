"""`tessera app`: open the desktop app, or render one page to a PNG and exit.

`run_app(args, settings)` is the command's handler (app/cli.py imports this module only
when `app` runs). The screenshot mode builds the window offscreen, loads the page from
the configured farm, or, when no farm answers there or no token is known, from an
embedded `LocalFarm` with one node that it starts and stops itself; it waits until the
page shows its data and saves `QWidget.grab()` of the window as PNG.

The reachability check and the local farm's start happen before the window exists, so no
interactive GUI thread ever waits on them. No farm logic here.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from PySide6.QtCore import QEventLoop, QTimer
from PySide6.QtWidgets import QApplication

from app.gui.background import ErrorReport
from app.gui.blender_access import BlenderAccess
from app.gui.connection import AppSettings, FarmConnection, resolve_connection
from app.gui.farm_page import FarmPage
from app.gui.main_window import PAGES, MainWindow
from common.errors import CoordinatorUnreachableError, TesseraError, UsageError
from common.settings import Settings
from protocol.client import TesseraClient

#: How long a screenshot waits for its page's data.
SCREENSHOT_TIMEOUT_MS = 30_000
SCREENSHOT_SIZE = (1100, 680)


class ScreenshotError(TesseraError):
    default_hint = "Check the coordinator URL and token (--coordinator, --token)."


def run_app(args: argparse.Namespace, settings: Settings) -> int:
    """The `tessera app` command."""
    if args.screenshot is not None:
        page, file = args.screenshot
        if page not in PAGES:
            raise UsageError(
                f"'{page}' is not a page of the app.", hint=f"Choose one of {', '.join(PAGES)}."
            )
        # A screenshot needs no display; the interactive app does.
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    application = QApplication.instance() or QApplication(sys.argv[:1])
    application.setApplicationName("Tessera")
    store = AppSettings.for_home(settings)
    connection = resolve_connection(args, settings, store.connection())
    if args.screenshot is not None:
        target = Path(file)
        take_screenshot(connection, page, target)
        print(f"wrote {target}")
        return 0
    window = MainWindow(connection, store, blender=BlenderAccess(settings))
    window.show()
    return int(application.exec())


def take_screenshot(connection: FarmConnection, page: str, target: Path) -> None:
    """Show `page` populated from the farm (or a local one) and save the window as PNG."""
    with ExitStack() as stack:
        if not _farm_answers(connection):
            connection = _start_local_farm(stack)
        window = MainWindow(connection)
        try:
            window.resize(*SCREENSHOT_SIZE)
            window.show_page(page)
            window.show()
            _wait_for_data(window, page)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not window.grab().save(str(target), "PNG"):
                raise ScreenshotError(f"Cannot write {target}.", hint="Check the folder.")
        finally:
            window.close()


def _farm_answers(connection: FarmConnection) -> bool:
    """False when no token is known or nothing answers at the URL (then a local farm
    stands in); a farm that refuses the token is an error, not a reason to fall back."""
    if not connection.token:
        return False
    try:
        with TesseraClient(connection.url, connection.token, timeout=3.0, retries=0) as client:
            client.me()
    except CoordinatorUnreachableError:
        return False
    return True


def _start_local_farm(stack: ExitStack) -> FarmConnection:
    from app.farm_commands import LOCAL_CREDITS, LOCAL_PRICE
    from app.local_farm import LocalFarm

    print("No farm answers: starting a local one (a coordinator and 1 node)...", file=sys.stderr)
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tessera-app-")))
    farm = LocalFarm(
        folder, nodes=1, price=LOCAL_PRICE, credits=LOCAL_CREDITS, node_args=["--no-benchmark"]
    )
    stack.enter_context(farm)
    return FarmConnection(farm.url, farm.requester_token)


def _wait_for_data(window: MainWindow, page: str) -> None:
    """Run the event loop until the page shows its data; raise on an error or timeout."""
    widget = window.page(page)
    if not isinstance(widget, FarmPage):
        QApplication.processEvents()
        return
    loop = QEventLoop()
    errors: list[ErrorReport] = []

    def on_failed(report: ErrorReport) -> None:
        errors.append(report)
        loop.quit()

    widget.loaded.connect(loop.quit)
    window.work.failed.connect(on_failed)
    timer = QTimer()
    timer.setSingleShot(True)
    timer.timeout.connect(loop.quit)
    timer.start(SCREENSHOT_TIMEOUT_MS)
    widget.refresh()  # no-op when showing the page already started a refresh
    loop.exec()
    if errors:
        raise ScreenshotError(errors[0].message, hint=errors[0].hint or None)
    if not timer.isActive():
        raise ScreenshotError(f"The {page} page got no data in {SCREENSHOT_TIMEOUT_MS // 1000} s.")
    timer.stop()
    QApplication.processEvents()
