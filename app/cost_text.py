"""What a job cost and how well providers delivered, in words and numbers: shared by the
`tessera` commands and the app's pages (docs/billing.md). Plain text only: no Qt, no
network.
"""

from __future__ import annotations

from typing import Any

from protocol.models import Job, JobCost, NodeInfo

__all__ = ["cost_json", "cost_lines", "duration", "rate", "work_text"]


def cost_json(cost: JobCost) -> dict[str, Any]:
    """The `cost` object of `--json` output: exactly credits_per_frame, success_rate,
    wasted_seconds, estimate and final."""
    return cost.model_dump(mode="json")


def rate(value: float | None) -> str:
    """A success rate as a percentage, '-' when nothing was delivered yet."""
    return "-" if value is None else f"{value * 100:.0f}%"


def duration(seconds: float) -> str:
    """Seconds of render time, short: '0 s', '12.3 s', '4 min 5 s', '2 h 3 min'."""
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds else "0 s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def cost_lines(job: Job) -> list[str]:
    """The cost of a job, a few lines for a terminal or a panel."""
    cost = job.cost
    per_frame = "-" if cost.credits_per_frame is None else f"{cost.credits_per_frame:.4g} credits"
    bill = "final" if job.status.value in ("completed", "failed", "canceled") else "so far"
    lines = [
        f"{per_frame} per successful frame; {cost.final:.4g} credits {bill}"
        f" (estimate {cost.estimate:.4g})",
        f"{rate(cost.success_rate)} of delivered results accepted;"
        f" {duration(cost.wasted_seconds)} of render time wasted",
    ]
    declared = job.spec.scene_cost
    if job.measured_scene_cost is not None:
        lines.append(
            f"billed at the measured scene cost {job.measured_scene_cost:.3g}"
            f" (declared {declared:.3g}); duplicate samples {job.verification_credits:.4g}"
            " credits"
        )
    return lines


def work_text(node: NodeInfo) -> str:
    """A node's accepted work: results and their render time."""
    return f"{node.tasks_completed} ({duration(node.accepted_seconds)})"
