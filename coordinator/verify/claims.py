"""What providers say about tasks they could not do, and who else could try them.

Nothing one provider says fails a job (`coordinator.task_states.fail_attempt` decides
with these): a claim that a task cannot be done (a final failure) is confirmed by a
provider of another account, or contradicted by another's accepted result, which costs
the claimant a rejection (`contradict`). A node's own words reach a requester only as a
bounded one-line quote (`quoted_report`). No status changes here.
"""

from __future__ import annotations

import sqlite3
import time

from coordinator.core import Core
from coordinator.planning import node_can_run
from coordinator.pools import granted
from coordinator.verify.reputation import Reputation
from protocol.models import JobSpec, NodeCapabilities

__all__ = [
    "REPORT_CHARS",
    "REPORT_PREFIX",
    "accounts",
    "contradict",
    "failure_summary",
    "provider_online",
    "quoted_report",
    "shortened",
    "verdict",
]

#: The most characters of a node's own words a requester is shown, quotes included.
REPORT_CHARS = 300
#: How a node's quoted words begin.
REPORT_PREFIX = 'node reported: "'


def quoted_report(text: str, limit: int = REPORT_CHARS) -> str:
    """A node's free text as a requester sees it: one line of printable characters,
    quoted and attributed, at most `limit` characters long. A node's words are a claim,
    never the coordinator's own."""
    printable = "".join(ch if ch.isprintable() else " " for ch in text)
    line = " ".join(printable.split()).replace('"', "'")
    room = max(1, limit - len(REPORT_PREFIX) - 1)
    if len(line) > room:
        line = line[: room - 1] + "\u2026"
    return f'{REPORT_PREFIX}{line}"'


def shortened(reason: str, limit: int) -> str:
    """One failure's `kind: message` within `limit` characters; a quoted node report is
    cut inside its quotes, so it stays a closed quote."""
    if len(reason) <= limit:
        return reason
    if reason.endswith('"') and REPORT_PREFIX in reason:
        head, _, said = reason.partition(REPORT_PREFIX)
        return head + quoted_report(said[:-1], max(limit - len(head), len(REPORT_PREFIX) + 2))
    return reason[: max(1, limit - 1)] + "\u2026"


def failure_summary(conn: sqlite3.Connection, task_id: str, why: str) -> str:
    """Why a task failed for good, with the reasons its last attempts gave, the whole
    message at most REPORT_CHARS long (node reports stay closed quotes)."""
    reasons = [
        f"{r['kind']}: {r['message']}"
        for r in conn.execute(
            "SELECT kind, message FROM failures WHERE task_id = ? ORDER BY id DESC LIMIT 3",
            (task_id,),
        )
    ][::-1]
    head = f"Task {task_id} failed ({why}): "
    room = (REPORT_CHARS - len(head) - 3 * (len(reasons) - 1)) // max(1, len(reasons))
    return head + " | ".join(shortened(reason, room) for reason in reasons)


def accounts(conn: sqlite3.Connection, task_id: str, *, final_only: bool = False) -> set[str]:
    """The provider accounts whose nodes failed the task (only final claims: `final_only`)."""
    return {
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT n.owner FROM failures f JOIN nodes n ON n.id = f.node_id"
            " WHERE f.task_id = ?" + (" AND f.final = 1" if final_only else ""),
            (task_id,),
        )
        if r[0]
    }


def contradict(conn: sqlite3.Connection, reputation: Reputation, row: sqlite3.Row) -> None:
    """The task's result was accepted: every other account whose node called the task
    impossible (a final failure) was contradicted, which costs it a rejection, once."""
    owner = conn.execute("SELECT owner FROM nodes WHERE id = ?", (row["node_id"],)).fetchone()
    claims = conn.execute(
        "SELECT f.id, n.owner FROM failures f JOIN nodes n ON n.id = f.node_id"
        " WHERE f.task_id = ? AND f.final = 1 AND f.contradicted = 0",
        (row["id"],),
    ).fetchall()
    claimants = {c["owner"] for c in claims} - {owner[0] if owner else None}
    for claimant in sorted(claimants):
        reputation.count(conn, claimant, rejected=1)
    conn.executemany(
        "UPDATE failures SET contradicted = 1 WHERE id = ?", [(c["id"],) for c in claims]
    )


def provider_online(
    core: Core,
    conn: sqlite3.Connection,
    job_id: str,
    excluded: set[str],
    spec: JobSpec | None = None,
) -> bool:
    """Whether a recently seen node of an unsuspended account not in `excluded`, not
    kept off the job, could run the job's tasks at the job's price."""
    if spec is None:
        spec = core.spec_in(conn, job_id)
    cutoff = time.time() - core.config.verifier_seen_seconds
    rows = conn.execute(
        "SELECT n.owner, n.capabilities FROM nodes n LEFT JOIN providers p ON"
        " p.account = n.owner WHERE n.last_seen >= ? AND p.suspended IS NULL AND NOT EXISTS"
        " (SELECT 1 FROM blocklist b WHERE b.job_id = ? AND b.node_id = n.id)",
        (cutoff, job_id),
    ).fetchall()
    for node in rows:
        if node["owner"] in excluded:
            continue
        caps = NodeCapabilities.model_validate_json(node["capabilities"])
        pools = granted(conn, node["owner"]) & frozenset(caps.pools)
        if node_can_run(caps, spec, pools) and caps.price <= spec.max_price:
            return True
    return False


def verdict(
    conn: sqlite3.Connection,
    row: sqlite3.Row,
    excluded_owners: str,
    attempts: int,
    max_attempts: int,
    retryable: bool,
) -> tuple[bool, str, set[str]]:
    """After a failed attempt of the task `row` (already recorded, the `attempts`th):
    whether the task fails for good, why, and the accounts kept off it from now on.

    It fails when a provider of another account called it impossible too (not
    `retryable`), or when its `max_attempts` attempts failed on two accounts. Otherwise
    the failing provider had its say and another account's node tries the task; if
    none comes within `verify_wait_seconds`, `TaskStates.fail_unconfirmable` fails it
    then (a provider alone on the farm at this moment cannot fail a job at once).
    """
    excluded = set(filter(None, excluded_owners.split(",")))
    if retryable:
        if attempts < max_attempts:
            return False, "", excluded
        if len(accounts(conn, row["id"])) >= 2:
            return True, "every attempt failed, on nodes of more than one provider", excluded
    elif len(accounts(conn, row["id"], final_only=True)) >= 2:
        return True, "two providers reported it cannot be done", excluded
    if row["node_owner"]:
        excluded.add(row["node_owner"])
    return False, "", excluded
