"""The `tessera` command line (argparse; no Qt).

Rooms: `main` (parser assembly and dispatch), `options` (the shared argparse types, the
one `TesseraError`-to-usage-error adapter, the connection and job options), `output`
(tables and progress on the terminal), and one module per command family: `render`
(inspect, render-local, devices), `farm` (coordinator, node, join, app), `jobs` (submit,
jobs, job, pause, resume, cancel, priority), `local` (render, demo) and `accounts`
(nodes, wallet, grant, ledger, provider). The library they call lives beside this
package in `app/`; `python -m app.cli` runs `main`.
"""

from app.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
