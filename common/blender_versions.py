"""Blender version series: which builds may render a scene saved by which Blender.

A scene renders the same on every build of its major.minor series ("5.0"); another
series may read it differently (new defaults, changed nodes, another Cycles). The job
records the series that saved the scene, nodes advertise their builds, and a job goes
only to a node with a build of that series unless the artist allowed any
(``tessera submit --any-blender``). Pure functions; nothing here runs Blender.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["blender_series", "offers_series"]

_SERIES = re.compile(r"^\s*(\d+)\.(\d+)(?:[.\s-].*)?$")


def blender_series(version: str) -> str | None:
    """ "5.0.1" and "5.0" -> "5.0"; None for text that names no version."""
    match = _SERIES.match(version)
    return None if match is None else f"{int(match.group(1))}.{int(match.group(2))}"


def offers_series(wanted: str, offered: Iterable[str]) -> bool:
    """Whether builds `offered` ("5.0.1", "4.2.3"...) include the series of `wanted`.

    A node that reported no build at all is not refused (an old node, a test stand-in):
    only one that offers other series only is.
    """
    versions = [version for version in offered if version]
    if not versions:
        return True
    series = blender_series(wanted) or wanted
    return any(blender_series(version) == series for version in versions)
