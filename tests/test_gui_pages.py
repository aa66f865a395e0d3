"""The desktop app's Submit, Jobs, Nodes and Wallet pages beyond the basics: the tile
grid over a preview and the cost estimate on Submit; ETA, credits, the task log,
priority and *Open output folder* on Jobs; LAN nodes on Nodes; the balance chart on
Wallet. Widgets from plain models first, then the pages against a real coordinator on
127.0.0.1, a minimal node rendering the demo scene with the session's Blender worker,
and zeroconf bound to 127.0.0.1 only."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtGui import QColor, QImage
from PySide6.QtWidgets import QApplication
from pytestqt.qtbot import QtBot

from app.connection import FarmConnection
from app.follow import frame_file_name
from app.gui.background import BackgroundWork
from app.gui.blender_access import BlenderAccess
from app.gui.connection import AppSettings
from app.gui.credit_chart import LINE_COLOUR, CreditChart, balance_points
from app.gui.jobs_page import JOB_COLUMNS, JobsPage, JobsTable, eta_text, job_eta
from app.gui.lan_browser import lan_node_fields
from app.gui.nodes_page import NODE_COLUMNS, SEEN_BOTH, SEEN_LAN, NodesPage, NodesTable
from app.gui.submit_page import TILES, SceneSummaryView, SubmitPage
from app.gui.tables import cell_texts
from app.gui.task_log import TASK_COLUMNS, TaskLog
from app.gui.tile_grid import TileGrid, TileState
from app.gui.wallet_page import WalletPage
from app.packing import Dependency
from protocol.accounts import (
    LedgerEntry,
    Wallet,
)
from protocol.discovery import Advertised, Advertisement, node_info
from protocol.models import (
    GpuInfo,
    Job,
    JobProgress,
    JobSpec,
    JobStatus,
    NodeCapabilities,
    NodeInfo,
    Role,
    Task,
    TaskKind,
    TaskStatus,
)
from renderers.worker import RenderWorker
from tests.farm_tools import REPO, NodeThread, RunningCoordinator, plain_spec, start_coordinator

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
LOOPBACK = "127.0.0.1"


# --- plain models -----------------------------------------------------------------------


def _spec(name: str = "shot", bundle: str = "0" * 64) -> JobSpec:
    return plain_spec(name, scene_name="Scene", bundle=bundle, size=(64, 48))


def _job(status: JobStatus, done: int, **fields: Any) -> Job:
    return Job(
        id="job-1",
        name="shot",
        owner="alice",
        status=status,
        priority=50,
        spec=_spec(),
        progress=JobProgress(tasks_total=8, tasks_done=done, frames_total=4, frames_done=done // 2),
        created_at=NOW,
        updated_at=NOW,
        **fields,
    )


def test_jobs_table_shows_eta_and_credits(qtbot: QtBot) -> None:
    running = _job(JobStatus.ACTIVE, 2, credits_escrowed=4.0, credits_spent=1.25)
    # 2 of 8 tasks in 60 s: 6 more take 180 s.
    assert job_eta(running, NOW + timedelta(seconds=60)) == timedelta(seconds=180)
    assert eta_text(running, NOW + timedelta(seconds=60)) == "3:00"
    assert eta_text(_job(JobStatus.QUEUED, 0), NOW) == "…"
    assert eta_text(_job(JobStatus.COMPLETED, 8), NOW) == "-"
    table = JobsTable()
    qtbot.addWidget(table)
    table.set_jobs([running])
    row = dict(zip(JOB_COLUMNS, cell_texts(table, 0), strict=True))
    assert row["Credits"] == "1.25 of 4.00"
    assert row["Priority"] == "50"
    assert row["ETA"] not in ("", "-")


def test_jobs_table_shows_why_a_job_waits(qtbot: QtBot) -> None:
    reason = (
        "No connected node can run this job: it needs 24.0 GB of VRAM on one GPU"
        " (--min-vram); the most a connected node's GPU has is 16.0 GB."
    )
    table = JobsTable()
    qtbot.addWidget(table)
    table.set_jobs([_job(JobStatus.QUEUED, 0, message=reason)])
    row = dict(zip(JOB_COLUMNS, cell_texts(table, 0), strict=True))
    assert "24.0 GB of VRAM" in row["Message"]


def test_task_log_from_plain_tasks(qtbot: QtBot) -> None:
    log = TaskLog()
    qtbot.addWidget(log)
    tasks = [
        Task(
            id="t1",
            job_id="job-1",
            kind=TaskKind.RENDER,
            frame=1,
            tile_index=0,
            status=TaskStatus.COMPLETED,
            attempts=1,
            node="node-abc",
            render_seconds=2.5,
            updated_at=NOW,
        ),
        Task(
            id="t2",
            job_id="job-1",
            kind=TaskKind.RENDER,
            frame=1,
            tile_index=1,
            status=TaskStatus.FAILED,
            attempts=3,
            node="node-xyz",
            message="Blender ran out of memory",
        ),
    ]
    log.set_tasks(tasks, {"node-abc": "render-01"})
    first = dict(zip(TASK_COLUMNS, cell_texts(log, 0), strict=True))
    second = dict(zip(TASK_COLUMNS, cell_texts(log, 1), strict=True))
    assert (first["Frame"], first["Tile"], first["Status"], first["Node"]) == (
        "1",
        "1",
        "completed",
        "render-01",
    )
    assert first["Render time"] == "2.5 s" and first["Updated"] != "-"
    assert (second["Status"], second["Node"], second["Attempts"]) == ("failed", "node-xyz", "3")
    assert second["Message"] == "Blender ran out of memory"
    assert log.task_ids() == ["t1", "t2"]


def test_credit_chart_from_a_plain_wallet(qtbot: QtBot) -> None:
    history = [
        LedgerEntry(txn="g", kind="grant", amount=100.0, at=NOW),
        LedgerEntry(
            txn="e", kind="escrow", amount=-30.0, job_id="j", at=NOW + timedelta(minutes=1)
        ),
        LedgerEntry(txn="r", kind="refund", amount=12.5, job_id="j", at=NOW + timedelta(minutes=2)),
    ]
    wallet = Wallet(account="alice", balance=82.5, escrow=0.0, history=list(reversed(history)))
    points = balance_points(wallet)
    assert [balance for _, balance in points] == [100.0, 70.0, 82.5]
    assert [at for at, _ in points] == [entry.at for entry in history]
    chart = CreditChart()
    qtbot.addWidget(chart)
    chart.resize(400, 200)
    chart.set_points(points)
    image = chart.grab().toImage()
    # The line passes through the middle point (a dot is drawn on it).
    middle = chart.map_point(*points[1]).toPoint()
    assert image.pixelColor(middle).name() == LINE_COLOUR.name()
    # Higher balances are drawn higher.
    assert chart.map_point(*points[0]).y() < chart.map_point(*points[1]).y()


def test_nodes_table_marks_lan_only_nodes(qtbot: QtBot) -> None:
    farm_node = NodeInfo(
        id="n1",
        owner="bob",
        capabilities=NodeCapabilities(
            name="gpu-box",
            devices=["CPU", "OPTIX"],
            gpus=[GpuInfo(type="OPTIX", name="RTX 4090", vram_mib=24576)],
            blender_versions=["5.0.1"],
            benchmark_score=2.5,
            price=1.0,
        ),
        status="idle",
        last_seen=NOW,
        tasks_completed=3,
        success_rate=0.75,
        accepted_seconds=4.25,
    )
    lan = [
        Advertised("node", "gpu-box", (LOOPBACK,), 0, {"name": "gpu-box", "devices": "OPTIX"}),
        Advertised(
            "node",
            "studio-7",
            ("10.0.0.7",),
            0,
            {"name": "studio-7", "devices": "CPU", "threads": "16", "vram": "8192"},
        ),
    ]
    assert lan_node_fields(lan[1]).vram == "8.0 GiB"
    table = NodesTable()
    qtbot.addWidget(table)
    table.set_nodes([farm_node], lan)
    assert table.rowCount() == 2
    first = dict(zip(NODE_COLUMNS, cell_texts(table, 0), strict=True))
    second = dict(zip(NODE_COLUMNS, cell_texts(table, 1), strict=True))
    assert (first["Name"], first["VRAM"], first["Benchmark"], first["Seen"]) == (
        "gpu-box",
        "24.0 GiB",
        "2.5",
        SEEN_BOTH,
    )
    assert (first["Success"], first["Accepted work"]) == ("75%", "3 (4.2 s)")
    assert (second["Success"], second["Accepted work"]) == ("-", "-")
    assert (second["Name"], second["Devices"], second["Seen"]) == (
        "studio-7",
        "CPU (16 threads)",
        SEEN_LAN,
    )
    seen = table.item(1, NODE_COLUMNS.index("Seen"))
    assert seen is not None and "10.0.0.7" in seen.toolTip()


def test_tile_plan_is_drawn_over_the_preview(qtbot: QtBot) -> None:
    grid = TileGrid()
    qtbot.addWidget(grid)
    grid.resize(400, 300)
    preview = QImage(64, 48, QImage.Format.Format_RGB32)
    preview.fill(QColor("#ff0000"))
    grid.set_plan(3, 2, (64, 48), preview)
    assert grid.grid == (3, 2) and len(grid.tiles()) == 6
    image = grid.grab().toImage()
    inside = grid.tile_rect(4).center()
    assert image.pixelColor(inside).name() == "#ff0000"
    # The tile's edge is a grid line, not the preview.
    edge = grid.tile_rect(4).topLeft()
    assert image.pixelColor(edge).name() != "#ff0000"


# --- against a real coordinator ------------------------------------------------------------


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCoordinator]:
    running = start_coordinator(tmp_path_factory.mktemp("coordinator"))
    yield running
    running.stop()


@pytest.fixture()
def work(qapp: QApplication) -> Iterator[BackgroundWork]:
    background = BackgroundWork()
    errors: list[str] = []
    background.failed.connect(lambda report: errors.append(report.message))
    yield background
    background.shutdown()
    assert not errors, f"the pages reported errors: {errors}"


def _account(coordinator: RunningCoordinator, name: str, role: Role, grant: float = 0.0) -> str:
    with coordinator.client(coordinator.admin_token) as admin:
        token = admin.create_account(name, role).token
        if grant:
            admin.grant(name, grant)
    return token


def test_submit_with_an_estimate_then_follow_pay_and_download_the_job(
    qtbot: QtBot,
    work: BackgroundWork,
    coordinator: RunningCoordinator,
    worker: RenderWorker,
    demo_scene: Path,
    tmp_path: Path,
    isolated_settings: Path,
) -> None:
    token = _account(coordinator, "pages-artist", Role.REQUESTER, grant=1000.0)
    provider = _account(coordinator, "pages-renderer", Role.PROVIDER)
    connection = FarmConnection(coordinator.url, token)
    store = AppSettings(isolated_settings / "app.ini")
    opened: list[Path] = []
    submit = SubmitPage(work, connection, BlenderAccess(worker=worker), store)
    jobs = JobsPage(
        work, connection, app_settings=store, output_dir=tmp_path / "out", open_folder=opened.append
    )
    wallet = WalletPage(work, connection)
    for page in (submit, jobs, wallet):
        qtbot.addWidget(page)

    # The options first, so the measurement made on loading serves the submit too.
    submit.frames.setText("1")
    submit.split.setCurrentText(TILES)
    submit.columns.setValue(2)
    submit.rows.setValue(2)
    submit.samples.setValue(4)
    submit.percentage.setValue(10)
    submit.denoise.setCurrentText("Off")
    submit.max_price.setValue(100.0)
    with qtbot.waitSignal(submit.estimated, timeout=90_000) as estimated:
        submit.load_scene(demo_scene)
    # The tile grid over the frame's preview (the demo scene is 640x360: 64x36 at 10 %).
    preview = submit.plan.background
    assert preview is not None and preview.width() == 160 and preview.height() == 90
    assert submit.plan.grid == (2, 2)
    # The coordinator's own estimate, shown with the balance.
    estimate = estimated.args[0]
    assert estimate.credits > 0 and estimate.balance == 1000.0 and estimate.accepted
    assert submit.estimate.text().startswith(f"Up to {estimate.credits:,.2f} credits")
    assert "balance 1,000.00" in submit.estimate.text()
    # A limit below it: the refusal, in words, with the numbers.
    with qtbot.waitSignal(submit.estimated, timeout=10_000) as refused:
        submit.max_credits.setValue(0.01)
    assert not refused.args[0].accepted
    assert "more than its max_credits of 0.01" in submit.estimate.text()
    with qtbot.waitSignal(submit.estimated, timeout=10_000):
        submit.max_credits.setValue(0)

    with qtbot.waitSignal(submit.submitted, timeout=60_000) as submitted:
        submit.submit_button.click()
    job: Job = submitted.args[0]
    assert job.credits_escrowed == pytest.approx(estimate.credits)

    with qtbot.waitSignal(wallet.loaded, timeout=10_000):
        wallet.refresh()
    before = wallet.view.chart.points()
    assert [round(balance, 3) for _, balance in before] == [
        1000.0,
        round(1000.0 - estimate.credits, 3),
    ]

    jobs.select_job(job.id)
    qtbot.waitUntil(lambda: jobs.table.selected_job_id() == job.id, timeout=10_000)
    node = NodeThread(
        coordinator.client(provider),
        worker=worker,
        scene=demo_scene,
        scratch=tmp_path,
        until_idle=1.5,
        name="pages-node",
        price=100.0,
    )
    try:

        def finished() -> bool:
            jobs.refresh()
            return cell_texts(jobs.table, 0)[1] == "completed"

        qtbot.waitUntil(finished, timeout=90_000)
    finally:
        assert node.join() >= 4
    with qtbot.waitSignal(jobs.loaded, timeout=10_000):
        jobs.refresh()
    assert jobs.view.grid.counts()[TileState.ACCEPTED] == 4
    row = dict(zip(JOB_COLUMNS, cell_texts(jobs.table, 0), strict=True))
    spent, _of, escrowed = row["Credits"].partition(" of ")
    assert 0 < float(spent) <= float(escrowed) and row["ETA"] == "-"
    # The task log lists the four tiles, rendered on the node (named, not by its id).
    log_rows = [
        dict(zip(TASK_COLUMNS, cell_texts(jobs.view.log, r), strict=True))
        for r in range(jobs.view.log.rowCount())
    ]
    renders = [r for r in log_rows if r["Kind"] == "render"]
    assert len(renders) == 4
    assert all(r["Status"] == "completed" and r["Node"] for r in renders)

    # The provider was paid and the rest refunded: the chart gained a point.
    with qtbot.waitSignal(wallet.loaded, timeout=10_000):
        wallet.refresh()
    after = wallet.view.chart.points()
    assert len(after) == len(before) + 1
    assert after[-1][1] == pytest.approx(1000.0 - float(spent), abs=0.01)

    # Open output folder: real files downloaded in the background, then the folder opened.
    assert jobs.open_button.isEnabled()
    with qtbot.waitSignal(jobs.frames_downloaded, timeout=30_000) as downloaded:
        jobs.open_button.click()
    folder = downloaded.args[0]
    assert folder == tmp_path / "out" / "demo"
    assert opened == [folder]
    # The scene's own file where Blender writes it, beside the raw EXR of every pass.
    assert (folder / frame_file_name(1, "exr")).stat().st_size > 0
    assert (folder / "render" / "demo_0001.png").stat().st_size > 0
    jobs.set_output_dir(tmp_path / "elsewhere")
    assert store.last_folder("output") == str(tmp_path / "elsewhere")


def _fake_bundle(folder: Path) -> Path:
    """A bundle the coordinator accepts (nothing renders it: no node in that test)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("scene.blend", b"BLENDER-v500" + bytes(64))
    path = folder / "bundle.zip"
    path.write_bytes(buffer.getvalue())
    return path


