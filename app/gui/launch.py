"""`tessera app`: open the desktop app, or render one page to a PNG and exit.

`run_app(settings, scene=..., screenshot=..., coordinator=..., token=...)` runs the
command with plain values (`app.cli.farm` imports this module only when `app` runs; no
argparse here). The screenshot mode builds the window offscreen, loads the page from
the configured farm, or, when no farm answers there or no token is known, from an
embedded `LocalFarm` with one node that it starts and stops itself; it waits until the
page shows its data and saves `QWidget.grab()` of the window as PNG. A SCENE argument
opens that `.blend` on the Submit page (the desktop entry passes the file it was opened
with); a screenshot of the Submit page then waits until the scene is inspected, measured
and priced.

The reachability check and the local farm's start happen before the window exists, so no
interactive GUI thread ever waits on them. No farm logic here.
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from PySide6.QtCore import QEventLoop, QTimer, SignalInstance
from PySide6.QtWidgets import QApplication

from app.connection import FarmConnection, resolve_connection
from app.gui.background import ErrorReport
from app.gui.blender_access import BlenderAccess
from app.gui.connection import AppSettings
from app.gui.farm_page import FarmPage
from app.gui.lan_browser import ALL_INTERFACES
from app.gui.main_window import PAGES, MainWindow
from app.gui.provide_page import ProvidePage
from app.gui.settings_page import SettingsPage
from app.gui.submit_page import SubmitPage
from app.gui.theme import app_icon
from common.errors import CoordinatorUnreachableError, TesseraError, UsageError
from common.settings import Settings
from protocol.client import TesseraClient

#: How long a screenshot waits for its page's data.
SCREENSHOT_TIMEOUT_MS = 30_000
SCREENSHOT_SIZE = (1100, 680)


class ScreenshotError(TesseraError):
    default_hint = "Check the coordinator URL and token (--coordinator, --token)."


def run_app(
    settings: Settings,
    *,
    scene: Path | None = None,
    screenshot: tuple[str, str] | None = None,
    coordinator: str | None = None,
    token: str | None = None,
) -> int:
    """The `tessera app` command: open `scene` on the Submit page (if given), talk to
    `coordinator` with `token` (else what the app saved, else the settings'), or save the
    page of `screenshot` (PAGE, FILE) as PNG and exit."""
    if screenshot is not None:
        page, file = screenshot
        if page not in PAGES:
            raise UsageError(
                f"'{page}' is not a page of the app.", hint=f"Choose one of {', '.join(PAGES)}."
            )
        # A screenshot needs no display; the interactive app does.
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    if scene is not None and not scene.is_file():
        raise UsageError(f"{scene} is not a file.", hint="Give the path of a .blend file.")
    existing = QApplication.instance()
    application = existing if isinstance(existing, QApplication) else QApplication(sys.argv[:1])
    application.setApplicationName("Tessera")
    application.setWindowIcon(app_icon())
    store = AppSettings.for_home(settings)
    connection = resolve_connection(
        settings, url=coordinator, token=token, saved=store.connection()
    )
    if screenshot is not None:
        target = Path(file)
        take_screenshot(connection, page, target, scene)
        print(f"wrote {target}")
        return 0
    # Blender executables added on the Settings page are offered like TESSERA_BLENDER's.
    added = [
        path
        for path in store.blender_executables()
        if path not in settings.blender and path.is_file()
    ]
    settings = settings.model_copy(update={"blender": [*settings.blender, *added]})
    lan = store.lan_farm()
    lan_interfaces = [lan.interface] if lan is not None and lan.interface else ALL_INTERFACES
    window = MainWindow(
        connection, store, blender=BlenderAccess(settings), lan_interfaces=lan_interfaces
    )
    window.show()
    if scene is not None:
        window.submit.load_scene(scene.resolve())
        window.show_page("submit")
    return int(application.exec())


def take_screenshot(
    connection: FarmConnection, page: str, target: Path, scene: Path | None = None
) -> None:
    """Show `page` populated from the farm (or a local one) and save the window as PNG;
    `scene` is opened on the Submit page first."""
    with ExitStack() as stack:
        if not _farm_answers(connection):
            connection = _start_local_farm(stack)
        window = MainWindow(connection)
        try:
            window.resize(*SCREENSHOT_SIZE)
            window.show_page(page)
            window.show()
            if scene is not None:
                window.submit.load_scene(scene.resolve())
            _wait_for_data(window, page, scene is not None)
            if page == "jobs" and window.jobs.select_a_job():
                _wait_for_data(window, page)  # its frame strip and tiles
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
    from app.local_farm import LOCAL_CREDITS, LOCAL_PRICE, LocalFarm

    print("No farm answers: starting a local one (a coordinator and 1 node)...", file=sys.stderr)
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tessera-app-")))
    farm = LocalFarm(
        folder, nodes=1, price=LOCAL_PRICE, credits=LOCAL_CREDITS, node_args=["--no-benchmark"]
    )
    stack.enter_context(farm)
    return FarmConnection(farm.url, farm.requester_token)


def _wait_for_data(window: MainWindow, page: str, scene_loaded: bool = False) -> None:
    """Run the event loop until the page shows its data; raise on an error or timeout."""
    widget = window.page(page)
    ready: SignalInstance
    if isinstance(widget, SubmitPage) and scene_loaded:
        ready = widget.estimated
    elif isinstance(widget, FarmPage | ProvidePage):
        ready = widget.loaded
    elif isinstance(widget, SettingsPage):
        ready = widget.builds_listed
    else:
        QApplication.processEvents()
        return
    loop = QEventLoop()
    errors: list[ErrorReport] = []

    def on_failed(report: ErrorReport) -> None:
        errors.append(report)
        loop.quit()

    ready.connect(loop.quit)
    window.work.failed.connect(on_failed)
    timer = QTimer()
    timer.setSingleShot(True)
    timer.timeout.connect(loop.quit)
    timer.start(SCREENSHOT_TIMEOUT_MS)
    if not isinstance(widget, SubmitPage):
        widget.refresh()  # no-op when showing the page already started a refresh
    loop.exec()
    if errors:
        raise ScreenshotError(errors[0].message, hint=errors[0].hint or None)
    if not timer.isActive():
        raise ScreenshotError(f"The {page} page got no data in {SCREENSHOT_TIMEOUT_MS // 1000} s.")
    timer.stop()
    QApplication.processEvents()
