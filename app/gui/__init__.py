"""The Tessera desktop app (PySide6): the only package that imports Qt.

Widgets show plain `protocol.models` objects and take them through setters
(`JobsTable.set_jobs`, `NodesTable.set_nodes`, `WalletView.set_wallet`), so each can be
built and tested without the whole app. Everything that talks to a farm goes through
`protocol.client.TesseraClient`, called from `background.BackgroundWork` off the GUI thread;
no farm logic (scheduling, prices, verification) lives here. The Qt-free work the pages
start lives beside this package: `app.connection` (which farm), `app.job_spec`,
`app.submit`, `app.follow`, `app.preview`, `app.node_process`. `launch.run_app` is the
entry point of `tessera app`, called with plain values; `app.cli.farm` imports it lazily,
so no other command loads Qt. Nothing here imports `app.cli` or argparse (an
import-linter contract).
"""
