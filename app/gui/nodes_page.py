"""The Nodes page: the render nodes the coordinator knows.

`NodesTable` shows `protocol.models.NodeInfo` rows (name, owner, status or SUSPENDED,
devices, Blender versions, current task, tasks done, rejected results, price, the
provider's reputation, credits earned) and is built from plain models (`set_nodes`).
`NodesPage` fetches them through `TesseraClient.nodes()` in the background. Nodes seen
on the LAN (zeroconf) are not listed yet.
"""

from __future__ import annotations

from collections.abc import Sequence

from PySide6.QtGui import QFont
from PySide6.QtWidgets import QLabel, QTableWidget, QVBoxLayout, QWidget

from app.gui.background import BackgroundWork
from app.gui.connection import FarmConnection
from app.gui.farm_page import FarmPage
from app.gui.tables import cell, configure_table, credits
from protocol.client import TesseraClient
from protocol.models import NodeInfo

NODE_COLUMNS = (
    "Name",
    "Owner",
    "Status",
    "Devices",
    "Blender",
    "Current task",
    "Done",
    "Rejected",
    "Price",
    "Reputation",
    "Earned",
)


def node_status(node: NodeInfo) -> str:
    """idle, busy or offline; SUSPENDED when the coordinator suspended its provider."""
    return "SUSPENDED" if node.suspended else node.status


def node_devices(node: NodeInfo) -> str:
    caps = node.capabilities
    devices = ", ".join(caps.devices)
    if caps.gpus:
        devices += " (" + ", ".join(gpu.name for gpu in caps.gpus) + ")"
    return devices


class NodesTable(QTableWidget):
    """One row per node, in the coordinator's order."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        configure_table(self, NODE_COLUMNS, stretch_last=False)

    def set_nodes(self, nodes: Sequence[NodeInfo]) -> None:
        self.setRowCount(len(nodes))
        for row, node in enumerate(nodes):
            caps = node.capabilities
            status = cell(
                node_status(node),
                tooltip=f"Suspended: {node.suspended}" if node.suspended else "",
            )
            if node.suspended:
                font = QFont(status.font())
                font.setBold(True)
                status.setFont(font)
            cells = (
                cell(caps.name, tooltip=f"{caps.hostname} {caps.cpu}".strip()),
                cell(node.owner),
                status,
                cell(node_devices(node)),
                cell(", ".join(caps.blender_versions) or "-"),
                cell(node.current_task or "-"),
                cell(str(node.tasks_completed), align_right=True),
                cell(str(node.rejected), align_right=True),
                cell(f"{caps.price:g}", align_right=True),
                cell(f"{node.reputation:.2f}", align_right=True),
                cell(credits(node.earned), align_right=True),
            )
            for column, item in enumerate(cells):
                self.setItem(row, column, item)


class NodesPage(FarmPage):
    """The nodes table with a one-line summary above it."""

    def __init__(
        self, work: BackgroundWork, connection: FarmConnection, parent: QWidget | None = None
    ) -> None:
        super().__init__(work, connection, parent)
        self.summary = QLabel("Loading nodes…")
        self.table = NodesTable()
        layout = QVBoxLayout(self)
        layout.addWidget(self.summary)
        layout.addWidget(self.table)

    def fetch(self, client: TesseraClient) -> list[NodeInfo]:
        return client.nodes()

    def present(self, data: list[NodeInfo]) -> None:
        self.table.set_nodes(data)
        online = sum(node.status != "offline" for node in data)
        suspended = sum(node.suspended is not None for node in data)
        text = f"{len(data)} node(s), {online} online" if data else "No nodes have registered."
        if suspended:
            text += f", {suspended} suspended"
        self.summary.setText(text)
