"""The app's look: the theme (the system's palette, or a light or dark Fusion palette) and
the window icon.

`apply_theme(app, "system" | "light" | "dark")` can be called any number of times: the
first call remembers the style and palette the platform gave the app, so "system" puts
them back. Light and dark use the Fusion style, whose every colour comes from the palette,
so widgets that draw with `palette()` colours stay readable in both. `app_icon()` loads
resources/icons/tessera.svg (sharp at any device pixel ratio), with the PNGs as fallback
sizes. No widgets and no farm here.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QSize
from PySide6.QtGui import QColor, QIcon, QPainter, QPalette, QPixmap
from PySide6.QtWidgets import QApplication, QStyleFactory

ICONS = Path(__file__).resolve().parents[2] / "resources" / "icons"
THEME_LABELS = {"system": "System", "light": "Light", "dark": "Dark"}

_Role = QPalette.ColorRole
_Group = QPalette.ColorGroup

#: (role, colour) of each theme; disabled text is set apart below.
_LIGHT = {
    _Role.Window: "#f3f3f3",
    _Role.WindowText: "#1d1d1f",
    _Role.Base: "#ffffff",
    _Role.AlternateBase: "#ececec",
    _Role.ToolTipBase: "#ffffdc",
    _Role.ToolTipText: "#1d1d1f",
    _Role.PlaceholderText: "#6e6e73",
    _Role.Text: "#1d1d1f",
    _Role.Button: "#e8e8e8",
    _Role.ButtonText: "#1d1d1f",
    _Role.BrightText: "#c00000",
    _Role.Highlight: "#2f6fd0",
    _Role.HighlightedText: "#ffffff",
    _Role.Link: "#1f5fbf",
    _Role.Mid: "#b9b9b9",
    _Role.Dark: "#9a9a9a",
    _Role.Light: "#ffffff",
}
_DARK = {
    _Role.Window: "#26282c",
    _Role.WindowText: "#e6e6e6",
    _Role.Base: "#1b1d20",
    _Role.AlternateBase: "#2c2f34",
    _Role.ToolTipBase: "#33363b",
    _Role.ToolTipText: "#e6e6e6",
    _Role.PlaceholderText: "#9a9da3",
    _Role.Text: "#e6e6e6",
    _Role.Button: "#33363b",
    _Role.ButtonText: "#e6e6e6",
    _Role.BrightText: "#ff6b6b",
    _Role.Highlight: "#3d7bd9",
    _Role.HighlightedText: "#ffffff",
    _Role.Link: "#7fb0ff",
    _Role.Mid: "#4a4d52",
    _Role.Dark: "#15171a",
    _Role.Light: "#41454b",
}
_DISABLED_TEXT = {"light": "#9a9a9a", "dark": "#6f7278"}

#: The platform's style name and palette, kept by the first `apply_theme`.
_SYSTEM: dict[str, tuple[str, QPalette]] = {}


def theme_palette(theme: str) -> QPalette:
    """The palette of "light" or "dark"."""
    colours = _DARK if theme == "dark" else _LIGHT
    palette = QPalette()
    for role, colour in colours.items():
        palette.setColor(role, QColor(colour))
    disabled = QColor(_DISABLED_TEXT["dark" if theme == "dark" else "light"])
    for role in (_Role.Text, _Role.WindowText, _Role.ButtonText):
        palette.setColor(_Group.Disabled, role, disabled)
    return palette


def apply_theme(app: QApplication, theme: str) -> None:
    """Give the whole app the system's look ("system") or a light or dark palette."""
    if not _SYSTEM:
        _SYSTEM["look"] = (app.style().name(), QPalette(app.palette()))
    if theme not in ("light", "dark"):
        style_name, palette = _SYSTEM["look"]
        app.setStyle(style_name)
        app.setPalette(palette)
        return
    if "fusion" in (key.lower() for key in QStyleFactory.keys()):  # noqa: SIM118 (a list)
        app.setStyle("Fusion")
    app.setPalette(theme_palette(theme))


def is_dark(palette: QPalette) -> bool:
    """Whether text is lighter than the window behind it (a dark theme)."""
    return palette.color(_Role.WindowText).lightness() > palette.color(_Role.Window).lightness()


def app_icon() -> QIcon:
    """Tessera's icon: the SVG (drawn at whatever size and pixel ratio is asked), plus the
    PNGs for platforms whose icon loaders need bitmaps."""
    icon = QIcon()
    svg = ICONS / "tessera.svg"
    if svg.is_file():
        icon.addFile(str(svg))
    for size in (64, 128, 256):
        png = ICONS / f"tessera-{size}.png"
        if png.is_file():
            icon.addFile(str(png), QSize(size, size))
    return icon


def monochrome_icon(
    icon: QIcon, colour: QColor, sizes: tuple[int, ...] = (16, 20, 24, 32, 48)
) -> QIcon:
    """`icon` drawn in one colour (e.g. the palette's text colour), so that the style's
    standard icons, some of them black, read on a dark theme as on a light one."""
    tinted = QIcon()
    for size in sizes:
        for ratio in (1.0, 2.0):
            source = icon.pixmap(QSize(size, size), ratio)
            if source.isNull():
                continue
            pixmap = QPixmap(source.size())
            pixmap.setDevicePixelRatio(source.devicePixelRatio())
            pixmap.fill(QColor(0, 0, 0, 0))
            painter = QPainter(pixmap)
            painter.drawPixmap(0, 0, source)
            painter.setCompositionMode(QPainter.CompositionMode.CompositionMode_SourceIn)
            painter.fillRect(pixmap.rect(), colour)
            painter.end()
            tinted.addPixmap(pixmap)
    return tinted
