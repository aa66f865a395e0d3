"""The Wallet page: the account's balance, the credits held in escrow, a chart of the
balance over time, and its latest ledger entries.

`WalletView` is built from a plain `protocol.accounts.Wallet` (`set_wallet`); the chart
(`credit_chart.CreditChart`) shows the balance after each of those entries. `WalletPage`
fetches the wallet through `TesseraClient.wallet()` in the background.
"""

from __future__ import annotations

from PySide6.QtWidgets import QFormLayout, QLabel, QTableWidget, QVBoxLayout, QWidget

from app.connection import FarmConnection
from app.gui.background import BackgroundWork
from app.gui.credit_chart import CreditChart, balance_points
from app.gui.farm_page import FarmPage
from app.gui.tables import cell, configure_table, credits
from protocol.accounts import (
    Wallet,
)
from protocol.client import TesseraClient

HISTORY_COLUMNS = ("When", "Kind", "Credits", "Job", "Memo")


class WalletView(QWidget):
    """Balance and escrow, the balance chart, and the history table (newest first)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.account = QLabel("-")
        self.balance = QLabel("-")
        self.escrow = QLabel("-")
        self.escrow.setToolTip("Credits held for your unfinished jobs")
        self.chart = CreditChart()
        self.history = QTableWidget()
        configure_table(self.history, HISTORY_COLUMNS)
        figures = QFormLayout()
        figures.addRow("Account:", self.account)
        figures.addRow("Balance:", self.balance)
        figures.addRow("In escrow:", self.escrow)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(figures)
        layout.addWidget(self.chart)
        layout.addWidget(self.history, 1)

    def set_wallet(self, wallet: Wallet) -> None:
        self.account.setText(wallet.account)
        self.balance.setText(f"{credits(wallet.balance)} credits")
        self.escrow.setText(f"{credits(wallet.escrow)} credits")
        self.chart.set_points(balance_points(wallet))
        entries = sorted(wallet.history, key=lambda entry: entry.at, reverse=True)
        self.history.setRowCount(len(entries))
        for row, entry in enumerate(entries):
            cells = (
                cell(entry.at.astimezone().strftime("%Y-%m-%d %H:%M:%S")),
                cell(entry.kind),
                cell(f"{entry.amount:+,.2f}", align_right=True),
                cell(entry.job_id or "-"),
                cell(entry.memo, tooltip=entry.memo),
            )
            for column, item in enumerate(cells):
                self.history.setItem(row, column, item)


class WalletPage(FarmPage):
    def __init__(
        self, work: BackgroundWork, connection: FarmConnection, parent: QWidget | None = None
    ) -> None:
        super().__init__(work, connection, parent)
        self.view = WalletView()
        QVBoxLayout(self).addWidget(self.view)

    def fetch(self, client: TesseraClient) -> Wallet:
        return client.wallet()

    def present(self, data: Wallet) -> None:
        self.view.set_wallet(data)
