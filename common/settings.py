"""Typed settings, loaded once at start-up and passed in; never read at import time.

Values come from the environment (prefix `TESSERA_`, e.g. `TESSERA_BLENDER=/opt/blender/
blender`) and then command-line options override them. Tests isolate themselves by
pointing `TESSERA_HOME` at a temporary folder (see tests/conftest.py).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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
        default="http://127.0.0.1:8400",
        description="URL of the coordinator clients and nodes talk to.",
    )
    token: str | None = Field(default=None, description="API token (else $TESSERA_HOME/token).")

    def resolved_token(self) -> str | None:
        """The token from the environment, else from the token file in TESSERA_HOME."""
        if self.token:
            return self.token
        path = self.home / "token"
        return path.read_text().strip() if path.is_file() else None


def load_settings() -> Settings:
    """Read the settings from the environment; call once, then pass the object around."""
    return Settings()
