"""Replicas on one PostgreSQL database hear each other: LISTEN/NOTIFY on one channel.

`PeerRelay` sends every note of its replica's `EventBus` (`bus.peers`) as a NOTIFY, and
a listening thread hands the other replicas' notes to `bus.on_peer`: events reach the
event streams of every replica, new work wakes the long polls of every replica, and a
revoked token stops working on every replica. Notes are small JSON objects (PostgreSQL
allows 8000 bytes); one that is lost (a replica restarting) costs a client a poll
interval, never a task: the database is the truth.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from typing import Any

from coordinator.engines.postgres import connect
from coordinator.events import EventBus

log = logging.getLogger(__name__)
CHANNEL = "tessera_peers"
#: How often the listener checks whether it should stop.
POLL_SECONDS = 0.5


class PeerRelay:
    def __init__(self, url: str, bus: EventBus) -> None:
        self.url, self.bus = url, bus
        self.origin = uuid.uuid4().hex
        self._send = connect(url)
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        bus.peers = self.send

    def start(self) -> None:
        self._thread = threading.Thread(target=self._listen, name="peer-relay", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def stop(self) -> None:
        self.bus.peers = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._send_lock:
            self._send.close()

    def send(self, kind: str, fields: dict[str, Any]) -> None:
        payload = json.dumps({"o": self.origin, "k": kind, "f": fields}, default=str)
        try:
            with self._send_lock:
                self._send.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
        except Exception:
            log.warning("could not tell the other replicas about %s", kind, exc_info=True)

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                with connect(self.url) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._ready.set()
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=POLL_SECONDS):
                            self._deliver(note.payload)
            except Exception:
                log.warning("listening to the other replicas failed; again", exc_info=True)
                self._stop.wait(1.0)

    def _deliver(self, payload: str) -> None:
        try:
            note = json.loads(payload)
            if note["o"] != self.origin:
                self.bus.on_peer(note["k"], note["f"])
        except Exception:
            log.exception("a note from another replica could not be handled: %.200s", payload)
