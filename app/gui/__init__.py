"""The Tessera desktop app (PySide6): the only package that imports Qt.

Widgets show plain `protocol.models` objects and take them through setters
(`JobsTable.set_jobs`, `NodesTable.set_nodes`, `WalletView.set_wallet`), so each can be
built and tested without the whole app. Everything that talks to a farm goes through
`protocol.client.TesseraClient`, called from `background.BackgroundWork` off the GUI thread;
no farm logic (scheduling, prices, verification) lives here. `launch.run_app` is the entry
point of `tessera app`; app/cli.py imports it lazily, so no other command loads Qt.
"""
