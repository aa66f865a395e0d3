"""Start local farm: a coordinator and one node on this machine, so one person can render
at once, and other machines on the LAN can join.

`LocalFarmControl` wraps `app.local_farm.LocalFarm` (the same farm `tessera render`
starts) for the app: `start()` runs its start-up (tens of seconds) through
`BackgroundWork` and emits `started(LocalFarmInfo)` with the connection to switch to;
`stop()` stops it in the background; `close()` is what the main window runs when it
closes. When the Settings page names a LAN farm (name and secret), the coordinator listens
on the address chosen there (else on every address) and advertises that farm with
zeroconf bound to it, so nodes elsewhere join with
`tessera node --lan --farm NAME --secret S`; without one it listens on 127.0.0.1 only and
advertises nothing. No widgets here.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QObject, Signal

from app.connection import FarmConnection
from app.gui.background import BackgroundWork, ErrorReport
from app.gui.connection import LanFarm
from app.local_farm import LOCAL_CREDITS, LocalFarm, LocalFarmError

FOLDER = "local-farms"


@dataclass(frozen=True, slots=True)
class LocalFarmInfo:
    """A running local farm: how the app talks to it and how others join it."""

    connection: FarmConnection
    folder: Path
    node_names: tuple[str, ...]
    lan: LanFarm | None

    def join_instructions(self) -> str:
        """One sentence for the user: who can use the farm and how another machine joins."""
        if self.lan is None:
            return (
                f"Local farm at {self.connection.url} (this machine only). To let other "
                "machines join, set a LAN farm name and secret on the Settings page and "
                "start it again."
            )
        return (
            f"Local farm '{self.lan.name}' at {self.connection.url}. Other machines join "
            f"with: tessera node --lan --farm {self.lan.name} --secret <the farm's secret>"
        )


def _lan_arguments(lan: LanFarm | None) -> list[str]:
    if lan is None:
        return []
    # Listen where the LAN can reach it: on the address chosen on the Settings page, else
    # on every address.
    host = lan.interface or "0.0.0.0"
    args = ["--host", host, "--lan", "--farm", lan.name, "--secret", lan.secret]
    return args + (["--interface", lan.interface] if lan.interface else [])


class LocalFarmControl(QObject):
    """Starts and stops one local farm at a time; `running` says whether one is up."""

    started = Signal(object)  # LocalFarmInfo
    stopped = Signal()
    failed = Signal(object)  # ErrorReport (also sent to the work's one sink)

    def __init__(
        self,
        work: BackgroundWork,
        home: Path,
        node_args: Sequence[str] = (),
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self._work = work
        self._home = home
        self._node_args = list(node_args)
        self._farm: LocalFarm | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._busy = False
        self.info: LocalFarmInfo | None = None

    @property
    def running(self) -> bool:
        return self.info is not None

    @property
    def busy(self) -> bool:
        """Starting or stopping."""
        return self._busy

    def start(self, lan: LanFarm | None = None) -> None:
        """Start a farm in the background unless one runs or is starting."""
        if self._busy or self.info is not None:
            return
        self._busy = True
        self._work.submit(lambda: self._start_farm(lan), self._on_started, self._on_failed)

    def stop(self) -> None:
        if self._busy or self.info is None:
            return
        self._busy = True
        self._work.submit(self.stop_work, self._on_stopped, self._on_failed)

    def _start_farm(self, lan: LanFarm | None) -> LocalFarmInfo:
        parent = self._home / FOLDER
        parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="farm-", dir=parent))
        farm = LocalFarm(
            folder,
            nodes=1,
            price=0.0,
            credits=LOCAL_CREDITS,
            coordinator_args=_lan_arguments(lan),
            node_args=self._node_args,
        )
        try:
            farm.start()  # stops what it started when it fails
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        with self._lock:
            closed = self._closed
            if not closed:
                self._farm = farm
        if closed:  # the window closed while the farm started
            farm.stop()
            shutil.rmtree(folder, ignore_errors=True)
            raise LocalFarmError("The app closed while the local farm started.")
        url = farm.url.replace("://0.0.0.0:", "://127.0.0.1:")
        return LocalFarmInfo(
            FarmConnection(url, farm.requester_token), folder, tuple(farm.node_names), lan
        )

    def close(self) -> None:
        """Stop the farm for good (a start still on its way stops its farm itself); blocks:
        background only."""
        with self._lock:
            self._closed = True
        self.stop_work()

    def stop_work(self) -> None:
        """Stop the farm and delete its folder (blocks for seconds: background only)."""
        with self._lock:
            farm, self._farm = self._farm, None
        if farm is not None:
            farm.stop()
            shutil.rmtree(farm.folder, ignore_errors=True)

    def _on_started(self, info: LocalFarmInfo) -> None:
        self._busy = False
        self.info = info
        self.started.emit(info)

    def _on_stopped(self, _result: object) -> None:
        self._busy = False
        self.info = None
        self.stopped.emit()

    def _on_failed(self, report: ErrorReport) -> None:
        self._busy = False
        with self._lock:
            if self._farm is None:
                self.info = None
        self.failed.emit(report)
        self._work.failed.emit(report)
