"""The tile grid of one frame and the strip of a job's frames, built from plain models.

`TileGrid.set_tiles(columns, rows, tasks, previews)` draws a frame split into tiles
(row-major from the top-left, as `renderers.regions.plan_grid` numbers them), each tile
coloured by the state of its task (queued, rendering on node X, checking, accepted,
rejected) and, once accepted, filled with its preview image. `FrameStrip.set_frames`
lists a job's frames with their done state and emits `frame_selected`. Neither widget
fetches anything: the Jobs page hands them `protocol.models.Task` lists and PNG bytes.
`TileGrid.set_plan(columns, rows, frame_size, background)` shows how a frame would be
split before it is submitted: the grid's lines over a small preview of the frame (the
Submit page renders it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from PySide6.QtCore import QEvent, QPoint, QRect, QRectF, QSize, Qt, Signal
from PySide6.QtGui import QColor, QHelpEvent, QImage, QPainter, QPaintEvent, QPen
from PySide6.QtWidgets import QListView, QListWidget, QListWidgetItem, QToolTip, QWidget

from protocol.models import Task, TaskKind, TaskStatus


class TileState(StrEnum):
    QUEUED = "queued"
    RENDERING = "rendering"
    CHECKING = "checking"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    CANCELED = "canceled"


#: Mid-tone colours that read on light and dark themes alike.
STATE_COLOURS = {
    TileState.QUEUED: QColor("#7d8590"),
    TileState.RENDERING: QColor("#3d7bd9"),
    TileState.CHECKING: QColor("#d9a03d"),
    TileState.ACCEPTED: QColor("#3fa65a"),
    TileState.REJECTED: QColor("#d64545"),
    TileState.CANCELED: QColor("#4a4f57"),
}

_STATES = {
    TaskStatus.QUEUED: TileState.QUEUED,
    TaskStatus.PAUSED: TileState.QUEUED,
    TaskStatus.SOFT_FAILED: TileState.QUEUED,
    TaskStatus.ACTIVE: TileState.RENDERING,
    TaskStatus.CHECKING: TileState.CHECKING,
    TaskStatus.COMPLETED: TileState.ACCEPTED,
    TaskStatus.REJECTED: TileState.REJECTED,
    TaskStatus.FAILED: TileState.REJECTED,
    TaskStatus.CANCELED: TileState.CANCELED,
}
#: Which of a tile's tasks (its render, a backup render) shows: the furthest along.
_RANK = {
    TileState.ACCEPTED: 0,
    TileState.CHECKING: 1,
    TileState.RENDERING: 2,
    TileState.QUEUED: 3,
    TileState.REJECTED: 4,
    TileState.CANCELED: 5,
}
TILE_KINDS = (TaskKind.RENDER, TaskKind.BACKUP)


def tile_state(task: Task) -> TileState:
    return _STATES[task.status]


@dataclass(frozen=True, slots=True)
class TileView:
    """What one tile of the grid shows."""

    index: int
    state: TileState
    label: str
    task_id: str | None = None
    node: str | None = None
    preview: QImage | None = None


def tile_label(task: Task, node_names: Mapping[str, str] | None = None) -> str:
    """'queued', 'rendering on render-01', 'checking', 'accepted', 'failed', ..."""
    state = tile_state(task)
    if state is TileState.RENDERING:
        node = task.node or ""
        name = (node_names or {}).get(node) or node[:8]
        return f"rendering on {name}" if name else "rendering"
    if task.status is TaskStatus.FAILED:
        return "failed"
    return state.value


def tiles_of_frame(
    tasks: Iterable[Task],
    count: int,
    previews: Mapping[str, QImage | bytes] | None = None,
    node_names: Mapping[str, str] | None = None,
) -> list[TileView]:
    """One `TileView` per tile index 0..count-1 from a frame's tasks (other frames' tasks,
    and denoise and verify tasks, must be filtered out by the caller or are ignored)."""
    best: dict[int, Task] = {}
    for task in tasks:
        if task.kind not in TILE_KINDS or not 0 <= task.tile_index < count:
            continue
        held = best.get(task.tile_index)
        if held is None or _better(task, held):
            best[task.tile_index] = task
    views = []
    for index in range(count):
        shown = best.get(index)
        if shown is None:
            views.append(TileView(index, TileState.QUEUED, "queued"))
            continue
        state = tile_state(shown)
        image = None
        if state is TileState.ACCEPTED and previews is not None and shown.id in previews:
            image = as_image(previews[shown.id])
        views.append(
            TileView(index, state, tile_label(shown, node_names), shown.id, shown.node, image)
        )
    return views


def _better(task: Task, held: Task) -> bool:
    rank, held_rank = _RANK[tile_state(task)], _RANK[tile_state(held)]
    if rank != held_rank:
        return rank < held_rank
    return task.kind is TaskKind.RENDER and held.kind is not TaskKind.RENDER


def as_image(data: QImage | bytes) -> QImage | None:
    if isinstance(data, QImage):
        return None if data.isNull() else data
    image = QImage.fromData(data)
    return None if image.isNull() else image


class TileGrid(QWidget):
    """A frame's tiles drawn at the frame's aspect ratio, coloured by state."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._columns = 1
        self._rows = 1
        self._frame_size = (16, 9)
        self._tiles: list[TileView] = []
        self._background: QImage | None = None
        self._plan = False
        self._placeholder = "Select a job"
        self.setMinimumSize(240, 135)

    def set_placeholder(self, text: str) -> None:
        """What the empty grid says."""
        self._placeholder = text
        self.update()

    def set_plan(
        self,
        columns: int,
        rows: int,
        frame_size: tuple[int, int],
        background: QImage | None = None,
    ) -> None:
        """Show a `columns` x `rows` split of a `frame_size` frame, drawn over
        `background` (a preview of the frame, stretched to it) when there is one."""
        self._columns, self._rows = max(1, columns), max(1, rows)
        self._frame_size = (max(1, frame_size[0]), max(1, frame_size[1]))
        usable = background is not None and not background.isNull()
        self._background = background if usable else None
        self._plan = True
        self._tiles = [
            TileView(index, TileState.QUEUED, str(index + 1))
            for index in range(self._columns * self._rows)
        ]
        self.update()

    @property
    def background(self) -> QImage | None:
        return self._background

    def set_tiles(
        self,
        columns: int,
        rows: int,
        tasks: Sequence[Task],
        previews: Mapping[str, QImage | bytes] | None = None,
        *,
        frame_size: tuple[int, int] | None = None,
        node_names: Mapping[str, str] | None = None,
    ) -> None:
        """Show a `columns` x `rows` grid from the frame's tasks; `previews` maps a task id
        to its preview (PNG bytes or an image); `frame_size` sets the aspect ratio."""
        self._columns, self._rows = max(1, columns), max(1, rows)
        if frame_size is not None:
            self._frame_size = (max(1, frame_size[0]), max(1, frame_size[1]))
        self._tiles = tiles_of_frame(tasks, self._columns * self._rows, previews, node_names)
        self._plan, self._background = False, None
        self.update()

    def clear(self) -> None:
        self._tiles = []
        self._plan, self._background = False, None
        self.update()

    @property
    def grid(self) -> tuple[int, int]:
        return self._columns, self._rows

    def tiles(self) -> list[TileView]:
        return list(self._tiles)

    def counts(self) -> dict[TileState, int]:
        counts = dict.fromkeys(TileState, 0)
        for tile in self._tiles:
            counts[tile.state] += 1
        return counts

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        return QSize(480, 270)

    def _frame_rect(self) -> QRect:
        """The largest rectangle of the frame's aspect ratio centred in the widget."""
        width, height = self._frame_size
        area = self.rect().adjusted(4, 4, -4, -4)
        scale = min(area.width() / width, area.height() / height)
        w, h = max(1, int(width * scale)), max(1, int(height * scale))
        return QRect(area.x() + (area.width() - w) // 2, area.y() + (area.height() - h) // 2, w, h)

    def tile_rect(self, index: int) -> QRect:
        """Where tile `index` is drawn (edges at i*W//C, as the farm splits frames)."""
        frame = self._frame_rect()
        column, row = index % self._columns, index // self._columns
        x0 = frame.x() + column * frame.width() // self._columns
        x1 = frame.x() + (column + 1) * frame.width() // self._columns
        y0 = frame.y() + row * frame.height() // self._rows
        y1 = frame.y() + (row + 1) * frame.height() // self._rows
        return QRect(x0, y0, x1 - x0, y1 - y0)

    def tile_at(self, point: QPoint) -> TileView | None:
        for tile in self._tiles:
            if self.tile_rect(tile.index).contains(point):
                return tile
        return None

    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802 (Qt's name)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform)
        if not self._tiles:
            painter.setPen(self.palette().placeholderText().color())
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, self._placeholder)
            return
        if self._plan:
            self._paint_plan(painter)
            return
        for tile in self._tiles:
            rect = self.tile_rect(tile.index)
            colour = STATE_COLOURS[tile.state]
            if tile.preview is not None:
                painter.drawImage(QRectF(rect), tile.preview)
            else:
                fill = QColor(colour)
                fill.setAlpha(110)
                painter.fillRect(rect, fill)
                painter.setPen(self.palette().text().color())
                painter.drawText(
                    rect.adjusted(4, 4, -4, -4),
                    Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap,
                    tile.label,
                )
            painter.setPen(QPen(colour, 2))
            painter.drawRect(rect.adjusted(1, 1, -1, -1))

    def _paint_plan(self, painter: QPainter) -> None:
        frame = self._frame_rect()
        if self._background is not None:
            painter.drawImage(QRectF(frame), self._background)
        else:
            painter.fillRect(frame, self.palette().mid())
        # Light lines with a dark edge read on bright and dark previews alike.
        for pen in (QPen(QColor(0, 0, 0, 150), 3), QPen(QColor(255, 255, 255, 220), 1)):
            painter.setPen(pen)
            for tile in self._tiles:
                painter.drawRect(self.tile_rect(tile.index))
        if len(self._tiles) <= 64:
            painter.setPen(QColor(255, 255, 255, 230))
            for tile in self._tiles:
                painter.drawText(
                    self.tile_rect(tile.index).adjusted(4, 2, -4, -2),
                    Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop,
                    tile.label,
                )

    def event(self, event: QEvent) -> bool:
        if event.type() == QEvent.Type.ToolTip and isinstance(event, QHelpEvent):
            tile = self.tile_at(event.pos())
            if tile is None:
                QToolTip.hideText()
            else:
                QToolTip.showText(event.globalPos(), f"Tile {tile.index + 1}: {tile.label}", self)
            return True
        return super().event(event)


class FrameStrip(QListWidget):
    """A job's frames left to right, ✓ on the finished ones; emits `frame_selected`."""

    frame_selected = Signal(int)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setFlow(QListView.Flow.LeftToRight)
        self.setWrapping(False)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setFixedHeight(self.fontMetrics().height() * 2 + 16)
        self.setSpacing(2)
        self.setUniformItemSizes(True)
        self._item_size = QSize(
            self.fontMetrics().horizontalAdvance("✓ 00000") + 12, self.fontMetrics().height() + 10
        )
        self._frames: list[int] = []
        self.currentRowChanged.connect(self._on_row_changed)

    def set_frames(self, frames: Sequence[int], done: Iterable[int], current: int | None) -> None:
        finished = set(done)
        self.blockSignals(True)
        try:
            if list(frames) != self._frames:
                self.clear()
                self._frames = list(frames)
                for frame in self._frames:
                    item = QListWidgetItem()
                    item.setData(Qt.ItemDataRole.UserRole, frame)
                    item.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
                    item.setSizeHint(self._item_size)
                    self.addItem(item)
            for row, frame in enumerate(self._frames):
                item = self.item(row)
                is_done = frame in finished
                item.setText(f"✓ {frame}" if is_done else str(frame))
                item.setToolTip(f"Frame {frame}: {'done' if is_done else 'not done yet'}")
            if current in self._frames:
                self.setCurrentRow(self._frames.index(current))
        finally:
            self.blockSignals(False)

    def frame_texts(self) -> list[str]:
        return [self.item(row).text() for row in range(self.count())]

    def _on_row_changed(self, row: int) -> None:
        if 0 <= row < len(self._frames):
            self.frame_selected.emit(self._frames[row])
