"""What every operator shares: the farm client from the preferences (online access and a
token checked first) and the one way to report a failure (`report` + `{'CANCELLED'}`).

No operators here, no network calls of its own.
"""

from __future__ import annotations

import bpy

from .client import FarmClient, FarmError
from .packing import PackError
from .spec import SpecError
from .ui import preferences

#: Errors that are the artist's to read, not a programmer's.
EXPECTED = (FarmError, PackError, SpecError)


def check_online() -> None:
    if not getattr(bpy.app, "online_access", True):  # Blender before 4.2 has no such switch
        raise FarmError(
            "Online access is off: allow it in Preferences > System > Network > Allow Online"
            " Access (the Tessera extension talks to your farm's coordinator)."
        )


def farm_client() -> FarmClient:
    check_online()
    prefs = preferences()
    client = FarmClient(prefs.coordinator_url, prefs.token)
    client.require_token()
    return client


def message(error: BaseException) -> str:
    return str(error) if isinstance(error, EXPECTED) else f"Tessera: {error!r}"


def fail(op: bpy.types.Operator, error: BaseException) -> set[str]:
    op.report({"ERROR"}, message(error))
    return {"CANCELLED"}
