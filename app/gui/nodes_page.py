"""The Nodes page: the render nodes the coordinator knows, and those seen on the LAN.

`NodesTable` shows `protocol.models.NodeInfo` rows (name, owner, status or SUSPENDED,
devices, Blender versions, current task, tasks done, success rate (accepted / delivered
results), accepted work (results and their render time), rejected results, price, the
provider's reputation, credits earned, VRAM, benchmark score, where it was seen) and,
below them, nodes advertised on the LAN (`protocol.discovery.Advertised`) that the
coordinator does not list, marked "LAN only"; it is built from plain models
(`set_nodes`). `NodesPage` fetches the farm's nodes through `TesseraClient.nodes()` in
the background and, when given zeroconf interfaces, listens for LAN nodes with a
`LanBrowser` (its own threads; changes arrive through a signal). Call `shutdown()` before
the app exits when LAN listing is on.
"""

from __future__ import annotations

from collections.abc import Sequence

from PySide6.QtGui import QFont
from PySide6.QtWidgets import QLabel, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget

from app.connection import FarmConnection
from app.cost_text import rate, work_text
from app.gui.background import BackgroundWork
from app.gui.farm_page import FarmPage
from app.gui.lan_browser import LanBrowser, lan_node_fields
from app.gui.tables import cell, configure_table, credits
from protocol.client import TesseraClient
from protocol.discovery import Advertised
from protocol.models import NodeInfo

NODE_COLUMNS = (
    "Name",
    "Owner",
    "Status",
    "Devices",
    "Blender",
    "Current task",
    "Done",
    "Success",
    "Accepted work",
    "Rejected",
    "Price",
    "Reputation",
    "Earned",
    "VRAM",
    "Benchmark",
    "Seen",
)
SEEN_FARM, SEEN_BOTH, SEEN_LAN = "farm", "farm + LAN", "LAN only"


def node_status(node: NodeInfo) -> str:
    """idle, busy, paused (its provider's schedule or an active user; the reason is the
    cell's tooltip) or offline; SUSPENDED when the coordinator suspended its provider."""
    return "SUSPENDED" if node.suspended else node.status


def node_devices(node: NodeInfo) -> str:
    caps = node.capabilities
    devices = ", ".join(caps.devices)
    if caps.gpus:
        devices += " (" + ", ".join(gpu.name for gpu in caps.gpus) + ")"
    return devices


def node_vram(node: NodeInfo) -> str:
    """The largest GPU memory of the node, '-' without a GPU (or when unknown)."""
    sizes = [gpu.vram_mib for gpu in node.capabilities.gpus if gpu.vram_mib]
    return f"{max(sizes) / 1024:.1f} GiB" if sizes else "-"


def lan_only(nodes: Sequence[NodeInfo], lan: Sequence[Advertised]) -> list[Advertised]:
    """The LAN nodes that no node of the farm's list has the name of."""
    names = {node.capabilities.name for node in nodes}
    return [item for item in lan if lan_node_fields(item).name not in names]


