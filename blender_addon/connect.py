"""The preferences' operators: *Test Connection* (who you are, your balance) and *Join
Farm*: by the farm's name on the LAN (zeroconf, as `tessera join`) or by the coordinator
URL, proving the farm's secret; the token and the coordinator's URL are saved.

Joining runs on a thread in the UI (browsing the LAN takes seconds; a modal timer brings
the result back to the main thread) and synchronously in background mode.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import bpy

from .client import FarmClient
from .lan import find_farm
from .session import check_online, fail, farm_client, message
from .ui import preferences

#: How long to listen for the farm's advert on the LAN.
LAN_TIMEOUT = 10.0


class TESSERA_OT_test_connection(bpy.types.Operator):  # noqa: N801 (Blender naming)
    """Ask the coordinator who you are and what your balance is"""

    bl_idname = "tessera.test_connection"
    bl_label = "Test Connection"

    def execute(self, context: bpy.types.Context) -> set[str]:
        prefs = preferences()
        try:
            with farm_client() as client:
                me = client.me()
                wallet = client.wallet()
        except Exception as exc:
            prefs.connection_status = message(exc)
            return fail(self, exc)
        prefs.connection_status = (
            f"Connected as {me['account']} ({me['role']}); balance"
            f" {float(wallet['balance']):.2f} credits"
        )
        self.report({"INFO"}, prefs.connection_status)
        return {"FINISHED"}


@dataclass
class JoinWork:
    """Find the farm (by name on the LAN, else at `url`) and join it: the part that may
    run on a thread. Fills `url` and `token`, or `error`."""

    url: str
    farm: str
    secret: str
    interface: str
    name: str
    token: str = ""
    error: BaseException | None = None

    def run(self) -> None:
        try:
            if self.farm.strip():
                self.url = find_farm(
                    self.farm, self.secret, interface=self.interface, timeout=LAN_TIMEOUT
                )
            with FarmClient(self.url) as client:
                self.token = client.join(self.name, self.secret)
        except Exception as exc:
            self.error = exc


class TESSERA_OT_join_farm(bpy.types.Operator):  # noqa: N801 (Blender naming)
    """Join a LAN farm with its secret: found by its name on the LAN, or at the coordinator
    URL when no farm name is given. The token and the coordinator's URL are saved"""

    bl_idname = "tessera.join_farm"
    bl_label = "Join Farm"

    _work: JoinWork | None = None
    _thread: threading.Thread | None = None
    _timer: Any = None

    def execute(self, context: bpy.types.Context) -> set[str]:
        prefs = preferences()
        try:
            check_online()
        except Exception as exc:
            return fail(self, exc)
        work = JoinWork(
            url=prefs.coordinator_url,
            farm=prefs.farm_name,
            secret=prefs.farm_secret,
            interface=prefs.lan_interface,
            name=prefs.join_name.strip() or "blender",
        )
        if bpy.app.background or context.window is None:
            work.run()
            return self._finish(work)
        self._work = work
        self._thread = threading.Thread(target=work.run, name="tessera-join", daemon=True)
        self._thread.start()
        prefs.connection_status = (
            f"Looking for farm '{work.farm}' on the LAN..." if work.farm.strip() else "Joining..."
        )
        wm = context.window_manager
        self._timer = wm.event_timer_add(0.1, window=context.window)
        wm.modal_handler_add(self)
        return {"RUNNING_MODAL"}

    def modal(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        if event.type != "TIMER" or self._work is None or self._thread is None:
            return {"PASS_THROUGH"}
        if self._thread.is_alive():
            return {"PASS_THROUGH"}
        context.window_manager.event_timer_remove(self._timer)
        return self._finish(self._work)

    def _finish(self, work: JoinWork) -> set[str]:
        prefs = preferences()
        if work.error is not None or not work.token:
            prefs.connection_status = message(work.error) if work.error else "No token came back."
            return fail(self, work.error or RuntimeError("the farm returned no token"))
        prefs.coordinator_url = work.url
        prefs.token = work.token
        prefs.farm_secret = ""
        prefs.connection_status = f"Joined {work.url} as lan-user-{work.name}"
        self.report({"INFO"}, f"Joined the farm at {work.url}; token saved.")
        return {"FINISHED"}


CLASSES = (TESSERA_OT_test_connection, TESSERA_OT_join_farm)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
