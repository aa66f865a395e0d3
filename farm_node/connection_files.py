"""The coordinator's URL and the node's token, read from files that may not exist yet.

`tessera node --token-file PATH` keeps the token out of the process list (`ps` shows
every argument to every user) and reads it from a file a secret store mounts, and
`--coordinator-file PATH` reads the URL that `tessera coordinator` writes into its
`--data` folder (`coordinator.url`). Both may be given before the files exist: the node
starts (Python and its imports, about a second) and then waits for them, so a farm
started on one machine (`tessera render`) starts its coordinator and nodes side by side.

A file counts once it holds a whole line (ending in a newline, as both writers end it)
or, for a token file written by hand, any text unchanged for `SETTLE_SECONDS`. This
module reads files and waits; it does not talk to the coordinator.
"""

from __future__ import annotations

import dataclasses
import logging
import stat
import time
from pathlib import Path

from common.errors import UsageError
from farm_node.config import NodeConfig

__all__ = ["CONNECTION_WAIT_SECONDS", "ConnectionFileError", "read_connection_files"]

log = logging.getLogger(__name__)

#: How long a node waits for a file named by --token-file / --coordinator-file.
CONNECTION_WAIT_SECONDS = 120.0
#: Text without a final newline counts once it has not changed for this long.
SETTLE_SECONDS = 0.5
#: The file is looked at again after a few milliseconds at first, then less often: a
#: node started beside its coordinator (`tessera render`) registers as soon as it can.
_POLL_FIRST_SECONDS = 0.005
_POLL_MAX_SECONDS = 0.05


class ConnectionFileError(UsageError):
    """A --token-file or --coordinator-file did not appear in time, or holds nothing usable."""


def read_connection_files(
    config: NodeConfig, timeout: float = CONNECTION_WAIT_SECONDS
) -> NodeConfig:
    """`config` with `coordinator_url` and `token` read from their files, when named
    (waiting up to `timeout` for each). Raises `ConnectionFileError` naming the file and
    what to do."""
    if config.coordinator_file is not None:
        url = _wait_for_line(config.coordinator_file, "coordinator URL", timeout)
        config = dataclasses.replace(config, coordinator_url=url)
    if config.token_file is not None:
        _warn_if_readable_by_others(config.token_file)
        token = _wait_for_line(config.token_file, "token", timeout)
        config = dataclasses.replace(config, token=token)
    return config


def _wait_for_line(path: Path, what: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    announced = False
    last, settled_since = "", time.monotonic()
    delay = _POLL_FIRST_SECONDS
    while True:
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        except (OSError, UnicodeDecodeError) as exc:
            raise ConnectionFileError(
                f"Cannot read the {what} from {path}: {exc}.",
                hint="Check the file's permissions and that it holds text.",
            ) from exc
        now = time.monotonic()
        if text != last:
            last, settled_since = text, now
        value = text.strip()
        if value and (text.endswith("\n") or now - settled_since >= SETTLE_SECONDS):
            if len(value.splitlines()) != 1:
                raise ConnectionFileError(
                    f"{path} holds {len(value.splitlines())} lines; the {what} is one line.",
                    hint=f"Write only the {what} into the file.",
                )
            return value
        if now >= deadline:
            raise ConnectionFileError(
                f"No {what} in {path} after {timeout:g} s"
                + (" (the file is empty)." if path.exists() else " (no such file)."),
                hint=f"Write the {what} into {path}, or pass it on the command line instead.",
            )
        if not announced:
            log.info("Waiting for the %s in %s", what, path)
            announced = True
        time.sleep(delay)
        delay = min(delay * 1.5, _POLL_MAX_SECONDS)


def _warn_if_readable_by_others(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # not there yet: whoever writes it sets its mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("The token file %s is readable by other users (chmod 600 it).", path)
