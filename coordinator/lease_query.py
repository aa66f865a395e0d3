"""A job's best leasable task for a node, found with index seeks, not a sort of the queue.

"Best" is what leasing has always meant: duplicate samples (verify tasks) first, then
frame and tile order; never a task the node's account may not take (it called the task
impossible, or the task samples its own tile: `excluded_owners`), and not a task whose
last attempt failed on this very node within the retry cutoff (another node gets it
first). The old single query sorted every queued task of the job on every lease (half
a millisecond with 650 queued tiles, 45 ms with 30,000; docs/load-test.md); this one is
a UNION ALL of one `LIMIT 1` seek per status and kind on the `tasks_to_lease` index
(job, status, kind, frame, tile), and the caller picks the best of those few rows.

SQL only, engine-neutral (SQLite's dialect, rewritten for PostgreSQL by
`coordinator.engines.dialect`); the statuses and kinds are the enums' own values. It
must not hold leasing rules beyond the order and the filters above (`scheduler` leases).
"""

from __future__ import annotations

import sqlite3
from typing import Any

from protocol.models import TaskKind, TaskStatus

__all__ = ["best_leasable"]

#: The statuses a task can be leased from (as `task_states.LEASABLE`).
_STATUSES = (TaskStatus.QUEUED.value, TaskStatus.SOFT_FAILED.value)
_KINDS = tuple(kind.value for kind in TaskKind)

_MEMBER = (
    "SELECT * FROM (SELECT t.id, t.job_id, t.kind, t.frame, t.tile_index FROM tasks t"
    " WHERE t.job_id = ? AND t.status = '{status}' AND t.kind = '{kind}' AND"
    " instr(',' || t.excluded_owners || ',', ',' || ? || ',') = 0 AND NOT EXISTS (SELECT 1"
    " FROM failures f WHERE f.id = (SELECT MAX(g.id) FROM failures g WHERE g.task_id ="
    " t.id) AND f.node_id = ? AND f.kind != 'lease_expired' AND f.at > ?)"
    " ORDER BY t.frame, t.tile_index LIMIT 1) AS s{number}"
)
_PAIRS = [(status, kind) for status in _STATUSES for kind in _KINDS]
_SQL = " UNION ALL ".join(
    _MEMBER.format(status=status, kind=kind, number=number)
    for number, (status, kind) in enumerate(_PAIRS)
)


def best_leasable(
    db: Any, job_id: str, owner: str, node_id: str, retry_cutoff: str
) -> sqlite3.Row | None:
    """The job's best task for a node of `owner` (see the module docstring), or None.
    `retry_cutoff`: the ISO time before which this node's own failure no longer counts."""
    rows = db.query(_SQL, (job_id, owner, node_id, retry_cutoff) * len(_PAIRS))
    if not rows:
        return None
    best: sqlite3.Row = min(
        rows, key=lambda r: (r["kind"] != TaskKind.VERIFY.value, r["frame"], r["tile_index"])
    )
    return best
