"""The desktop app's Settings page (LAN mode, Blender builds, cache, theme), its shortcuts,
and Start local farm: LAN mode joins a real coordinator advertised on 127.0.0.1 only, a
Blender path is identified by running it, and the local farm is a real coordinator and
node whose node the Nodes page lists."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import Qt
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import QApplication
from pytestqt.qtbot import QtBot

from app.connection import FarmConnection
from app.gui.connection import AppSettings, LanFarm
from app.gui.local_farm_action import LocalFarmInfo
from app.gui.main_window import MainWindow
from app.gui.tables import cell_texts
from app.gui.theme import apply_theme, is_dark
from app.node_process import join_as_provider
from protocol.discovery import find_coordinator
from protocol.models import Role
from tests.farm_tools import start_coordinator

LOOPBACK = "127.0.0.1"
DEAD_URL = "http://127.0.0.1:9"


@pytest.fixture()
def open_window(qtbot: QtBot, isolated_settings: Path) -> Iterator[Callable[..., MainWindow]]:
    """Main windows with the test's own settings file, closed (and their work, nodes and
    farms stopped) at the end of the test."""
    windows: list[MainWindow] = []

    def make(connection: FarmConnection, **options: Any) -> MainWindow:
        options.setdefault("app_settings", AppSettings(isolated_settings / "app.ini"))
        options.setdefault("refresh_ms", 60_000)
        window = MainWindow(connection, node_args=["--no-benchmark"], **options)
        qtbot.addWidget(window)
        windows.append(window)
        return window

    yield make
    for window in windows:
        window.close()


# --- LAN mode -----------------------------------------------------------------------------


def test_lan_mode_validates_saves_and_joins_the_farm(
    qtbot: QtBot,
    open_window: Callable[..., MainWindow],
    isolated_settings: Path,
    tmp_path: Path,
) -> None:
    farm = f"studio-{uuid.uuid4().hex[:8]}"  # no other farm on the machine can answer
    lan = start_coordinator(
        tmp_path / "lan", "--lan", "--farm", farm, "--secret", "s3cret", "--interface", LOOPBACK
    )
    try:
        window = open_window(FarmConnection(DEAD_URL, None))
        window.banner.hide()
        page = window.settings
        window.show_page("settings")
        page.lan_mode.setChecked(True)
        assert not page.url.isEnabled() and page.lan_farm.isEnabled()

        for name, secret, interface, message in (
            ("", "s3cret", "", "The farm has no name."),
            ("bad/name", "s3cret", "", "'bad/name' is not a farm name."),
            (farm, "", "", "The join secret is empty."),
            (farm, "s3cret", "localhost", "'localhost' is not an address of this machine."),
        ):
            page.lan_farm.setText(name)
            page.lan_secret.setText(secret)
            page.lan_interface.setText(interface)
            page.save.click()
            assert window.banner.message.text() == message
        assert AppSettings(isolated_settings / "app.ini").lan_farm() is None

        page.lan_interface.setText(LOOPBACK)
        page.lan_secret.setText("s3cret")
        window.banner.hide()
        page.save.click()
        assert AppSettings(isolated_settings / "app.ini").lan_farm() == LanFarm(
            farm, "s3cret", LOOPBACK
        )
        qtbot.waitUntil(lambda: window.connection().url == lan.url, timeout=20_000)
        token = window.connection().token
        assert token is not None and window.banner.isHidden()
        with lan.client(token) as client:
            me = client.me()
        # The app submits and follows jobs: it joins as a requester (nodes join as providers).
        assert me.role is Role.REQUESTER and me.account.startswith("lan-user-")
        # ...and the Provide page's node trades the same secret for a provider token.
        node = join_as_provider(lan.url, "s3cret", "studio-box")
        assert node.token is not None
        with lan.client(node.token) as client:
            assert client.me().account == "lan-studio-box"
        saved = AppSettings(isolated_settings / "app.ini").connection()
        assert saved == window.connection()  # the next start connects without a search
        assert farm in window.farm_status.text()
    finally:
        lan.stop()


# --- Blender builds -----------------------------------------------------------------------


def test_an_added_blender_is_checked_remembered_and_listed(
    qtbot: QtBot, open_window: Callable[..., MainWindow], isolated_settings: Path, tmp_path: Path
) -> None:
    window = open_window(FarmConnection(DEAD_URL, None))
    page = window.settings
    with qtbot.waitSignal(page.builds_listed, timeout=60_000):
        window.show_page("settings")
    window.banner.hide()

    not_blender = tmp_path / "blender"
    not_blender.write_text("#!/bin/sh\necho 'Python 3.11'\n")
    not_blender.chmod(0o755)
    with qtbot.waitSignal(window.work.failed, timeout=30_000):
        page.add_blender(not_blender)
    assert window.banner.message.text().startswith(f"{not_blender} is not Blender: ")
    assert "Traceback" not in window.banner.message.text()
    assert "blender executable" in window.banner.hint.text()
    with qtbot.waitSignal(window.work.failed, timeout=30_000):
        page.add_blender(tmp_path / "missing" / "blender")
    assert window.banner.message.text() == f"There is no file at {tmp_path}/missing/blender."
    store = AppSettings(isolated_settings / "app.ini")
    assert store.blender_paths() == []

    # This venv's Python has Blender's bpy module: a real build, found by running it.
    python = Path(sys.executable)
    with qtbot.waitSignal(page.builds_listed, timeout=60_000):
        page.add_blender(python)
    assert store.blender_paths() == [python]
    labels = [page.builds.item(row).text() for row in range(page.builds.count())]
    assert any(
        label.startswith("Blender 5.0.1") and label.endswith("— added") for label in labels
    ), labels


def test_cache_folder_and_theme_are_remembered(
    qtbot: QtBot, open_window: Callable[..., MainWindow], isolated_settings: Path
) -> None:
    app = QApplication.instance()
    assert isinstance(app, QApplication)
    system = QPalette(app.palette())
    window = open_window(FarmConnection(DEAD_URL, None))
    page = window.settings
    page.cache_folder.setText(str(isolated_settings / "cache"))
    page.cache_folder.editingFinished.emit()
    page.cache_gb.setValue(12)
    store = AppSettings(isolated_settings / "app.ini")
    assert store.cache_folder() == str(isolated_settings / "cache")
    assert store.cache_gb() == 12.0
    try:
        page.theme.setCurrentIndex(page.theme.findData("dark"))
        assert store.theme() == "dark" and is_dark(app.palette())
        page.theme.setCurrentIndex(page.theme.findData("light"))
        assert not is_dark(app.palette())
        page.theme.setCurrentIndex(page.theme.findData("system"))
        assert app.palette() == system
    finally:
        apply_theme(app, "system")


# --- shortcuts ----------------------------------------------------------------------------


def test_keyboard_shortcuts_switch_pages(
    qtbot: QtBot, open_window: Callable[..., MainWindow]
) -> None:
    window = open_window(FarmConnection(DEAD_URL, None))
    with qtbot.waitActive(window):
        window.show()
        window.activateWindow()
    shortcuts = {
        action.text().replace("&", ""): action.shortcut().toString() for action in window.actions()
    }
    assert shortcuts["Start local farm"] == "Ctrl+L"
    assert shortcuts["Refresh"] == "F5"
    assert shortcuts["Quit"] == "Ctrl+Q"
    assert shortcuts["Open scene…"] == "Ctrl+O"
    for key, page in ((Qt.Key.Key_5, "provide"), (Qt.Key.Key_6, "settings")):
        qtbot.keyClick(window.sidebar, key, Qt.KeyboardModifier.ControlModifier)
        assert window.current_page() == page
    assert not window.windowIcon().isNull()


# --- Start local farm ---------------------------------------------------------------------


def test_local_farm_join_instructions(tmp_path: Path) -> None:
    alone = LocalFarmInfo(
        FarmConnection("http://127.0.0.1:5000", "t"), tmp_path, ("local-1",), None
    )
    assert alone.join_instructions().startswith(
        "Local farm at http://127.0.0.1:5000 (this machine only). To let other machines join"
    )
    shared = LocalFarmInfo(alone.connection, tmp_path, ("local-1",), LanFarm("studio", "s3cret"))
    text = shared.join_instructions()
    assert "tessera node --lan --farm studio --secret" in text and "s3cret" not in text


def test_start_local_farm_switches_to_it_and_stops_on_close(
    qtbot: QtBot, open_window: Callable[..., MainWindow], isolated_settings: Path
) -> None:
    # A LAN farm named in Settings is advertised, with zeroconf bound to 127.0.0.1 only.
    farm = f"home-{uuid.uuid4().hex[:8]}"
    store = AppSettings(isolated_settings / "app.ini")
    store.save_lan_farm(LanFarm(farm, "s3cret", LOOPBACK))
    window = open_window(FarmConnection(DEAD_URL, None), app_settings=store)
    window.banner.hide()
    with qtbot.waitSignal(window.local_farm.started, timeout=90_000) as started:
        window.local_farm_action.trigger()
    info = started.args[0]
    assert window.connection() == info.connection
    assert info.connection.url.startswith("http://127.0.0.1:")
    assert window.local_farm_action.text().replace("&", "") == "Stop local farm"
    assert f"--farm {farm} --secret" in window.farm_status.text()
    assert window.windowTitle() == f"Tessera — local farm at {info.connection.url}"
    assert window.current_page() == "nodes"
    qtbot.waitUntil(lambda: window.nodes.table.rowCount() > 0, timeout=20_000)
    assert cell_texts(window.nodes.table, 0)[:2] == ["local-1", "local-1"]
    found = find_coordinator(farm, "s3cret", interface=LOOPBACK, timeout=10)
    assert found is not None and found.url == info.connection.url
    # Not saved: the next start must not point at a farm that is gone.
    assert store.connection() is None
    window.close()
    assert not info.folder.exists()
