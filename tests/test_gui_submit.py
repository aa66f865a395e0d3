"""The desktop app's Submit page and live tile grid: the widgets from plain models, and a
real submit of the demo scene to a coordinator on 127.0.0.1 whose tiles a minimal node
renders while the Jobs page watches them arrive."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import QBuffer, QByteArray, QIODevice, QMimeData, QPointF, Qt, QUrl
from PySide6.QtGui import QColor, QDropEvent, QImage
from pytestqt.qtbot import QtBot

from app.connection import FarmConnection
from app.gui.blender_access import BlenderAccess
from app.gui.job_view import JobView
from app.gui.main_window import MainWindow
from app.gui.submit_page import TILES
from app.gui.tile_grid import TileGrid, TileState
from protocol.models import (
    Job,
    JobCost,
    JobProgress,
    JobStatus,
    Role,
    Task,
    TaskKind,
    TaskStatus,
)
from protocol.models import (
    TileGrid as TileGridSpec,
)
from renderers.worker import RenderWorker
from tests.farm_tools import NodeThread, RunningCoordinator, plain_spec, start_coordinator

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


# --- plain models -----------------------------------------------------------------------


def _task(index: int, status: TaskStatus, frame: int = 1, **fields: Any) -> Task:
    return Task(
        id=f"t{frame}-{index}-{fields.get('kind', TaskKind.RENDER)}",
        job_id="job-1",
        kind=fields.pop("kind", TaskKind.RENDER),
        frame=frame,
        tile_index=index,
        status=status,
        attempts=1,
        **fields,
    )


def _png(colour: str) -> bytes:
    image = QImage(8, 8, QImage.Format.Format_RGB32)
    image.fill(QColor(colour))
    data = QByteArray()
    buffer = QBuffer(data)
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    image.save(buffer, "PNG")  # type: ignore[call-overload]  # (the stubs want bytes; PySide wants str)
    return bytes(data.data())


def _job(frames_done: list[int]) -> Job:
    spec = plain_spec(size=(160, 90), frames=(1, 3), tiles=TileGridSpec(columns=3, rows=2))
    return Job(
        id="job-1",
        name="shot",
        owner="alice",
        status=JobStatus.ACTIVE,
        priority=50,
        spec=spec,
        progress=JobProgress(tasks_total=18, tasks_done=7, frames_total=3, frames_done=1),
        created_at=NOW,
        updated_at=NOW,
        frames_done=frames_done,
    )


def test_tile_grid_from_plain_models(qtbot: QtBot) -> None:
    grid = TileGrid()
    qtbot.addWidget(grid)
    grid.resize(400, 240)
    tasks = [
        _task(0, TaskStatus.COMPLETED),
        _task(1, TaskStatus.ACTIVE, node="node-abc"),
        _task(2, TaskStatus.CHECKING),
        _task(3, TaskStatus.REJECTED),
        # A backup render that won beats its canceled original.
        _task(4, TaskStatus.CANCELED),
        _task(4, TaskStatus.COMPLETED, kind=TaskKind.BACKUP),
        # Not tiles of this grid: a verify window and another frame's tile.
        _task(0, TaskStatus.ACTIVE, kind=TaskKind.VERIFY),
    ]
    previews: dict[str, QImage | bytes] = {
        "t1-0-render": _png("#ff0000"),
        "t1-4-backup": QImage.fromData(_png("#0000ff")),
    }
    # 6 tiles, nothing for the last: it is still queued.
    grid.set_tiles(3, 2, tasks, previews, frame_size=(160, 90), node_names={"node-abc": "r-01"})
    tiles = grid.tiles()
    assert [tile.state for tile in tiles] == [
        TileState.ACCEPTED,
        TileState.RENDERING,
        TileState.CHECKING,
        TileState.REJECTED,
        TileState.ACCEPTED,
        TileState.QUEUED,
    ]
    assert tiles[1].label == "rendering on r-01"
    assert [tile.preview is not None for tile in tiles] == [True, False, False, False, True, False]
    assert grid.counts()[TileState.ACCEPTED] == 2
    # Drawn at the frame's aspect ratio, the accepted tiles show their previews.
    image = grid.grab().toImage()
    first, fifth = grid.tile_rect(0), grid.tile_rect(4)
    assert abs(first.width() / first.height() - 16 / 9 * 2 / 3) < 0.1
    assert image.pixelColor(first.center()).name() == "#ff0000"
    assert image.pixelColor(fifth.center()).name() == "#0000ff"
    tile = grid.tile_at(grid.tile_rect(3).center())
    assert tile is not None and tile.index == 3


def test_job_view_from_plain_models(qtbot: QtBot) -> None:
    view = JobView()
    qtbot.addWidget(view)
    tasks = [_task(i, TaskStatus.COMPLETED) for i in range(6)] + [
        _task(0, TaskStatus.ACTIVE, frame=2, node="n1")
    ]
    job = _job(frames_done=[1]).model_copy(
        update={
            "cost": JobCost(
                credits_per_frame=1.5, success_rate=0.8, wasted_seconds=12.5, estimate=2, final=1.5
            ),
            "measured_scene_cost": 2.5,
        }
    )
    view.set_job(job, tasks, {})
    cost = view.cost.text()
    assert "1.5 credits per successful frame" in cost and "(estimate 2)" in cost, cost
    assert "80% of delivered results accepted" in cost and "12.5 s" in cost, cost
    assert "measured scene cost 2.5 (declared 1)" in cost, cost
    assert view.strip.frame_texts() == ["✓ 1", "2", "3"]
    assert view.frame == 1
    assert view.grid.grid == (3, 2)
    assert view.grid.counts()[TileState.ACCEPTED] == 6
    assert "6 of 6" in view.tile_summary.text()
    with qtbot.waitSignal(view.frame_changed) as signal:
        view.strip.setCurrentRow(1)
    assert signal.args == [2]
    assert [tile.state for tile in view.grid.tiles()][:2] == [
        TileState.RENDERING,
        TileState.QUEUED,
    ]
    view.set_job(None)
    assert view.grid.tiles() == [] and view.cost.text() == ""


# --- against a real coordinator ------------------------------------------------------------


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCoordinator]:
    running = start_coordinator(tmp_path_factory.mktemp("coordinator"))
    yield running
    running.stop()


def _account(coordinator: RunningCoordinator, name: str, role: Role) -> str:
    with coordinator.client(coordinator.admin_token) as admin:
        return admin.create_account(name, role).token


@pytest.fixture()
def open_window(qtbot: QtBot, worker: RenderWorker) -> Iterator[Callable[..., MainWindow]]:
    """Main windows that inspect with the session's warm worker; closed at the end."""
    windows: list[MainWindow] = []

    def make(connection: FarmConnection) -> MainWindow:
        window = MainWindow(connection, refresh_ms=500, blender=BlenderAccess(worker=worker))
        windows.append(window)
        return window

    yield make
    for window in windows:
        window.close()


