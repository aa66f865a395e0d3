"""Find a LAN farm's coordinator by the farm's name and secret, as `tessera join` does:
browse `_tessera._tcp` with zeroconf (vendored as a pure-Python wheel) and take the
coordinator whose advert names the farm and carries the fingerprint of our secret.

The fingerprint and the advert's TXT keys are Tessera's (protocol/discovery.py), copied
here because the extension never imports Tessera. zeroconf binds to the address the
preferences name (tests use 127.0.0.1 only), or to every interface when none is named.
No bpy here: it runs on a worker thread in the UI. It only listens: it never advertises.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from typing import Any

from .client import FarmError

COORDINATOR_TYPE = "_tessera._tcp.local."
SERVICE_INFO_TIMEOUT_MS = 2000


def secret_fingerprint(farm: str, secret: str) -> str:
    """The public tag a coordinator advertises for (farm, secret); never the secret."""
    return hmac.new(secret.encode(), f"tessera-farm:{farm}".encode(), hashlib.sha256).hexdigest()[
        :16
    ]


def _zeroconf() -> Any:
    try:
        import zeroconf
    except ImportError as exc:  # the wheel did not install
        raise FarmError(
            "zeroconf is missing, so LAN farms cannot be found by name: reinstall the Tessera"
            " extension (it ships the wheel), or type the coordinator's URL instead."
        ) from exc
    return zeroconf


class _Listener:
    """Collects the URLs of adverts that match (zeroconf calls it on its own thread)."""

    def __init__(self, farm: str, fingerprint: str) -> None:
        self.farm = farm
        self.fingerprint = fingerprint
        self.urls: list[str] = []
        self.other_farms: set[str] = set()
        self.lock = threading.Lock()

    def _update(self, zc: Any, type_: str, name: str) -> None:
        info = zc.get_service_info(type_, name, timeout=SERVICE_INFO_TIMEOUT_MS)
        if info is None:
            return
        properties = {
            key.decode(errors="replace"): (value or b"").decode(errors="replace")
            for key, value in info.properties.items()
        }
        addresses = info.parsed_addresses()
        with self.lock:
            if properties.get("farm") != self.farm or properties.get("fp") != self.fingerprint:
                self.other_farms.add(properties.get("farm", "?"))
                return
            if addresses and info.port:
                scheme = properties.get("scheme", "http")
                self.urls.append(f"{scheme}://{addresses[0]}:{info.port}")

    def add_service(self, zc: Any, type_: str, name: str) -> None:
        self._update(zc, type_, name)

    def update_service(self, zc: Any, type_: str, name: str) -> None:
        self._update(zc, type_, name)

    def remove_service(self, zc: Any, type_: str, name: str) -> None:
        """A farm that leaves is simply not found again."""


def find_farm(farm: str, secret: str, *, interface: str = "", timeout: float = 10.0) -> str:
    """The URL of farm `farm`'s coordinator whose secret matches `secret`. Raises
    `FarmError` naming what to check when none answers within `timeout` seconds."""
    farm = farm.strip()
    if not farm:
        raise FarmError("No farm name: type the name the LAN farm was started with (--farm).")
    if not secret:
        raise FarmError("No farm secret: type the secret the farm was started with.")
    zeroconf = _zeroconf()
    interface = interface.strip()
    try:
        zc = zeroconf.Zeroconf(interfaces=[interface]) if interface else zeroconf.Zeroconf()
    except (OSError, ValueError) as exc:
        raise FarmError(
            f"Cannot listen for LAN farms{f' on {interface}' if interface else ''}: {exc}."
            " Check the LAN interface address in the preferences."
        ) from exc
    listener = _Listener(farm, secret_fingerprint(farm, secret))
    browser = zeroconf.ServiceBrowser(zc, COORDINATOR_TYPE, listener)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with listener.lock:
                if listener.urls:
                    return listener.urls[0]
            time.sleep(0.1)
    finally:
        browser.cancel()
        zc.close()
    others = sorted(listener.other_farms)
    seen = f" (farms seen: {', '.join(others)})" if others else ""
    raise FarmError(
        f"No coordinator of farm '{farm}' with that secret answered on the LAN{seen}: check"
        " the farm's name and secret, and that its coordinator runs with --lan on this"
        " network."
    )