def test_jobs_page_sets_the_priority_and_cancels(
    qtbot: QtBot, work: BackgroundWork, coordinator: RunningCoordinator, tmp_path: Path
) -> None:
    token = _account(coordinator, "pages-priority", Role.REQUESTER)
    with coordinator.client(token) as client:
        job = client.submit_job(_spec("waiting", client.upload_bundle(_fake_bundle(tmp_path))))
    page = JobsPage(work, FarmConnection(coordinator.url, token))
    qtbot.addWidget(page)
    with qtbot.waitSignal(page.loaded, timeout=10_000):
        page.select_job(job.id)
    qtbot.waitUntil(lambda: page.table.selected_job_id() == job.id, timeout=10_000)
    assert page.priority.value() == 50 and page.priority_button.isEnabled()
    assert not page.open_button.isEnabled()  # no finished frame yet
    page.priority.setValue(80)
    column = JOB_COLUMNS.index("Priority")
    with qtbot.waitSignal(page.loaded, timeout=10_000):
        page.priority_button.click()
    qtbot.waitUntil(lambda: cell_texts(page.table, 0)[column] == "80", timeout=10_000)
    with qtbot.waitSignal(page.loaded, timeout=10_000):
        page.cancel_button.click()
    qtbot.waitUntil(lambda: cell_texts(page.table, 0)[1] == "canceled", timeout=10_000)
    assert not page.priority_button.isEnabled()
    assert page.view.log.rowCount() == 4  # the tasks, canceled
    with coordinator.client(token) as client:
        assert client.job(job.id).priority == 80