def test_submit_the_demo_scene_and_watch_its_tiles_fill_in(
    qtbot: QtBot,
    open_window: Callable[..., MainWindow],
    coordinator: RunningCoordinator,
    worker: RenderWorker,
    demo_scene: Path,
    tmp_path: Path,
) -> None:
    token = _account(coordinator, "artist", Role.REQUESTER)
    provider = _account(coordinator, "renderer", Role.PROVIDER)
    window = open_window(FarmConnection(coordinator.url, token))
    window.show_page("submit")
    page = window.submit
    with qtbot.waitSignal(page.measured, timeout=60_000):
        page.load_scene(demo_scene)
    summary = page.summary.texts()
    assert summary["Engine"] == "Cycles" and summary["Camera"] != "none"
    assert page.submit_button.isEnabled()

    page.frames.setText("1")
    page.split.setCurrentText(TILES)
    page.columns.setValue(2)
    page.rows.setValue(2)
    page.samples.setValue(4)
    page.percentage.setValue(10)
    progress: list[str] = []
    page.progress.valueChanged.connect(lambda _value: progress.append(page.status.text()))
    with qtbot.waitSignal(page.submitted, timeout=60_000) as submitted:
        page.submit_button.click()
        assert page.busy and not page.submit_button.isEnabled()
    job: Job = submitted.args[0]
    assert job.spec.tiles.columns == 2 and job.spec.samples == 4
    assert any(text.startswith("Packing") for text in progress)
    assert any(text.startswith("Uploading") for text in progress)

    # The job opens on the Jobs page, selected, its four tiles queued.
    assert window.current_page() == "jobs"
    jobs = window.jobs
    qtbot.waitUntil(lambda: jobs.table.selected_job_id() == job.id, timeout=10_000)
    qtbot.waitUntil(lambda: len(jobs.view.grid.tiles()) == 4, timeout=10_000)
    assert jobs.view.grid.counts()[TileState.QUEUED] == 4

    node = NodeThread(
        coordinator.client(provider),
        worker=worker,
        scene=demo_scene,
        scratch=tmp_path,
        until_idle=2.0,
    )
    try:

        def filled() -> bool:
            tiles = jobs.view.grid.tiles()
            return len(tiles) == 4 and all(t.preview is not None for t in tiles)

        qtbot.waitUntil(filled, timeout=60_000)
        assert jobs.view.grid.counts()[TileState.ACCEPTED] == 4
        qtbot.waitUntil(lambda: jobs.view.strip.frame_texts() == ["✓ 1"], timeout=60_000)
    finally:
        assert node.join() >= 4
    assert window.banner.isHidden()


def test_a_scene_without_a_camera_is_explained_in_the_banner(
    qtbot: QtBot,
    open_window: Callable[..., MainWindow],
    coordinator: RunningCoordinator,
    bat_scenes: Path,
) -> None:
    window = open_window(
        FarmConnection(coordinator.url, _account(coordinator, "b", Role.REQUESTER))
    )
    window.show_page("submit")
    page = window.submit
    # Dropped on the page, as from a file manager.
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(bat_scenes / "basic_file.blend"))])
    drop = QDropEvent(
        QPointF(10, 10),
        Qt.DropAction.CopyAction,
        mime,
        Qt.MouseButton.LeftButton,
        Qt.KeyboardModifier.NoModifier,
    )
    page.dropEvent(drop)
    assert page.busy
    qtbot.waitUntil(lambda: not window.banner.isHidden(), timeout=60_000)
    assert "no active camera" in window.banner.message.text()
    assert "Ctrl+Numpad0" in window.banner.hint.text()
    assert "Traceback" not in window.banner.message.text()
    assert not page.busy and not page.submit_button.isEnabled()
    assert page.status.text() == "basic_file.blend cannot be rendered."
