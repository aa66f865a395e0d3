"""Write a file so that readers see either the old file or the whole new one, never half:
the data goes to a temporary file beside the target, which is then renamed over it.
Errors become `ExrError`s naming the file; nothing is left behind on failure."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from common.errors import ExrError

#: What a write may raise: OS errors, and OpenEXR's RuntimeError/ValueError/TypeError.
WRITE_ERRORS = (OSError, RuntimeError, ValueError, TypeError)


def write_atomically(path: Path, write: Callable[[Path], object], what: str = "") -> None:
    """Call `write(temporary_path)`, then move the result to `path` (mode 0644)."""
    label = f"{what} {path}" if what else str(path)
    try:
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise ExrError(
            f"Cannot write {label} ({error.strerror}).",
            hint="Check that the folder exists and is writable.",
        ) from error
    temporary = Path(name)
    try:
        os.close(handle)  # `write` opens the file by its path
        write(temporary)
        # mkstemp creates the file private (0600); outputs are as readable as any file.
        temporary.chmod(0o644)
        temporary.replace(path)
    except WRITE_ERRORS as error:
        raise ExrError(f"Writing {label} failed ({error}).") from error
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
