"""The pages that hold no farm data yet: Settings (coordinator URL and token) and the
placeholder that says what is coming (Provide).

The Settings page only edits values; the main window saves them (`AppSettings`) and hands
the new connection to the farm pages. It reports a malformed URL through `invalid`, which
the main window routes to its error banner.
"""

from __future__ import annotations

from collections.abc import Sequence

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QFormLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.gui.background import ErrorReport
from app.gui.connection import FarmConnection


class PlaceholderPage(QWidget):
    """A page still to be built: its title and what it will do."""

    def __init__(self, title: str, plans: Sequence[str], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        heading = QLabel(f"<h2>{title}</h2>")
        body = QLabel(
            "<p>Coming next:</p><ul>" + "".join(f"<li>{plan}</li>" for plan in plans) + "</ul>"
        )
        body.setWordWrap(True)
        body.setTextFormat(Qt.TextFormat.RichText)
        layout = QVBoxLayout(self)
        layout.addWidget(heading)
        layout.addWidget(body)
        layout.addStretch(1)


class SettingsPage(QWidget):
    """Coordinator URL and access token; Save emits `connection_changed`."""

    connection_changed = Signal(object)  # FarmConnection
    invalid = Signal(object)  # ErrorReport

    def __init__(self, connection: FarmConnection, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.url = QLineEdit(connection.url)
        self.url.setPlaceholderText("http://127.0.0.1:8400")
        self.token = QLineEdit(connection.token or "")
        self.token.setEchoMode(QLineEdit.EchoMode.Password)
        self.token.setPlaceholderText("the token the farm's admin gave you")
        self.save = QPushButton("Save and reconnect")
        self.save.clicked.connect(self._on_save_clicked)
        form = QFormLayout()
        form.addRow("Coordinator URL:", self.url)
        form.addRow("Access token:", self.token)
        form.addRow("", self.save)
        later = QLabel(
            "Coming next: LAN mode (farm name and secret), the Blender builds found and an "
            "added path, the cache folder and its size limit."
        )
        later.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("<h2>Settings</h2>"))
        layout.addLayout(form)
        layout.addWidget(later)
        layout.addStretch(1)

    def _on_save_clicked(self) -> None:
        url = self.url.text().strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            self.invalid.emit(
                ErrorReport(
                    f"{url or 'An empty text'} is not a coordinator URL.",
                    "Write it with its scheme, e.g. http://127.0.0.1:8400.",
                )
            )
            return
        self.connection_changed.emit(FarmConnection(url, self.token.text().strip() or None))
