"""Small JSON files a command keeps between runs (caches, remembered measurements).

`read_json_object` gives the file's object, or {} when it is missing or unreadable
(logged: a cache is only a shortcut); `write_json_atomically` replaces the file whole,
so a reader never sees half of it. No knowledge of what the files hold.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def read_json_object(path: Path, what: str) -> dict[str, object]:
    """The JSON object in `path`; {} when missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("Ignoring the unreadable %s %s (%s)", what, path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def write_json_atomically(path: Path, data: object) -> None:
    """Write `data` as JSON to `path` through a temporary file renamed over it.
    Raises OSError when the folder cannot be made or written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(data, stream, indent=1, sort_keys=True)
        Path(temp).replace(path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
