"""Render nodes seen on the LAN (zeroconf `_tessera-node._tcp`), for the Nodes page.

`LanBrowser` listens with `protocol.discovery`'s service type, records and address
handling, bound to the interfaces it is given (tests: 127.0.0.1 only). zeroconf runs on
its own threads, and starting it opens sockets, so `start()` opens it on a thread of its
own; every change is forwarded to the GUI thread through the `changed` signal, which
carries the whole list of `protocol.discovery.Advertised` nodes seen. Call `close()`
before the app exits: it stops zeroconf and joins its threads.

`lan_node_fields` reads an advertisement's TXT record into what the Nodes page shows; it
knows nothing of Qt widgets.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from PySide6.QtCore import QObject, Signal
from zeroconf import ServiceBrowser, ServiceListener, Zeroconf

from protocol.discovery import NODE_TYPE, Advertised

log = logging.getLogger(__name__)

#: Pass as `interfaces` to listen on every interface (zeroconf's own default).
ALL_INTERFACES: tuple[str, ...] = ()
#: How long one record lookup may take (on zeroconf's browser thread, not the GUI's).
INFO_TIMEOUT_MS = 2000


@dataclass(frozen=True, slots=True)
class LanNodeFields:
    """What a node's TXT record says about it ("" where it does not say)."""

    name: str
    devices: str
    vram: str
    blender: str
    state: str
    current_task: str
    benchmark: str
    price: str
    coordinator: str


def lan_node_fields(node: Advertised) -> LanNodeFields:
    """The Nodes page's columns from a node's advertisement (`tessera node --lan`
    advertises devices, threads and its coordinator; newer nodes may add more)."""
    props = node.properties

    def first(*keys: str) -> str:
        return next((props[key] for key in keys if props.get(key)), "")

    devices = first("devices")
    threads = first("threads")
    if threads:
        devices = f"{devices} ({threads} threads)" if devices else f"{threads} threads"
    vram = first("vram", "vram_mib")
    if vram.isdigit():
        vram = f"{int(vram) / 1024:.1f} GiB"
    return LanNodeFields(
        name=first("name") or node.name,
        devices=devices,
        vram=vram,
        blender=first("blender", "blender_versions"),
        state=first("state", "status"),
        current_task=first("task", "current_task"),
        benchmark=first("benchmark", "benchmark_score"),
        price=first("price"),
        coordinator=first("coordinator"),
    )


class _Listener(ServiceListener):
    """Keeps what zeroconf reports (on its threads) and tells the browser."""

    def __init__(self, browser: LanBrowser) -> None:
        self._browser = browser

    def _update(self, zc: Zeroconf, type_: str, name: str) -> None:
        info = zc.get_service_info(type_, name, timeout=INFO_TIMEOUT_MS)
        if info is None:
            return
        properties = {
            key.decode(errors="replace"): (value or b"").decode(errors="replace")
            for key, value in info.properties.items()
        }
        seen = Advertised(
            kind="node",
            name=name.removesuffix("." + type_),
            addresses=tuple(info.parsed_addresses()),
            port=info.port or 0,
            properties=properties,
        )
        self._browser._record(name, seen)

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._update(zc, type_, name)

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._update(zc, type_, name)

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._browser._record(name, None)


class LanBrowser(QObject):
    """Nodes advertised on the LAN; `changed(list[Advertised])` on the GUI thread.

    `interfaces`: the addresses zeroconf binds to (`ALL_INTERFACES`: every one).
    Create it on the GUI thread.
    """

    changed = Signal(object)

    def __init__(self, interfaces: Sequence[str], parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._interfaces = list(interfaces)
        self._lock = threading.Lock()
        self._found: dict[str, Advertised] = {}
        self._zeroconf: Zeroconf | None = None
        self._browser: ServiceBrowser | None = None
        self._starter: threading.Thread | None = None
        self._closed = False

    @property
    def started(self) -> bool:
        return self._starter is not None

    def start(self) -> None:
        """Start listening (once), on a thread of its own."""
        if self._starter is not None or self._closed:
            return
        self._starter = threading.Thread(target=self._open, name="tessera-lan-start")
        self._starter.start()

    def _open(self) -> None:
        try:
            zeroconf = Zeroconf(interfaces=self._interfaces) if self._interfaces else Zeroconf()
        except OSError as exc:
            log.warning("cannot listen for LAN nodes (%s); only the farm's nodes are listed", exc)
            return
        with self._lock:
            if self._closed:
                zeroconf.close()
                return
            self._zeroconf = zeroconf
            self._browser = ServiceBrowser(zeroconf, NODE_TYPE, _Listener(self))

    def nodes(self) -> list[Advertised]:
        with self._lock:
            return sorted(self._found.values(), key=lambda node: node.name)

    def _record(self, key: str, seen: Advertised | None) -> None:
        with self._lock:
            if self._closed:
                return
            if seen is None:
                self._found.pop(key, None)
            else:
                self._found[key] = seen
            snapshot = sorted(self._found.values(), key=lambda node: node.name)
        # Emitted from zeroconf's thread: Qt queues it to the GUI thread.
        self.changed.emit(snapshot)

    def close(self) -> None:
        """Stop listening and wait for zeroconf's threads (safe to call twice)."""
        with self._lock:
            self._closed = True
        if self._starter is not None:
            self._starter.join()
        with self._lock:
            browser, self._browser = self._browser, None
            zeroconf, self._zeroconf = self._zeroconf, None
        if browser is not None:
            browser.cancel()
        if zeroconf is not None:
            zeroconf.close()
