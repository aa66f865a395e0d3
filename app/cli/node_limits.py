"""The options of `tessera node` that bound what it does: when it provides (idle-only,
scheduled) and what each render may use (memory, disk, sandbox, time), and the
`ProvidePolicy` / `RenderLimits` they make. Parsing only: no node is started here."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from app.cli.options import (
    UNSET,
    byte_size,
    from_tessera_error,
    non_negative,
    optional_byte_size,
    optional_seconds,
    percent,
    positive,
)
from common.errors import UsageError

if TYPE_CHECKING:
    from farm_node.availability import ProvidePolicy
    from renderers.worker import RenderLimits  # numpy, OpenEXR: not for `coordinator`


def add_providing_options(parser: argparse.ArgumentParser) -> None:
    from farm_node.availability import PROVIDE_MODES, ProvidePolicy

    defaults = ProvidePolicy()
    group = parser.add_argument_group("when to render (idle-only and scheduled providing)")
    group.add_argument(
        "--when",
        choices=PROVIDE_MODES,
        default=None,
        help="always (default), idle (only while nobody uses this machine: no keyboard or "
        "mouse input, GPU quiet) or hours (only in --hours); the current task is handed "
        "back within seconds when that ends",
    )
    group.add_argument(
        "--hours",
        type=_hours,
        default=None,
        metavar="START-END",
        help="with --when hours (implied): render only in these hours of local time, "
        "e.g. 22-7 (across midnight) or 9-17",
    )
    group.add_argument(
        "--idle-after",
        type=non_negative,
        default=defaults.idle_after,
        metavar="SECONDS",
        help=f"with --when idle: seconds without input before the machine is idle "
        f"(default {defaults.idle_after:g})",
    )
    group.add_argument(
        "--gpu-busy-above",
        type=percent,
        default=defaults.gpu_busy_above,
        metavar="PERCENT",
        help="with --when idle: GPU utilisation by other programs that counts as the "
        f"machine being in use (default {defaults.gpu_busy_above:g})",
    )
    group.add_argument(
        "--gpu-temp-max",
        type=positive,
        default=None,
        metavar="C",
        help="pause while a GPU is hotter than this (°C), until it is 5 °C cooler "
        "(default: no cap)",
    )
    group.add_argument(
        "--machine-state",
        type=Path,
        default=None,
        metavar="FILE",
        help="read input idle seconds, GPU utilisation and temperature from this JSON file "
        "instead of probing the machine (keys input_idle_seconds, gpu_utilisation, "
        "gpu_temperature); for scripts that know better",
    )


def add_render_limit_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("limits of each render")
    group.add_argument(
        "--memory-limit",
        type=optional_byte_size,
        default=UNSET,
        metavar="SIZE",
        help="private memory one Blender may use, e.g. 8G, or none (default: 80%% of RAM)",
    )
    group.add_argument(
        "--min-free-disk",
        type=byte_size,
        default=1 << 30,
        metavar="SIZE",
        help="free disk space needed before a task is taken and a render starts, e.g. 5G "
        "(default 1G; 0 = no check)",
    )
    group.add_argument(
        "--sandbox",
        choices=("auto", "bwrap", "off"),
        default="auto",
        help="run Blender in bubblewrap: auto (the default: in the sandbox when it works; "
        "without it only a coordinator on this machine is served), bwrap (required) or off "
        "(no sandbox, at your own risk)",
    )
    group.add_argument(
        "--task-timeout",
        type=optional_seconds,
        default=3600.0,
        metavar="SECONDS",
        help="give up on a task after this long (default 3600; none = never)",
    )


def _parse_hours(text: str) -> tuple[int, int]:
    from farm_node.availability import parse_hours

    return parse_hours(text)


_hours = from_tessera_error(_parse_hours)


def providing(args: argparse.Namespace) -> ProvidePolicy:
    """The `ProvidePolicy` of `tessera node`'s options; `UsageError` names a bad one."""
    from farm_node.availability import ProvidePolicy

    when = args.when or ("hours" if args.hours is not None else "always")
    if args.hours is not None and when != "hours":
        raise UsageError(f"--hours goes with --when hours, not --when {when}.")
    policy = ProvidePolicy(
        when=when,
        hours=args.hours,
        idle_after=args.idle_after,
        gpu_busy_above=args.gpu_busy_above,
        gpu_temp_max=args.gpu_temp_max,
    )
    policy.validate()
    return policy


def render_limits(args: argparse.Namespace) -> RenderLimits:
    """The `RenderLimits` of `tessera node`'s options (RenderLimits checks them)."""
    from renderers.worker import RenderLimits

    if args.memory_limit is UNSET:
        return RenderLimits(min_free_disk=args.min_free_disk, sandbox=args.sandbox)
    if args.memory_limit is not None and args.memory_limit < 64 << 20:
        raise UsageError(
            f"--memory-limit {args.memory_limit} bytes is below 64 MiB; no render fits in it.",
            hint="Give a size such as 8G, or none for no limit.",
        )
    return RenderLimits(
        memory=args.memory_limit, min_free_disk=args.min_free_disk, sandbox=args.sandbox
    )
