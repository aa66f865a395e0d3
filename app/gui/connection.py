"""Which farm the app talks to, and where that choice is remembered.

`FarmConnection` is a coordinator URL and an access token; `client()` opens a fresh
`TesseraClient` for one piece of background work (a requests session is not shared
between threads). `AppSettings` keeps the app's own choices in an INI file under
TESSERA_HOME (so tests, which point TESSERA_HOME at a temporary folder, never read the
user's real settings). `resolve_connection` applies the order of precedence: command-line
options, then what the app saved, then the environment and token file the CLI uses.

No widgets here, and no call to the network: opening a client does not connect.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QByteArray, QSettings

from app.farm_commands import CLI_RETRIES, access_token, coordinator_url
from common.errors import TesseraError
from common.settings import Settings
from protocol.client import TesseraClient

SETTINGS_FILE = "app.ini"
#: A page refresh should fail fast and say so, not hang on a dead coordinator.
APP_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class FarmConnection:
    """A coordinator and the token to use with it (None: not known yet)."""

    url: str
    token: str | None

    def client(self) -> TesseraClient:
        """A new client; call from a worker thread and close it after use."""
        return TesseraClient(self.url, self.token, timeout=APP_TIMEOUT, retries=CLI_RETRIES)


class AppSettings:
    """The app's remembered choices, in `$TESSERA_HOME/app.ini`."""

    def __init__(self, path: Path) -> None:
        self._store = QSettings(str(path), QSettings.Format.IniFormat)

    @classmethod
    def for_home(cls, settings: Settings) -> AppSettings:
        return cls(settings.home / SETTINGS_FILE)

    def connection(self) -> FarmConnection | None:
        url = self._store.value("farm/coordinator", "")
        if not url:
            return None
        token = self._store.value("farm/token", "")
        return FarmConnection(str(url), str(token) or None)

    def save_connection(self, connection: FarmConnection) -> None:
        self._store.setValue("farm/coordinator", connection.url)
        self._store.setValue("farm/token", connection.token or "")
        self._store.sync()

    def last_folder(self, kind: str) -> str:
        """The folder a file dialog of `kind` (e.g. "scenes") last opened, or ""."""
        return str(self._store.value(f"folders/{kind}", "") or "")

    def save_last_folder(self, kind: str, folder: Path) -> None:
        self._store.setValue(f"folders/{kind}", str(folder))
        self._store.sync()

    def window_geometry(self) -> QByteArray | None:
        value = self._store.value("window/geometry")
        return value if isinstance(value, QByteArray) else None

    def save_window_geometry(self, geometry: QByteArray) -> None:
        self._store.setValue("window/geometry", geometry)
        self._store.sync()


def resolve_connection(
    args: argparse.Namespace, settings: Settings, saved: FarmConnection | None
) -> FarmConnection:
    """--coordinator/--token, else the app's saved choice, else $TESSERA_COORDINATOR /
    $TESSERA_TOKEN / $TESSERA_HOME/token as for every other command."""
    if args.coordinator is None and saved is not None:
        url = saved.url
        token = args.token or saved.token
    else:
        url = coordinator_url(args)
        token = args.token or (saved.token if saved and saved.url == url else None)
    if token is None:
        try:
            token = access_token(argparse.Namespace(token=None), settings, url)
        except TesseraError:
            token = None  # the Settings page asks for one; the app still opens
    return FarmConnection(url.rstrip("/"), token)