class NodesTable(QTableWidget):
    """One row per node, in the coordinator's order, then the LAN-only nodes."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        configure_table(self, NODE_COLUMNS, stretch_last=False)

    def set_nodes(self, nodes: Sequence[NodeInfo], lan: Sequence[Advertised] = ()) -> None:
        on_lan = {lan_node_fields(item).name for item in lan}
        extra = lan_only(nodes, lan)
        self.setRowCount(len(nodes) + len(extra))
        for row, node in enumerate(nodes):
            self._set_row(row, self._farm_cells(node, node.capabilities.name in on_lan))
        for row, item in enumerate(extra, start=len(nodes)):
            self._set_row(row, self._lan_cells(item))

    def _set_row(self, row: int, cells: Sequence[QTableWidgetItem]) -> None:
        for column, item in enumerate(cells):
            self.setItem(row, column, item)

    @staticmethod
    def _farm_cells(node: NodeInfo, also_on_lan: bool) -> list[QTableWidgetItem]:
        caps = node.capabilities
        status = cell(
            node_status(node),
            tooltip=f"Suspended: {node.suspended}"
            if node.suspended
            else (node.paused or "").removeprefix("paused: "),
        )
        if node.suspended:
            font = QFont(status.font())
            font.setBold(True)
            status.setFont(font)
        benchmark = f"{caps.benchmark_score:g}" if caps.benchmark_score is not None else "-"
        return [
            cell(caps.name, tooltip=f"{caps.hostname} {caps.cpu}".strip()),
            cell(node.owner),
            status,
            cell(node_devices(node)),
            cell(", ".join(caps.blender_versions) or "-"),
            cell(node.current_task or "-"),
            cell(str(node.tasks_completed), align_right=True),
            cell(
                rate(node.success_rate),
                tooltip="accepted results / results delivered",
                align_right=True,
            ),
            cell(work_text(node), tooltip="accepted results (their render time)", align_right=True),
            cell(str(node.rejected), align_right=True),
            cell(f"{caps.price:g}", align_right=True),
            cell(f"{node.reputation:.2f}", align_right=True),
            cell(credits(node.earned), align_right=True),
            cell(node_vram(node), align_right=True),
            cell(benchmark, align_right=True),
            cell(SEEN_BOTH if also_on_lan else SEEN_FARM),
        ]

    @staticmethod
    def _lan_cells(item: Advertised) -> list[QTableWidgetItem]:
        fields = lan_node_fields(item)
        where = ", ".join(item.addresses) or "an unknown address"
        tooltip = f"Advertised on the LAN from {where}; this farm's coordinator does not list it"
        if fields.coordinator:
            tooltip += f" (it works for {fields.coordinator})"
        cells = [
            cell(fields.name, tooltip=tooltip),
            cell("-"),
            cell(fields.state or "on the LAN"),
            cell(fields.devices or "-"),
            cell(fields.blender or "-"),
            cell(fields.current_task or "-"),
            cell("-", align_right=True),
            cell("-", align_right=True),
            cell("-", align_right=True),
            cell("-", align_right=True),
            cell(fields.price or "-", align_right=True),
            cell("-", align_right=True),
            cell("-", align_right=True),
            cell(fields.vram or "-", align_right=True),
            cell(fields.benchmark or "-", align_right=True),
            cell(SEEN_LAN, tooltip=tooltip),
        ]
        for item_cell in cells:
            font = QFont(item_cell.font())
            font.setItalic(True)
            item_cell.setFont(font)
        return cells


class NodesPage(FarmPage):
    """The nodes table with a one-line summary above it.

    `lan_interfaces`: the addresses zeroconf listens on for LAN nodes
    (`lan_browser.ALL_INTERFACES`: every interface; None, the default: no LAN listing).
    Listening starts with the first refresh.
    """

    def __init__(
        self,
        work: BackgroundWork,
        connection: FarmConnection,
        parent: QWidget | None = None,
        *,
        lan_interfaces: Sequence[str] | None = None,
    ) -> None:
        super().__init__(work, connection, parent)
        self.summary = QLabel("Loading nodes…")
        self.table = NodesTable()
        self._nodes: list[NodeInfo] = []
        self._lan: list[Advertised] = []
        self.lan: LanBrowser | None = None
        if lan_interfaces is not None:
            self.lan = LanBrowser(lan_interfaces, self)
            self.lan.changed.connect(self._on_lan_changed)
        layout = QVBoxLayout(self)
        layout.addWidget(self.summary)
        layout.addWidget(self.table)

    def refresh(self) -> None:
        if self.lan is not None:
            self.lan.start()
        super().refresh()

    def shutdown(self) -> None:
        """Stop listening on the LAN (waits for zeroconf's threads)."""
        if self.lan is not None:
            self.lan.close()

    def fetch(self, client: TesseraClient) -> list[NodeInfo]:
        return client.nodes()

    def present(self, data: list[NodeInfo]) -> None:
        self._nodes = data
        self._show()

    def _on_lan_changed(self, nodes: list[Advertised]) -> None:
        self._lan = nodes
        self._show()

    def _show(self) -> None:
        data, lan = self._nodes, self._lan
        self.table.set_nodes(data, lan)
        online = sum(node.status != "offline" for node in data)
        suspended = sum(node.suspended is not None for node in data)
        text = f"{len(data)} node(s), {online} online" if data else "No nodes have registered."
        if suspended:
            text += f", {suspended} suspended"
        extra = len(lan_only(data, lan))
        if extra:
            text += f"; {extra} more seen on the LAN only"
        self.summary.setText(text)
