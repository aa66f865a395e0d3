"""The one place where the app shows what went wrong: a banner above every page.

It shows an `ErrorReport`'s message and hint (plain language, never a traceback) until the
user dismisses it or a newer error replaces it. It does not decide what is an error:
`BackgroundWork.failed` feeds it.
"""

from __future__ import annotations

from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QPushButton, QStyle, QVBoxLayout, QWidget

from app.gui.background import ErrorReport


class ErrorBanner(QFrame):
    """Hidden until `show_error`; a warning icon, the message, the hint, a Dismiss button."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.setObjectName("errorBanner")
        icon = QLabel()
        size = self.style().pixelMetric(QStyle.PixelMetric.PM_SmallIconSize)
        warning = self.style().standardIcon(QStyle.StandardPixmap.SP_MessageBoxWarning)
        icon.setPixmap(warning.pixmap(size, size))
        self.message = QLabel()
        self.message.setWordWrap(True)
        font = self.message.font()
        font.setBold(True)
        self.message.setFont(font)
        self.hint = QLabel()
        self.hint.setWordWrap(True)
        dismiss = QPushButton("Dismiss")
        dismiss.clicked.connect(self.hide)
        texts = QVBoxLayout()
        texts.addWidget(self.message)
        texts.addWidget(self.hint)
        layout = QHBoxLayout(self)
        layout.addWidget(icon)
        layout.addLayout(texts, 1)
        layout.addWidget(dismiss)
        self.hide()

    def show_error(self, report: ErrorReport) -> None:
        self.message.setText(report.message)
        self.hint.setText(report.hint)
        self.hint.setVisible(bool(report.hint))
        self.show()
