"""The live event bus: task, frame, job and node updates for SSE clients and a change
counter that wakes long-polling nodes. In memory only; after a restart clients simply
reconnect (job state itself lives in the database). No HTTP here.

Replicas sharing a database hear each other through `peers` (set by
`coordinator.engines.notify.PeerRelay`): each event and work change is passed on, and
`on_peer` replays the other replicas' ones here (numbered in this replica's sequence),
so that clients of every replica see them. Other notes (`tell_peers`) reach the
`handlers` registered for their kind.

Event numbers (`seq`, the SSE id a client resumes after) rise by at least one per event
and never fall behind the wall clock in microseconds: numbers of every replica, and of
one replica before and after a restart, are comparable (to within the clocks' and the
relay's lag), so a client that reconnects to another replica behind a load balancer,
or to a restarted coordinator, resumes at about the same moment instead of waiting for
a counter that started elsewhere to catch up. (A client also re-reads its job when it
reconnects, `app.follow`, so an event lost in that lag costs nothing.)
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from protocol.models import Event

HISTORY = 10_000


class EventBus:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: deque[Event] = deque(maxlen=HISTORY)
        self._seq = 0
        #: Bumped whenever leasable work may have appeared (new job, requeue, resume).
        self.work_version = 0
        #: Open long polls' wake-ups (each sets its poll's asyncio event, thread-safely).
        self._wakers: set[Callable[[], None]] = set()
        #: Passes a note (kind, fields) to the other replicas; None with no replicas.
        self.peers: Callable[[str, dict[str, Any]], None] | None = None
        #: What to do with the other replicas' notes of a kind other than event/work.
        self.handlers: dict[str, Callable[[dict[str, Any]], None]] = {}

    def publish(self, type_: str, *, _from_peer: bool = False, **fields: Any) -> Event:
        with self._lock:
            self._seq = max(self._seq + 1, time.time_ns() // 1000)
            event = Event.model_validate(
                {"seq": self._seq, "type": type_, "at": datetime.now(UTC), **fields}
            )
            self._events.append(event)
        if not _from_peer:
            self.tell_peers("event", type=type_, **fields)
        return event

    def work_changed(self, *, _from_peer: bool = False) -> None:
        with self._lock:
            self.work_version += 1
        self.wake_pollers()
        if not _from_peer:
            self.tell_peers("work")

    def add_waker(self, wake: Callable[[], None]) -> None:
        """Call `wake` whenever a long poll should look again (work changed, the farm or
        a node is stopping); `remove_waker` when the poll ends."""
        with self._lock:
            self._wakers.add(wake)

    def remove_waker(self, wake: Callable[[], None]) -> None:
        with self._lock:
            self._wakers.discard(wake)

    def wake_pollers(self) -> None:
        with self._lock:
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    def tell_peers(self, kind: str, **fields: Any) -> None:
        if self.peers is not None:
            self.peers(kind, fields)

    def on_peer(self, kind: str, fields: dict[str, Any]) -> None:
        """A note from another replica (see the module docstring)."""
        if kind == "event":
            self.publish(fields.pop("type"), _from_peer=True, **fields)
        elif kind == "work":
            self.work_changed(_from_peer=True)
        elif (handler := self.handlers.get(kind)) is not None:
            handler(fields)

    @property
    def last_seq(self) -> int:
        return self._seq

    def since(self, after: int, job_id: str | None = None) -> list[Event]:
        with self._lock:
            return [
                e for e in self._events if e.seq > after and (job_id is None or e.job_id == job_id)
            ]
