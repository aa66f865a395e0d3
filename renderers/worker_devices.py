"""Which Cycles devices a worker turns on: the `use` flags of one render's device choice.

Loaded by `worker_main` inside Blender (standard library only, no package imports) and
imported by tests as plain Python: `use_flags` is pure. A node with several GPUs runs
one worker per card; each worker names its card's Cycles ids (`device_ids`) and only
those devices of the chosen type are turned on. Without ids every device of the type is
used (a single-worker node). Ids that match no device of the type are an error, never a
quiet fall back to another card or to the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["use_flags"]


def use_flags(
    devices: Sequence[tuple[str, str]], device_type: str, device_ids: Sequence[str] = ()
) -> list[bool]:
    """One `use` flag per `(type, id)` of Cycles' device list, in its order.

    Raises ValueError naming the ids and what Cycles lists when `device_ids` selects no
    device of `device_type`.
    """
    wanted = set(device_ids)
    flags = [kind == device_type and (not wanted or dev_id in wanted) for kind, dev_id in devices]
    if wanted and not any(flags):
        listed = ", ".join(dev_id for kind, dev_id in devices if kind == device_type) or "none"
        raise ValueError(
            f"None of the {device_type} devices {', '.join(sorted(wanted))} is on this machine "
            f"(Cycles lists {device_type}: {listed})."
        )
    return flags
