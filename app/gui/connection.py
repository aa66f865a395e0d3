"""Where the app remembers its choices, the farm it talks to among them.

`AppSettings` keeps the app's own choices in an INI file under
TESSERA_HOME (so tests, which point TESSERA_HOME at a temporary folder, never read the
user's real settings): the connection or the LAN farm, the Blender builds added by hand,
the cache folder and its size limit, the theme, what the Provide page shares, the window's
geometry and the folders file dialogs last opened. Which farm wins (options, then what
the app saved, then the environment and token file) is `app.connection`'s rule, shared
with the CLI.

No widgets here, and no call to the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PySide6.QtCore import QByteArray, QSettings

from app.connection import FarmConnection
from app.node_process import DEFAULT_CACHE_GB
from common.settings import Settings

SETTINGS_FILE = "app.ini"


@dataclass(frozen=True, slots=True)
class LanFarm:
    """A farm found on the LAN by its name and join secret (zeroconf bound to `interface`,
    an address of this machine; "" for all)."""

    name: str
    secret: str
    interface: str = ""


@dataclass(frozen=True, slots=True)
class ProvideChoices:
    """What the Provide page shares and when; the node is started with these."""

    name: str = ""
    device: str = "CPU"
    price: float = 0.0
    when: str = "always"  # "always", "idle" or "hours"
    hours: tuple[int, int] = (22, 7)
    idle_minutes: float = 5.0
    #: Pause while a GPU is hotter than this (°C); 0: no cap.
    gpu_temp_max: float = 0.0
    #: A provider token for the node; "" uses the connection's token.
    token: str = ""
    extra_args: tuple[str, ...] = field(default=())


THEMES = ("system", "light", "dark")


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

    def lan_farm(self) -> LanFarm | None:
        """The LAN farm to join, when the Settings page is in LAN mode."""
        if str(self._store.value("farm/mode", "coordinator")) != "lan":
            return None
        name = str(self._store.value("lan/farm", "") or "")
        secret = str(self._store.value("lan/secret", "") or "")
        if not name or not secret:
            return None
        return LanFarm(name, secret, str(self._store.value("lan/interface", "") or ""))

    def save_lan_farm(self, farm: LanFarm | None) -> None:
        """Remember LAN mode with `farm`, or coordinator mode (None)."""
        self._store.setValue("farm/mode", "lan" if farm is not None else "coordinator")
        if farm is not None:
            self._store.setValue("lan/farm", farm.name)
            self._store.setValue("lan/secret", farm.secret)
            self._store.setValue("lan/interface", farm.interface)
        self._store.sync()

    def blender_paths(self) -> list[Path]:
        """The Blender executables (or Pythons with bpy) added on the Settings page."""
        value = self._store.value("blender/paths", [])
        items = (
            [value] if isinstance(value, str) else list(value) if isinstance(value, list) else []
        )
        return [Path(str(item)) for item in items if item]

    def blender_executables(self) -> list[Path]:
        """The added Blender executables (not the Pythons with bpy: the commands'
        --blender and TESSERA_BLENDER take executables)."""
        return [path for path in self.blender_paths() if not path.name.lower().startswith("python")]

    def save_blender_paths(self, paths: list[Path]) -> None:
        self._store.setValue("blender/paths", [str(path) for path in paths])
        self._store.sync()

    def cache_folder(self) -> str:
        """The node's data and cache folder ("" means $TESSERA_HOME/node)."""
        return str(self._store.value("cache/folder", "") or "")

    def cache_gb(self) -> float:
        return _float(self._store.value("cache/gb"), DEFAULT_CACHE_GB)

    def save_cache(self, folder: str, size_gb: float) -> None:
        self._store.setValue("cache/folder", folder)
        self._store.setValue("cache/gb", size_gb)
        self._store.sync()

    def theme(self) -> str:
        value = str(self._store.value("look/theme", "system") or "system")
        return value if value in THEMES else "system"

    def save_theme(self, theme: str) -> None:
        self._store.setValue("look/theme", theme)
        self._store.sync()

    def provide_choices(self) -> ProvideChoices:
        default = ProvideChoices()
        hours = str(self._store.value("provide/hours", "") or "")
        start, _, end = hours.partition("-")
        return ProvideChoices(
            name=str(self._store.value("provide/name", "") or ""),
            device=str(self._store.value("provide/device", default.device) or default.device),
            price=_float(self._store.value("provide/price"), default.price),
            when=str(self._store.value("provide/when", default.when) or default.when),
            hours=(int(start), int(end)) if start.isdigit() and end.isdigit() else default.hours,
            idle_minutes=_float(self._store.value("provide/idle_minutes"), default.idle_minutes),
            gpu_temp_max=_float(self._store.value("provide/gpu_temp_max"), default.gpu_temp_max),
            token=str(self._store.value("provide/token", "") or ""),
        )

    def save_provide_choices(self, choices: ProvideChoices) -> None:
        self._store.setValue("provide/name", choices.name)
        self._store.setValue("provide/device", choices.device)
        self._store.setValue("provide/price", choices.price)
        self._store.setValue("provide/when", choices.when)
        self._store.setValue("provide/hours", f"{choices.hours[0]}-{choices.hours[1]}")
        self._store.setValue("provide/idle_minutes", choices.idle_minutes)
        self._store.setValue("provide/gpu_temp_max", choices.gpu_temp_max)
        self._store.setValue("provide/token", choices.token)
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


def _float(value: object, default: float) -> float:
    try:
        return float(str(value)) if value not in (None, "") else default
    except ValueError:
        return default
