"""The live event bus: task, frame, job and node updates for SSE clients and a change
counter that wakes long-polling nodes. In memory only; after a restart clients simply
reconnect (job state itself lives in the database). No HTTP here."""

from __future__ import annotations

import threading
from collections import deque
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

    def publish(self, type_: str, **fields: Any) -> Event:
        with self._lock:
            self._seq += 1
            event = Event.model_validate(
                {"seq": self._seq, "type": type_, "at": datetime.now(UTC), **fields}
            )
            self._events.append(event)
            return event

    def work_changed(self) -> None:
        with self._lock:
            self.work_version += 1

    @property
    def last_seq(self) -> int:
        return self._seq

    def since(self, after: int, job_id: str | None = None) -> list[Event]:
        with self._lock:
            return [
                e for e in self._events if e.seq > after and (job_id is None or e.job_id == job_id)
            ]
