"""The desktop app (app/gui): widgets built from plain models, the background-work
wrapper and its one error sink, the pages against a real coordinator on 127.0.0.1, and
`tessera app --screenshot`."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import QThread
from PySide6.QtGui import QImage
from PySide6.QtWidgets import QApplication
from pytestqt.qtbot import QtBot

from app.connection import FarmConnection
from app.gui.background import BackgroundWork, ErrorReport
from app.gui.connection import AppSettings
from app.gui.jobs_page import JobsTable
from app.gui.main_window import MainWindow
from app.gui.nodes_page import NodesTable
from app.gui.tables import cell_texts
from app.gui.wallet_page import WalletView
from common.errors import NoCameraError
from protocol.accounts import (
    LedgerEntry,
    Wallet,
)
from protocol.models import (
    Job,
    JobProgress,
    JobSpec,
    JobStatus,
    NodeCapabilities,
    NodeInfo,
    Role,
)
from tests.farm_tools import RunningCoordinator, plain_spec, start_coordinator

REPO = Path(__file__).resolve().parent.parent
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
#: Nothing listens here (the discard port), so the app meets an unreachable coordinator.
DEAD_URL = "http://127.0.0.1:9"


# --- plain models -----------------------------------------------------------------------


def _spec(bundle: str = "0" * 64, name: str = "shot") -> JobSpec:
    return plain_spec(name, bundle=bundle)


def _job(name: str, status: JobStatus, tasks_done: int, frames_done: int) -> Job:
    return Job(
        id=f"job-{name}",
        name=name,
        owner="alice",
        status=status,
        priority=50,
        spec=_spec(name=name),
        progress=JobProgress(
            tasks_total=8, tasks_done=tasks_done, frames_total=4, frames_done=frames_done
        ),
        created_at=NOW,
        updated_at=NOW,
        message="",
    )


def _node(name: str, suspended: str | None = None) -> NodeInfo:
    return NodeInfo(
        id=f"node-{name}",
        owner=f"{name}-owner",
        capabilities=NodeCapabilities(
            name=name, devices=["CPU", "OPTIX"], blender_versions=["5.0.1"], price=1.5
        ),
        status="idle",
        last_seen=NOW,
        tasks_completed=7,
        earned=12.5,
        reputation=0.75,
        rejected=2,
        suspended=suspended,
    )


def test_jobs_table_from_plain_models(qtbot: QtBot) -> None:
    table = JobsTable()
    qtbot.addWidget(table)
    table.set_jobs([_job("a", JobStatus.ACTIVE, 4, 2), _job("b", JobStatus.COMPLETED, 8, 4)])
    assert table.rowCount() == 2
    assert cell_texts(table, 0)[:2] == ["a", "active"]
    assert cell_texts(table, 0)[3] == "2/4"
    assert table.progress_bar(0).value() == 50
    assert table.progress_bar(1).value() == 100
    table.selectRow(1)
    assert table.selected_job_id() == "job-b"
    # A refresh keeps the selection on the same job even when rows move.
    table.set_jobs([_job("c", JobStatus.QUEUED, 0, 0), _job("b", JobStatus.COMPLETED, 8, 4)])
    assert table.selected_job_id() == "job-b"


def test_nodes_table_from_plain_models(qtbot: QtBot) -> None:
    table = NodesTable()
    qtbot.addWidget(table)
    table.set_nodes([_node("fast"), _node("cheat", suspended="2 rejected results")])
    fast, cheat = cell_texts(table, 0), cell_texts(table, 1)
    assert fast[:5] == ["fast", "fast-owner", "idle", "CPU, OPTIX", "5.0.1"]
    assert fast[6:13] == ["7", "-", "7 (0 s)", "2", "1.5", "0.75", "12.50"]
    assert cheat[2] == "SUSPENDED"
    status = table.item(1, 2)
    assert status is not None and "2 rejected results" in status.toolTip()
    paused = _node("desk").model_copy(
        update={"status": "paused", "paused": "paused: the user is active (input 3 s ago)"}
    )
    table.set_nodes([paused])
    assert cell_texts(table, 0)[2] == "paused"
    reason = table.item(0, 2)
    assert reason is not None and reason.toolTip() == "the user is active (input 3 s ago)"


def test_wallet_view_from_a_plain_model(qtbot: QtBot) -> None:
    view = WalletView()
    qtbot.addWidget(view)
    history = [
        LedgerEntry(txn="t1", kind="grant", amount=100.0, memo="welcome", at=NOW),
        LedgerEntry(
            txn="t2", kind="escrow", amount=-30.0, job_id="j1", at=NOW + timedelta(minutes=1)
        ),
    ]
    view.set_wallet(Wallet(account="alice", balance=70.0, escrow=30.0, history=history))
    assert view.balance.text() == "70.00 credits"
    assert view.escrow.text() == "30.00 credits"
    assert view.history.rowCount() == 2
    assert cell_texts(view.history, 0)[1:4] == ["escrow", "-30.00", "j1"]  # newest first
    assert cell_texts(view.history, 1)[1:] == ["grant", "+100.00", "-", "welcome"]


@pytest.fixture()
def open_window(qtbot: QtBot) -> Iterator[Callable[..., MainWindow]]:
    """Makes main windows and closes them at the end of the test, which waits for their
    background work (pytest-qt's own clean-up holds only weak references)."""
    windows: list[MainWindow] = []

    def make(connection: FarmConnection, **options: Any) -> MainWindow:
        window = MainWindow(connection, **options)
        windows.append(window)
        return window

    yield make
    for window in windows:
        window.close()


# --- background work --------------------------------------------------------------------


@pytest.fixture()
def work(qapp: QApplication) -> Iterator[BackgroundWork]:
    background = BackgroundWork()
    yield background
    background.shutdown()


def test_background_work_delivers_its_result_on_the_gui_thread(
    qtbot: QtBot, work: BackgroundWork
) -> None:
    ran_on: list[int] = []
    delivered: list[tuple[int, bool, int]] = []

    def job() -> int:
        ran_on.append(threading.get_ident())
        return 42

    def on_done(value: int) -> None:
        is_gui = QThread.currentThread() is QApplication.instance().thread()  # type: ignore[union-attr]
        delivered.append((threading.get_ident(), is_gui, value))

    work.submit(job, on_done)
    qtbot.waitUntil(lambda: bool(delivered), timeout=5000)
    gui = threading.main_thread().ident
    assert ran_on and ran_on[0] != gui
    assert delivered == [(gui, True, 42)]
    assert not work.busy


def test_background_errors_reach_the_one_sink_on_the_gui_thread(
    qtbot: QtBot, work: BackgroundWork
) -> None:
    def fails() -> None:
        raise NoCameraError("This scene has no camera.", hint="Set one with Ctrl+Numpad0.")

    threads: list[int] = []
    work.failed.connect(lambda _report: threads.append(threading.get_ident()))
    with qtbot.waitSignal(work.failed, timeout=5000) as signal:
        work.submit(fails)
    assert signal.args == [ErrorReport("This scene has no camera.", "Set one with Ctrl+Numpad0.")]
    assert threads == [threading.main_thread().ident]

    def bug() -> None:
        raise KeyError("frame")

    with qtbot.waitSignal(work.failed, timeout=5000) as signal:
        work.submit(bug)
    report = signal.args[0]
    assert report.message.startswith("Something went wrong") and "Traceback" not in report.message


def test_the_banner_shows_an_unreachable_coordinator_in_plain_language(
    qtbot: QtBot, open_window: Callable[..., MainWindow]
) -> None:
    window = open_window(FarmConnection(DEAD_URL, "token"))
    qtbot.waitUntil(lambda: not window.banner.isHidden(), timeout=10_000)
    assert window.banner.message.text().startswith("Cannot reach the coordinator at " + DEAD_URL)
    assert "tessera coordinator" in window.banner.hint.text()


def test_settings_page_saves_the_connection(
    qtbot: QtBot, open_window: Callable[..., MainWindow], isolated_settings: Path
) -> None:
    store = AppSettings(isolated_settings / "app.ini")
    window = open_window(FarmConnection(DEAD_URL, None), app_settings=store)
    window.show_page("settings")
    window.settings.url.setText("not a url")
    window.settings.save.click()
    assert "is not a coordinator URL" in window.banner.message.text()
    window.settings.url.setText("http://farm.example:8400/")
    window.settings.token.setText("secret")
    window.settings.save.click()
    assert AppSettings(isolated_settings / "app.ini").connection() == FarmConnection(
        "http://farm.example:8400", "secret"
    )
    assert window.current_page() == "jobs"


def test_the_cli_does_not_load_qt() -> None:
    code = "import sys, app.cli; print('PySide6' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "False"


# --- against a real coordinator -----------------------------------------------------------


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCoordinator]:
    running = start_coordinator(tmp_path_factory.mktemp("coordinator"))
    yield running
    running.stop()


