"""The task log of one job: every task with its frame, tile, kind, status, node,
attempts, render time, last change and message (a failure's reason), built from plain
`protocol.models.Task` lists (`TaskLog.set_tasks`). The Jobs page fetches the tasks;
nothing is fetched here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from PySide6.QtGui import QBrush
from PySide6.QtWidgets import QTableWidget, QWidget

from app.gui.tables import cell, configure_table
from app.gui.tile_grid import STATE_COLOURS, tile_state
from protocol.models import Task, TaskStatus

TASK_COLUMNS = (
    "Frame",
    "Tile",
    "Kind",
    "Status",
    "Node",
    "Attempts",
    "Render time",
    "Updated",
    "Message",
)


def render_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}:{rest:02d} min"


class TaskLog(QTableWidget):
    """One row per task, in the coordinator's order (frame, kind, tile)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        configure_table(self, TASK_COLUMNS)
        self._ids: list[str] = []

    def set_tasks(self, tasks: Sequence[Task], node_names: Mapping[str, str] | None = None) -> None:
        names = node_names or {}
        self.setRowCount(len(tasks))
        self._ids = [task.id for task in tasks]
        for row, task in enumerate(tasks):
            node = task.node or ""
            status = cell(task.status.value)
            status.setForeground(QBrush(STATE_COLOURS[tile_state(task)]))
            updated = task.updated_at.astimezone().strftime("%H:%M:%S") if task.updated_at else "-"
            message = task.message
            if task.status is TaskStatus.FAILED and not message:
                message = "failed"
            cells = (
                cell(str(task.frame), align_right=True),
                cell(str(task.tile_index + 1), align_right=True),
                cell(task.kind.value),
                status,
                cell(names.get(node) or node or "-", tooltip=node),
                cell(str(task.attempts), align_right=True),
                cell(render_time(task.render_seconds), align_right=True),
                cell(updated),
                cell(message, tooltip=message),
            )
            for column, item in enumerate(cells):
                self.setItem(row, column, item)

    def task_ids(self) -> list[str]:
        return list(self._ids)
