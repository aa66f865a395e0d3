"""A line chart of an account's credits over time, painted with QPainter.

QtCharts is not part of PySide6-Essentials, and a balance over time needs one line, two
axes and a few labels. `CreditChart.set_points` takes a plain list of `(time, balance)`;
`balance_points(wallet)` makes that list from a `protocol.accounts.Wallet` (the balance
after each of its ledger entries). No data fetching here.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from PySide6.QtCore import QPointF, QRect, QSize, Qt
from PySide6.QtGui import QColor, QPainter, QPainterPath, QPaintEvent, QPen
from PySide6.QtWidgets import QWidget

from app.gui.tables import credits
from protocol.accounts import (
    Wallet,
)

LINE_COLOUR = QColor("#3d7bd9")
#: Pixels kept free around the plot for the axis labels (the left one grows to fit them).
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 40, 12, 10, 22


def balance_points(wallet: Wallet) -> list[tuple[datetime, float]]:
    """The balance after each ledger entry of `wallet`, oldest first.

    The wallet carries the latest entries and the balance now, so the balances are
    worked out backwards from now: before an entry, the balance was the one after it
    less its amount."""
    entries = sorted(wallet.history, key=lambda entry: (entry.at, entry.txn), reverse=True)
    balance = wallet.balance
    points: list[tuple[datetime, float]] = []
    for entry in entries:
        points.append((entry.at, balance))
        balance -= entry.amount
    points.reverse()
    return points


class CreditChart(QWidget):
    """Balance (vertical) against time (horizontal), as a stepped line."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._points: list[tuple[datetime, float]] = []
        self.setMinimumSize(240, 120)
        self.setToolTip("Your balance after each ledger entry")

    def set_points(self, points: Sequence[tuple[datetime, float]]) -> None:
        self._points = sorted(points, key=lambda point: point[0])
        self.update()

    def points(self) -> list[tuple[datetime, float]]:
        return list(self._points)

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        return QSize(480, 160)

    def plot_rect(self) -> QRect:
        return self.rect().adjusted(self._left_margin(), MARGIN_TOP, -MARGIN_RIGHT, -MARGIN_BOTTOM)

    def _left_margin(self) -> int:
        (_, _), (low, high) = self._ranges()
        widest = max(self.fontMetrics().horizontalAdvance(credits(v)) for v in (low, high))
        return max(MARGIN_LEFT, widest + 10)

    def map_point(self, at: datetime, balance: float) -> QPointF:
        """Where `(at, balance)` is drawn (the widget's coordinates)."""
        plot = self.plot_rect()
        (t0, t1), (low, high) = self._ranges()
        x = plot.left() + (at.timestamp() - t0) / (t1 - t0) * plot.width()
        y = plot.bottom() - (balance - low) / (high - low) * plot.height()
        return QPointF(x, y)

    def _ranges(self) -> tuple[tuple[float, float], tuple[float, float]]:
        times = [at.timestamp() for at, _ in self._points] or [0.0]
        values = [value for _, value in self._points] or [0.0]
        t0, t1 = min(times), max(times)
        if t1 - t0 < 1e-6:
            t0, t1 = t0 - 1.0, t1 + 1.0
        low, high = min(values), max(values)
        if high - low < 1e-9:
            low, high = low - 1.0, high + 1.0
        elif low >= 0 and high - low > 0.5 * high:
            low = 0.0  # a range that starts near zero reads best from zero
        else:
            # Small changes on a large balance: show the changes, not the balance.
            pad = 0.1 * (high - low)
            low, high = low - pad, high + pad
        return (t0, t1), (low, high)

    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802 (Qt's name)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        plot = self.plot_rect()
        text = self.palette().text().color()
        faint = self.palette().placeholderText().color()
        painter.setPen(QPen(faint, 1))
        painter.drawLine(plot.bottomLeft(), plot.bottomRight())
        painter.drawLine(plot.bottomLeft(), plot.topLeft())
        if not self._points:
            painter.setPen(faint)
            painter.drawText(plot, Qt.AlignmentFlag.AlignCenter, "No ledger entries yet")
            return
        (_, _), (low, high) = self._ranges()
        painter.setPen(text)
        labels = Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
        for value in dict.fromkeys((low, high)):
            y = int(self.map_point(self._points[0][0], value).y())
            painter.drawText(QRect(0, y - 10, plot.left() - 6, 20), labels, credits(value))
        first, last = self._points[0][0], self._points[-1][0]
        below = QRect(plot.left(), plot.bottom() + 2, plot.width(), MARGIN_BOTTOM - 2)
        painter.drawText(below, Qt.AlignmentFlag.AlignLeft, _when(first))
        if last != first:
            painter.drawText(below, Qt.AlignmentFlag.AlignRight, _when(last))
        path = QPainterPath()
        previous: QPointF | None = None
        for at, balance in self._points:
            point = self.map_point(at, balance)
            if previous is None:
                path.moveTo(point)
            else:
                path.lineTo(QPointF(point.x(), previous.y()))  # the balance held until now
                path.lineTo(point)
            previous = point
        painter.setPen(QPen(LINE_COLOUR, 2))
        painter.drawPath(path)
        painter.setBrush(LINE_COLOUR)
        for at, balance in self._points:
            painter.drawEllipse(self.map_point(at, balance), 2.5, 2.5)


def _when(at: datetime) -> str:
    return at.astimezone().strftime("%m-%d %H:%M")
