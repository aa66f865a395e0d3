"""Telling a full disk from other failures, wherever a write can fail.

The node, the coordinator's store and its frame assembly all treat "no room" the same
way: keep what was accepted, retry later. `no_room_reason` recognises it in an error or
anything it was raised from: an OSError whose errno says the disk, a quota or a
file-size limit refused the write, or (for Blender and libraries that only pass the
text on) the system's own message for those errnos. Pure: it reads exceptions only.
"""

from __future__ import annotations

import errno
import os

#: What the kernel says when a write does not fit: no space, over a quota, over the
#: process's file-size limit (RLIMIT_FSIZE).
NO_ROOM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def no_room_reason(error: BaseException) -> str | None:
    """Why `error` (or an error it came from) is a full disk, in words; else None."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in NO_ROOM_ERRNOS:
            where = f" writing {current.filename}" if current.filename else ""
            return f"the disk is full{where} ({os.strerror(current.errno or 0)})"
        text = str(current)
        for code in sorted(NO_ROOM_ERRNOS):
            if os.strerror(code) in text:
                return f"the disk is full ({text.splitlines()[0]})"
        current = current.__cause__ or current.__context__
    return None
