"""Tessera's clients: the `tessera` CLI and the PySide6 desktop app (the only package
that imports Qt, and only in `app.gui`).

Rooms, each with one job:

- `app.cli`: the command line (argparse): parser assembly, shared options, one module
  per command family. Nothing else in `app` imports it.
- `app.connection`: which coordinator and token a client uses, resolved once from
  `common.settings.Settings` (TESSERA_COORDINATOR, TESSERA_TOKEN, the token file) for
  the CLI and the app alike.
- `app.job_spec`: an artist's `JobOptions` plus an inspected scene make a `JobSpec`.
- `app.packing`, `app.submit`: pack a scene into a bundle, upload it, submit the job.
- `app.follow`: follow a job and download its frames.
- `app.preview`: the Submit page's small colour render (Qt-free).
- `app.local_farm`: a coordinator and nodes on this machine (`tessera render`, tests).
- `app.node_process`: `tessera node` as a child process, for the Provide page.
- `app.blender_choice`: which Blender build a command or the app uses.
- `app.gui`: the desktop app; it never imports `app.cli` nor takes an argparse Namespace.
"""

# The rooms are imported on demand (`import app.cli` must not load packing or Qt).
__all__ = [
    "blender_choice",
    "cli",
    "connection",
    "follow",
    "gui",
    "job_spec",
    "local_farm",
    "node_process",
    "packing",
    "preview",
    "submit",
]
