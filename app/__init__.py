"""The `tessera` CLI and the PySide6 desktop app: the only package that imports Qt."""
