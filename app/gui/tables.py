"""Shared set-up of the app's read-only tables (jobs, nodes, ledger entries).

Only presentation: column headers, read-only cells, row selection. No data fetching and no
knowledge of what the rows mean.
"""

from __future__ import annotations

from collections.abc import Sequence

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QAbstractItemView, QHeaderView, QTableWidget, QTableWidgetItem


def configure_table(
    table: QTableWidget, headers: Sequence[str], *, stretch_last: bool = True
) -> None:
    """Read-only, whole-row selection; the last column (a free text) stretched if asked."""
    table.setColumnCount(len(headers))
    table.setHorizontalHeaderLabels(list(headers))
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
    table.setAlternatingRowColors(True)
    table.verticalHeader().setVisible(False)
    header = table.horizontalHeader()
    header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
    header.setStretchLastSection(stretch_last)


def cell(text: str, *, tooltip: str = "", align_right: bool = False) -> QTableWidgetItem:
    """A read-only cell; numbers align right so their digits line up."""
    item = QTableWidgetItem(text)
    if tooltip:
        item.setToolTip(tooltip)
    if align_right:
        item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
    return item


def cell_texts(table: QTableWidget, row: int) -> list[str]:
    """The text of every cell of `row` (a cell widget counts as empty); for tests."""
    texts = []
    for column in range(table.columnCount()):
        item = table.item(row, column)
        texts.append(item.text() if item is not None else "")
    return texts


def credits(amount: float) -> str:
    return f"{amount:,.2f}"