def _account(coordinator: RunningCoordinator, name: str, role: Role) -> str:
    with coordinator.client(coordinator.admin_token) as admin:
        return admin.create_account(name, role).token


def _fake_bundle() -> bytes:
    """A bundle the coordinator accepts: a zip whose scene.blend has Blender's magic.
    Nothing renders it (no node leases in these tests)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("scene.blend", b"BLENDER-v500" + bytes(64))
    return buffer.getvalue()


def test_wallet_page_shows_a_granted_balance(
    qtbot: QtBot, open_window: Callable[..., MainWindow], coordinator: RunningCoordinator
) -> None:
    token = _account(coordinator, "wallet-user", Role.REQUESTER)
    with coordinator.client(coordinator.admin_token) as admin:
        admin.grant("wallet-user", 125.5)
    window = open_window(FarmConnection(coordinator.url, token))
    with qtbot.waitSignal(window.wallet.loaded, timeout=10_000):
        window.show_page("wallet")
    assert window.wallet.view.balance.text() == "125.50 credits"
    assert cell_texts(window.wallet.view.history, 0)[1:3] == ["grant", "+125.50"]
    assert window.banner.isHidden()


def test_nodes_page_lists_a_registered_node(
    qtbot: QtBot, open_window: Callable[..., MainWindow], coordinator: RunningCoordinator
) -> None:
    provider = _account(coordinator, "gpu-owner", Role.PROVIDER)
    with coordinator.client(provider) as client:
        client.register_node(
            NodeCapabilities(name="render-01", devices=["CPU"], blender_versions=["5.0.1"])
        )
    window = open_window(FarmConnection(coordinator.url, provider))
    with qtbot.waitSignal(window.nodes.loaded, timeout=10_000):
        window.show_page("nodes")
    rows = [cell_texts(window.nodes.table, r) for r in range(window.nodes.table.rowCount())]
    assert ["render-01", "gpu-owner", "idle"] in [row[:3] for row in rows]


def test_jobs_page_pauses_resumes_and_cancels_a_job(
    qtbot: QtBot,
    open_window: Callable[..., MainWindow],
    coordinator: RunningCoordinator,
    tmp_path: Path,
) -> None:
    token = _account(coordinator, "jobs-user", Role.REQUESTER)
    bundle = tmp_path / "bundle.zip"
    bundle.write_bytes(_fake_bundle())
    with coordinator.client(token) as client:
        job = client.submit_job(_spec(client.upload_bundle(bundle), name="turntable"))
    window = open_window(FarmConnection(coordinator.url, token), refresh_ms=60_000)
    page = window.jobs
    with qtbot.waitSignal(page.loaded, timeout=10_000):
        window.show_page("jobs")
    assert cell_texts(page.table, 0)[:2] == ["turntable", "queued"]
    page.table.selectRow(0)
    assert page.table.selected_job_id() == job.id

    for button, status in (
        (page.pause_button, "paused"),
        (page.resume_button, "queued"),
        (page.cancel_button, "canceled"),
    ):
        assert button.isEnabled()
        with qtbot.waitSignal(page.loaded, timeout=10_000):
            button.click()
        assert cell_texts(page.table, 0)[1] == status
    assert not page.cancel_button.isEnabled()
    assert window.banner.isHidden()


def test_tessera_app_screenshot_writes_a_png(
    coordinator: RunningCoordinator, tmp_path: Path
) -> None:
    token = _account(coordinator, "shot-user", Role.REQUESTER)
    target = tmp_path / "jobs.png"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["QT_QPA_PLATFORM"] = "offscreen"
    args = ["app", "--coordinator", coordinator.url, "--token", token]
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", *args, "--screenshot", "jobs", str(target)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = QImage(str(target))
    assert image.width() >= 800 and image.height() >= 500


def test_tessera_app_rejects_an_unknown_page(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "app",
            "--screenshot",
            "billing",
            str(tmp_path / "x.png"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "'billing' is not a page of the app" in done.stderr


def test_tessera_app_screenshot_of_a_scene_on_the_submit_page(
    coordinator: RunningCoordinator, demo_scene: Path, tmp_path: Path
) -> None:
    token = _account(coordinator, "scene-shot-user", Role.REQUESTER)
    target = tmp_path / "submit.png"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["QT_QPA_PLATFORM"] = "offscreen"
    env["TESSERA_HOME"] = str(tmp_path / "home")
    args = ["app", str(demo_scene), "--coordinator", coordinator.url, "--token", token]
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", *args, "--screenshot", "submit", str(target)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert QImage(str(target)).width() >= 800


def test_tessera_app_refuses_a_scene_that_is_not_there(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.blend"
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "app", str(missing), "--screenshot", "submit", "x.png"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert f"{missing} is not a file" in done.stderr