def test_an_unaffordable_job_is_refused_in_words_with_the_numbers(
    coordinator: RunningCoordinator, tmp_path: Path
) -> None:
    token = _account(coordinator, "pages-poor", Role.REQUESTER, grant=1.0)
    spec = _spec("dear").model_copy(update={"max_price": 100.0})
    with coordinator.client(token) as client:
        estimate = client.estimate_job(spec)
        assert estimate.balance == 1.0 and estimate.credits > 1.0
        assert estimate.refusal == (
            f"This job may cost up to {estimate.credits:g} credits; your balance is 1."
        )
        assert "tessera grant" in estimate.refusal_hint
        assert client.wallet().escrow == 0  # a dry run holds nothing


def test_nodes_page_lists_a_node_seen_on_the_lan(
    qtbot: QtBot, work: BackgroundWork, coordinator: RunningCoordinator
) -> None:
    provider = _account(coordinator, "pages-lan-owner", Role.PROVIDER)
    with coordinator.client(provider) as client:
        client.register_node(NodeCapabilities(name="farm-node", blender_versions=["5.0.1"]))
    page = NodesPage(work, FarmConnection(coordinator.url, provider), lan_interfaces=[LOOPBACK])
    qtbot.addWidget(page)
    properties = {"devices": "CPU", "threads": 4, "blender": "5.0.1", "price": "0.5"}
    try:
        with Advertisement(node_info("lan-box", LOOPBACK, properties), LOOPBACK):
            page.refresh()

            def listed() -> dict[str, str] | None:
                for row in range(page.table.rowCount()):
                    texts = dict(zip(NODE_COLUMNS, cell_texts(page.table, row), strict=True))
                    if texts["Name"] == "lan-box":
                        return texts
                return None

            qtbot.waitUntil(lambda: listed() is not None, timeout=15_000)
            lan_row = listed()
            assert lan_row is not None
            assert lan_row["Seen"] == SEEN_LAN and lan_row["Owner"] == "-"
            assert (lan_row["Devices"], lan_row["Blender"], lan_row["Price"]) == (
                "CPU (4 threads)",
                "5.0.1",
                "0.5",
            )
            names = [cell_texts(page.table, r)[0] for r in range(page.table.rowCount())]
            assert "farm-node" in names
            assert "seen on the LAN only" in page.summary.text()
    finally:
        page.shutdown()


