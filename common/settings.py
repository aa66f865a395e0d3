"""Typed settings, loaded once at start-up and passed in; never read at import time.

Values come from the environment (prefix `TESSERA_`, e.g. `TESSERA_BLENDER=/opt/blender/
blender`) and then command-line options override them. This is the one reader of
TESSERA_COORDINATOR and TESSERA_TOKEN (and the token file); `app.connection` applies
them for the CLI and the desktop app alike. Tests isolate themselves by
pointing `TESSERA_HOME` at a temporary folder (see tests/conftest.py).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.errors import UsageError

#: Where clients and nodes look for the coordinator when nothing else says.
DEFAULT_COORDINATOR = "http://127.0.0.1:8400"
#: The file in TESSERA_HOME that holds the saved access token (`tessera join` writes it).
TOKEN_FILE = "token"


def _default_home() -> Path:
    return Path.home() / ".local" / "share" / "tessera"


class Settings(BaseSettings):
    """Everything configurable about Tessera on this machine."""

    model_config = SettingsConfigDict(env_prefix="TESSERA_", extra="ignore")

    home: Path = Field(
        default_factory=_default_home, description="Where Tessera keeps its data, caches and logs."
    )
    blender: list[Path] = Field(
        default_factory=list, description="Extra Blender executables to offer besides bpy."
    )
    use_bpy: bool = Field(
        default=True, description="Offer the bpy module of this Python as a Blender build."
    )
    device: str = Field(default="CPU", description="Default render device (CPU, GPU, OPTIX...).")
    threads: int = Field(default=0, ge=0, description="Render threads; 0 means all cores.")
    coordinator: str = Field(
        default=DEFAULT_COORDINATOR,
        description="URL of the coordinator clients and nodes talk to.",
    )
    token: str | None = Field(default=None, description="API token (else $TESSERA_HOME/token).")

    @property
    def token_file(self) -> Path:
        """Where the saved access token lives: `$TESSERA_HOME/token`."""
        return self.home / TOKEN_FILE

    def frames_dir(self) -> Path:
        """Where the app puts frames until the user picks a folder: ~/Tessera, or
        $TESSERA_HOME/frames when TESSERA_HOME is set (tests set it, so they never write
        to the real home)."""
        return self.home / "frames" if "home" in self.model_fields_set else Path.home() / "Tessera"

    def resolved_token(self) -> str | None:
        """The token from the environment, else from the token file in TESSERA_HOME;
        `UsageError` when that file exists but cannot be read."""
        if self.token and self.token.strip():
            return self.token.strip()
        path = self.token_file
        try:
            token = path.read_text(encoding="utf-8").strip() if path.is_file() else ""
        except OSError as exc:
            raise UsageError(f"Cannot read the token file {path}: {exc.strerror or exc}.") from exc
        return token or None


def load_settings() -> Settings:
    """Read the settings from the environment; call once, then pass the object around."""
    return Settings()
