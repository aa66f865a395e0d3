"""What every room of the farm shares: the configuration, the database, the content
store, the event bus, and the cache of parsed job specs (a spec never changes after
submission). Built once by `coordinator.farm.Farm`."""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from pydantic import ValidationError

from coordinator.config import CoordinatorConfig
from coordinator.db import Database
from coordinator.events import EventBus
from coordinator.store import Store
from protocol.models import JobSpec, NodeCapabilities

log = logging.getLogger(__name__)

#: A task's database row, or a copy of one with changes (a backup's result moved in).
TaskRow = sqlite3.Row | dict[str, Any]


@lru_cache(maxsize=4096)
def node_caps(raw: str) -> NodeCapabilities:
    """A node's capabilities parsed from their stored JSON, cached by the text: every lease
    and every job listing parsed them again (the load test). Shared: never mutate one."""
    return NodeCapabilities.model_validate_json(raw)


@dataclass
class Core:
    config: CoordinatorConfig
    db: Database
    store: Store
    bus: EventBus
    _specs: dict[str, JobSpec] = field(default_factory=dict)

    def spec(self, job_id: str, raw: str | None = None) -> JobSpec:
        """The job's parsed spec (from `raw`, its JSON, when the caller has it)."""
        spec = self._specs.get(job_id)
        if spec is None:
            if raw is None:
                raw = str(self.db.fetch_one("SELECT spec FROM jobs WHERE id = ?", (job_id,))[0])
            spec = self._specs[job_id] = JobSpec.model_validate_json(raw)
        return spec

    def spec_in(self, conn: sqlite3.Connection, job_id: str) -> JobSpec:
        """Like `spec`, read inside an open transaction."""
        spec = self._specs.get(job_id)
        if spec is None:
            raw = conn.execute("SELECT spec FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
            spec = self._specs[job_id] = JobSpec.model_validate_json(raw)
        return spec

    def readable_spec(self, job_id: str, raw: str) -> JobSpec | None:
        """Like `spec`, but None (logged) for a stored spec that no longer validates (a
        row written before a validation rule existed): one bad row must not break every
        listing and lease poll."""
        try:
            return self.spec(job_id, raw)
        except ValidationError as exc:
            log.error(
                "job %s: its stored spec cannot be read (%d errors)", job_id, exc.error_count()
            )
            return None
