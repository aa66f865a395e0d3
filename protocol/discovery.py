"""LAN discovery with zeroconf (mDNS/DNS-SD): coordinators advertise `_tessera._tcp`,
nodes advertise `_tessera-node._tcp` with their hardware in TXT records.

A farm is identified by its name and a fingerprint of its join secret (never the secret
itself), so two farms on one LAN cannot be confused. zeroconf is always bound to the
interfaces the caller names (tests and CI use 127.0.0.1 only); its callbacks run on
zeroconf's own thread, so `browse` only collects results and returns them.

No HTTP, no Blender, no Qt here. zeroconf itself is imported only by what advertises or
browses: the coordinator checks join proofs (`join_proof`) without LAN mode, and every
process's start pays for what it imports (docs/render-overhead.md).
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar, cast
from urllib.parse import urlparse

if TYPE_CHECKING:
    from zeroconf import ServiceInfo, ServiceListener, Zeroconf

COORDINATOR_TYPE = "_tessera._tcp.local."
NODE_TYPE = "_tessera-node._tcp.local."
TXT_LIMIT = 200  # one TXT string holds at most 255 bytes, key included
T = TypeVar("T")


def secret_fingerprint(farm: str, secret: str) -> str:
    """A short public tag of (farm, secret): tells farms apart, reveals nothing useful."""
    return hmac.new(secret.encode(), f"tessera-farm:{farm}".encode(), hashlib.sha256).hexdigest()[
        :16
    ]


def join_proof(secret: str, nonce: str, node_name: str) -> str:
    """What a node sends to prove it knows the secret without sending the secret."""
    return hmac.new(secret.encode(), f"{nonce}:{node_name}".encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Advertised:
    """One service seen on the LAN."""

    kind: str  # "coordinator" or "node"
    name: str
    addresses: tuple[str, ...]
    port: int
    properties: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        scheme = self.properties.get("scheme", "http")
        host = self.addresses[0] if self.addresses else "127.0.0.1"
        return f"{scheme}://{host}:{self.port}"


def open_zeroconf(interface: str | None) -> Zeroconf:
    """zeroconf bound to one address (e.g. '127.0.0.1'), or to all when None."""
    from zeroconf import Zeroconf

    if interface:
        return Zeroconf(interfaces=[interface])
    return Zeroconf()


def _txt(properties: Mapping[str, object]) -> dict[str, str]:
    return {key: str(value)[:TXT_LIMIT] for key, value in properties.items() if value is not None}


def coordinator_info(
    url: str, farm: str, secret: str, interface: str | None, version: str
) -> ServiceInfo:
    parsed = urlparse(url)
    host = parsed.hostname or "127.0.0.1"
    address = interface or (host if host not in ("0.0.0.0", "::") else _primary_address())
    name = f"Tessera {farm} on {socket.gethostname()}"[:60]
    from zeroconf import ServiceInfo

    return ServiceInfo(
        COORDINATOR_TYPE,
        f"{name}.{COORDINATOR_TYPE}",
        addresses=[socket.inet_aton(address)],
        port=parsed.port or 8400,
        properties=_txt(
            {
                "farm": farm,
                "fp": secret_fingerprint(farm, secret),
                "scheme": parsed.scheme or "http",
                "api": "/api/v1",
                "version": version,
            }
        ),
        server=f"{socket.gethostname()}.local.",
    )


def node_info(name: str, interface: str | None, properties: Mapping[str, object]) -> ServiceInfo:
    address = interface or _primary_address()
    instance = f"{name}"[:60]
    from zeroconf import ServiceInfo

    return ServiceInfo(
        NODE_TYPE,
        f"{instance}.{NODE_TYPE}",
        addresses=[socket.inet_aton(address)],
        port=0,  # nodes serve nothing; the record carries their hardware
        properties=_txt({"name": name, **properties}),
        server=f"{socket.gethostname()}.local.",
    )


def _outside_event_loop(work: Callable[[], T]) -> T:
    """Run `work` on a short-lived thread: zeroconf's blocking API attaches to an asyncio
    loop running in the calling thread (uvicorn's, say) and then deadlocks it."""
    results: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(work())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="zeroconf-call")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


class Advertisement:
    """Registers a service on start and unregisters it on close (use `with`)."""

    def __init__(self, info: ServiceInfo, interface: str | None) -> None:
        self.info = info

        def register() -> Zeroconf:
            zeroconf = open_zeroconf(interface)
            zeroconf.register_service(info, allow_name_change=True)
            return zeroconf

        self._zeroconf = _outside_event_loop(register)

    def close(self) -> None:
        def unregister() -> None:
            self._zeroconf.unregister_service(self.info)
            self._zeroconf.close()

        _outside_event_loop(unregister)

    def __enter__(self) -> Advertisement:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Collector:
    """A zeroconf service listener (zeroconf takes any object with its three methods)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.found: dict[str, Advertised] = {}
        self.lock = threading.Lock()

    def _update(self, zc: Zeroconf, type_: str, name: str) -> None:
        info = zc.get_service_info(type_, name, timeout=2000)
        if info is None:
            return
        properties = {
            key.decode(errors="replace"): (value or b"").decode(errors="replace")
            for key, value in info.properties.items()
        }
        seen = Advertised(
            kind=self.kind,
            name=name.removesuffix("." + type_),
            addresses=tuple(info.parsed_addresses()),
            port=info.port or 0,
            properties=properties,
        )
        with self.lock:
            self.found[name] = seen

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._update(zc, type_, name)

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._update(zc, type_, name)

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        with self.lock:
            self.found.pop(name, None)


def browse(
    kinds: Sequence[str] = ("coordinator", "node"),
    *,
    interface: str | None,
    seconds: float = 3.0,
    until: object = None,
) -> list[Advertised]:
    """Listen for `seconds` (or until `until(found)` is true) and return what was seen."""
    from zeroconf import ServiceBrowser

    types = {"coordinator": COORDINATOR_TYPE, "node": NODE_TYPE}
    zeroconf = open_zeroconf(interface)
    collectors = {kind: _Collector(kind) for kind in kinds}
    browsers = [
        ServiceBrowser(zeroconf, types[kind], cast("ServiceListener", collectors[kind]))
        for kind in kinds
    ]
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = _snapshot(collectors)
            if callable(until) and until(found):
                return found
            time.sleep(0.1)
        return _snapshot(collectors)
    finally:
        for browser in browsers:
            browser.cancel()
        zeroconf.close()


def _snapshot(collectors: Mapping[str, _Collector]) -> list[Advertised]:
    found: list[Advertised] = []
    for collector in collectors.values():
        with collector.lock:
            found.extend(collector.found.values())
    return sorted(found, key=lambda item: (item.kind, item.name))


def find_coordinator(
    farm: str, secret: str, *, interface: str | None, timeout: float = 10.0
) -> Advertised | None:
    """The coordinator of `farm` whose secret matches ours, if one answers in time."""
    fingerprint = secret_fingerprint(farm, secret)

    def matches(item: Advertised) -> bool:
        return item.properties.get("farm") == farm and item.properties.get("fp") == fingerprint

    found = browse(
        ("coordinator",),
        interface=interface,
        seconds=timeout,
        until=lambda items: any(matches(i) for i in items),
    )
    return next((item for item in found if matches(item)), None)


def _primary_address() -> str:
    """This machine's address as its own resolver sees it (falls back to loopback)."""
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
    return address
