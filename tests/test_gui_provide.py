"""The desktop app's Provide page: its views from plain models (a GPU's live figures, or
the CPU-only note), the node's command line, and the start/stop switch running a real
`tessera node` against a real coordinator on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PySide6.QtGui import QImage
from pytestqt.qtbot import QtBot

from app.connection import FarmConnection
from app.gui.background import BackgroundWork, ErrorReport
from app.gui.connection import AppSettings
from app.gui.launch import take_screenshot
from app.gui.provide_page import NO_GPU_TEXT, EarningsView, MachineView, ProvidePage
from app.gui.tables import cell_texts
from app.node_process import MachineReport, NodeLaunch, ProviderStats
from protocol.accounts import (
    Wallet,
)
from protocol.models import (
    NodeCapabilities,
    NodeInfo,
    Role,
)
from renderers.devices import NvidiaGpu
from tests.farm_tools import RunningCoordinator, start_coordinator

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def _gpu(load: int | None = 87, temperature: int | None = 71) -> NvidiaGpu:
    return NvidiaGpu(
        index=0,
        name="NVIDIA GeForce RTX 4090",
        uuid="GPU-1234",
        memory_total_mib=24564,
        memory_used_mib=6144,
        utilization_percent=load,
        temperature_c=temperature,
        power_w=310.5,
        driver_version="550.54",
        cuda_driver_version="12.4",
        compute_capability="8.9",
    )


# --- plain models -----------------------------------------------------------------------


def test_machine_view_shows_a_gpus_load_temperature_and_vram(qtbot: QtBot) -> None:
    view = MachineView()
    qtbot.addWidget(view)
    machine = MachineReport("AMD Ryzen 9 7950X", 32, 65536, (_gpu(),))
    view.set_machine(machine)
    assert view.summary.text() == "AMD Ryzen 9 7950X, 32 threads, 64.0 GiB of memory"
    assert view.no_gpu.isHidden() and not view.gpus.isHidden()
    assert cell_texts(view.gpus, 0) == [
        "NVIDIA GeForce RTX 4090",
        "87 %",
        "71 °C",
        "6.0 GiB of 24.0 GiB",
    ]
    assert machine.devices == ["CPU", "OPTIX", "CUDA"]
    view.set_gpus([_gpu(load=None, temperature=None)])  # a card that does not say
    assert cell_texts(view.gpus, 0)[1:3] == ["-", "-"]


def test_without_a_gpu_the_page_says_the_node_renders_on_the_cpu(qtbot: QtBot) -> None:
    work = BackgroundWork()
    page = ProvidePage(work, FarmConnection("http://127.0.0.1:9", None))
    qtbot.addWidget(page)
    try:
        page.set_machine(MachineReport("Intel Xeon", 8, 16384))
        assert not page.machine.no_gpu.isHidden()
        assert page.machine.no_gpu.text() == NO_GPU_TEXT
        assert page.machine.gpus.isHidden()
        assert [page.device.itemText(i) for i in range(page.device.count())] == ["CPU"]
    finally:
        work.shutdown()


def test_earnings_view_from_plain_models(qtbot: QtBot) -> None:
    view = EarningsView()
    qtbot.addWidget(view)
    view.set_stats(ProviderStats(None, None))
    assert view.status.text() == "not registered yet"
    node = NodeInfo(
        id="n1",
        owner="me",
        capabilities=NodeCapabilities(name="box"),
        status="busy",
        current_task="t-7",
        last_seen=NOW,
        tasks_completed=12,
        tasks_failed=1,
        earned=34.5,
    )
    view.set_stats(ProviderStats(node, Wallet(account="me", balance=30.0, escrow=0.0)))
    assert view.status.text() == "busy (rendering t-7)"
    assert view.tasks.text() == "12, 1 failed"
    assert view.earned.text() == "34.50"
    assert view.balance.text() == "30.00 credits"


def test_the_node_command_line_carries_the_choices_but_not_the_token(tmp_path: Path) -> None:
    launch = NodeLaunch(
        coordinator="http://127.0.0.1:8400",
        token="tsr_secret",
        name="box",
        data_dir=tmp_path / "node",
        device="OPTIX",
        price=1.5,
        cache_gb=20,
        when="hours",
        hours=(22, 7),
        gpu_temp_max=83,
    )
    argv = launch.argv()
    assert argv[3:] == [
        "node",
        "--coordinator",
        "http://127.0.0.1:8400",
        "--name",
        "box",
        "--device",
        "OPTIX",
        "--price",
        "1.5",
        "--data",
        str(tmp_path / "node"),
        "--cache-gb",
        "20",
        "--when",
        "hours",
        "--hours",
        "22-7",
        "--gpu-temp-max",
        "83",
    ]
    assert "tsr_secret" not in " ".join(argv)
    assert launch.env()["TESSERA_TOKEN"] == "tsr_secret"
    idle = NodeLaunch("http://c", "t", "box", tmp_path, when="idle", idle_after=600).argv()
    assert idle[-4:] == ["--when", "idle", "--idle-after", "600"]


# --- against a real coordinator -----------------------------------------------------------


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCoordinator]:
    running = start_coordinator(tmp_path_factory.mktemp("coordinator"))
    yield running
    running.stop()


def _token(coordinator: RunningCoordinator, name: str, role: Role) -> str:
    with coordinator.client(coordinator.admin_token) as admin:
        return admin.create_account(name, role).token


@pytest.fixture()
def provide_page(
    qtbot: QtBot, isolated_settings: Path
) -> Iterator[tuple[ProvidePage, BackgroundWork, list[ErrorReport]]]:
    work = BackgroundWork()
    errors: list[ErrorReport] = []
    work.failed.connect(errors.append)
    store = AppSettings(isolated_settings / "app.ini")
    store.save_cache(str(isolated_settings / "node-data"), 2.0)
    page = ProvidePage(
        work,
        FarmConnection("http://127.0.0.1:9", None),
        store,
        isolated_settings,
        node_args=["--no-benchmark"],
    )
    qtbot.addWidget(page)
    yield page, work, errors
    node = page.stop_work()
    work.shutdown(last=[node.close])


def _registered(coordinator: RunningCoordinator, name: str) -> bool:
    with coordinator.client(coordinator.admin_token) as admin:
        return any(node.capabilities.name == name for node in admin.nodes())


def test_the_switch_starts_a_node_that_registers_and_stops_it(
    qtbot: QtBot,
    coordinator: RunningCoordinator,
    provide_page: tuple[ProvidePage, BackgroundWork, list[ErrorReport]],
    isolated_settings: Path,
) -> None:
    page, _work, errors = provide_page
    token = _token(coordinator, "box-owner", Role.PROVIDER)
    page.set_connection(FarmConnection(coordinator.url, token))
    page.name.setText("gui-box")
    page.price.setValue(2.5)
    with qtbot.waitSignal(page.sharing_changed, timeout=20_000) as started:
        page.switch.click()
    assert started.args == [True], errors
    assert page.switch.isChecked() and page.switch.text() == "Stop sharing"
    assert not page.name.isEnabled() and not page.price.isEnabled()  # fixed while it runs
    qtbot.waitUntil(lambda: _registered(coordinator, "gui-box"), timeout=60_000)
    # The page's own view of the farm: the node's row and the provider's wallet.
    qtbot.waitUntil(lambda: page.earnings.status.text() == "idle", timeout=20_000)
    assert page.earnings.tasks.text() == "0"
    assert page.earnings.balance.text() == "0.00 credits"
    assert (isolated_settings / "node-data" / "node.log").is_file()
    with coordinator.client(coordinator.admin_token) as admin:
        row = next(n for n in admin.nodes() if n.capabilities.name == "gui-box")
    assert row.owner == "box-owner" and row.capabilities.price == 2.5

    with qtbot.waitSignal(page.sharing_changed, timeout=60_000) as stopped:
        page.switch.click()
    assert stopped.args == [False]
    assert not page.node.running() and page.switch.text() == "Start sharing"
    assert page.name.isEnabled()
    assert AppSettings(isolated_settings / "app.ini").provide_choices().name == "gui-box"
    assert errors == []


def test_a_requester_token_is_refused_with_what_to_do(
    qtbot: QtBot,
    coordinator: RunningCoordinator,
    provide_page: tuple[ProvidePage, BackgroundWork, list[ErrorReport]],
) -> None:
    page, work, errors = provide_page
    token = _token(coordinator, "artist", Role.REQUESTER)
    page.set_connection(FarmConnection(coordinator.url, token))
    with qtbot.waitSignal(work.failed, timeout=10_000):
        page.switch.click()
    assert errors[0].message == (
        "Your token belongs to the requester account 'artist': a node needs a provider token."
    )
    assert "Provider token" in errors[0].hint and "LAN" in errors[0].hint
    assert not page.switch.isChecked() and not page.node.running()


def test_screenshots_of_the_provide_and_settings_pages(
    qtbot: QtBot, coordinator: RunningCoordinator, tmp_path: Path
) -> None:
    token = _token(coordinator, "shot-provider", Role.PROVIDER)
    for page in ("provide", "settings"):
        target = tmp_path / f"{page}.png"
        take_screenshot(FarmConnection(coordinator.url, token), page, target)
        image = QImage(str(target))
        assert image.width() >= 800 and image.height() >= 500