def test_tessera_submit_estimate_prints_the_cost_and_the_refusal(
    coordinator: RunningCoordinator, demo_scene: Path
) -> None:
    token = _account(coordinator, "pages-cli", Role.REQUESTER, grant=1.0)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TESSERA_COORDINATOR=coordinator.url, TESSERA_TOKEN=token)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "submit",
            str(demo_scene),
            "--estimate",
            "--frames",
            "1-2",
            "--percentage",
            "10",
            "--samples",
            "4",
            "--max-price",
            "1000",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    match = re.fullmatch(
        r"Estimated cost: up to ([\d.]+) credits \(your balance: 1 credits\)\n", done.stdout
    )
    assert match is not None, done.stdout
    cost = match.group(1)
    assert (
        f"error: the farm would refuse this job: This job may cost up to {cost} credits; "
        "your balance is 1." in done.stderr
    )
    assert "Traceback" not in done.stderr
    with coordinator.client(token) as client:
        assert client.jobs() == [] and client.wallet().balance == 1.0


def test_the_dependency_list_from_plain_models_flags_missing_files(qtbot: QtBot) -> None:
    view = SceneSummaryView()
    qtbot.addWidget(view)
    view.set_dependencies(
        [
            Dependency(Path("/p/textures/wood.png"), "image", missing=True),
            Dependency(Path("/p/lib.blend"), "library", missing=False),
        ]
    )
    assert view.dependency_lines() == [
        "✗ missing  image: /p/textures/wood.png",
        "✓  library: /p/lib.blend",
    ]
    assert (
        "2" in view.dependencies_heading.text() and "1 missing" in view.dependencies_heading.text()
    )
    view.set_dependencies([])
    assert view.dependencies_heading.text() == "The scene uses no other files."
    assert view.dependencies.isHidden()
