"""What the CLI's commands share: argparse value types (each turns bad text into a usage
error that names the value and what would be accepted), the one adapter from a
`TesseraError` to argparse's usage error, the options several commands take (--json,
--blender, the farm connection, the job options) and what they turn into (a client, a
`JobOptions`). No I/O here but opening a client.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from common.errors import TesseraError
from protocol.requirements import MAX_MEMORY_GB, POOL_NAME_PATTERN

if TYPE_CHECKING:
    # Imported where used: every command (the coordinator's and node's processes of a
    # local farm included) loads this module, and these pull in pydantic models, the HTTP
    # client and numpy (docs/render-overhead.md).
    from common.settings import Settings
    from protocol.client import TesseraClient
    from protocol.models import JobOptions

#: A command's handler: (parsed arguments, settings) -> exit status.
Handler: TypeAlias = "Callable[[argparse.Namespace, Settings], int]"
#: The default of an option whose absence differs from every value it can take.
UNSET: Any = object()

#: What `ArgumentParser.add_subparsers()` returns; each command family adds to it.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

T = TypeVar("T")


def from_tessera_error(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type of `parse`, whose `TesseraError` becomes a usage message (argparse
    only turns ArgumentTypeError into one); the type keeps `parse`'s name for messages."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except TesseraError as error:
            hint = f" ({error.hint})" if error.hint else ""
            raise argparse.ArgumentTypeError(f"{error.message}{hint}") from error

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


#: "CxR": C columns by R rows of tiles.
def _parse_grid(text: str) -> tuple[int, int]:
    from renderers.regions import parse_grid  # numpy: only for commands that take a grid

    return parse_grid(text)


_parse_grid.__name__ = "parse_grid"
grid = from_tessera_error(_parse_grid)
#: What `--tiles auto` parses to: the grid is chosen once the scene and nodes are known.
AUTO = "auto"


def grid_or_auto(text: str) -> tuple[int, int] | str:
    """ "CxR", or "auto" (app.job_spec.tile_choice chooses)."""
    return AUTO if text.strip().lower() == AUTO else grid(text)


def positive_int(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def count(text: str) -> int:
    """A whole number, 0 or more."""
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; use 0 or more")
    return value


def fraction(text: str) -> float:
    """A number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tb": 1 << 40,
    "tib": 1 << 40,
}
_NONE_WORDS = ("none", "off", "unlimited")
_SIZE = re.compile(r"^([-+]?(?:\d+\.?\d*|\.\d+))\s*([a-z]*)$")


def byte_size(text: str) -> int:
    """A size in bytes: 1073741824, 512M, 8G, 1.5GiB (K/M/G/T are powers of 1024)."""
    match = _SIZE.match(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size; use bytes or a number with K, M, G or T (e.g. 8G)"
        )
    number, unit = match.groups()
    if unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(
            f"{text!r} has an unknown unit {unit!r}; use K, M, G or T (e.g. 512M, 8G)"
        )
    value = float(number)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size of 0 bytes or more")
    return int(value * _SIZE_UNITS[unit])


def optional_byte_size(text: str) -> int | None:
    """Like `byte_size`, or none/off/unlimited for no limit (None)."""
    if text.strip().lower() in _NONE_WORDS:
        return None
    return byte_size(text)


def non_negative(text: str) -> float:
    """A finite number, 0 or more."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; use 0 or more")
    return value


def positive(text: str) -> float:
    """A finite number above 0."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not above 0")
    return value


def credit_amount(text: str) -> float:
    """A positive number of credits (what `tessera grant` gives)."""
    try:
        return positive(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"the amount must be a positive number of credits, not {text}"
        ) from None


def optional_seconds(text: str) -> float | None:
    """A positive number of seconds, or none/off for no limit (None)."""
    if text.strip().lower() in _NONE_WORDS:
        return None
    return positive(text)


def percent(text: str) -> float:
    """A number from 0 to 100."""
    value = _number(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 100")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def gigabytes(text: str) -> float:
    """An amount of memory in decimal GB (0 or more, finite, at most MAX_MEMORY_GB)."""
    value = _number(text.strip().removesuffix("GB").removesuffix("gb"))
    if not 0 <= value <= MAX_MEMORY_GB:
        raise argparse.ArgumentTypeError(
            f"{text} is not an amount of memory in GB from 0 to {MAX_MEMORY_GB:g} (e.g. 8, 0.5)"
        )
    return value


def pool_name(text: str) -> str:
    """A pool's name: 1 to 64 letters, digits, '_', '.' or '-'."""
    if re.fullmatch(POOL_NAME_PATTERN, text) is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a pool name: use 1 to 64 letters, digits, '_', '.' or '-'"
        )
    return text


def gpu_name(text: str) -> str:
    """Part of a GPU's name: 1 to 100 printable characters."""
    if not 1 <= len(text.strip()) <= 100 or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not part of a GPU name: use 1 to 100 printable characters,"
            " e.g. 'RTX 4090'"
        )
    return text.strip()


def priority(text: str) -> int:
    """A job priority: a whole number from 0 to 100."""
    value = _whole(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"priority {value} is not between 0 and 100")
    return value


def frames(text: str) -> str:
    """A frame range as `FrameRange.parse` reads it: N, A-B or A-BxSTEP."""
    from pydantic import ValidationError

    from app.job_spec import describe_validation_error
    from protocol.models import FrameRange

    try:
        FrameRange.parse(text)
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(describe_validation_error(exc)) from exc
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


# --- options several commands take ------------------------------------------------------


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def add_blender_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--blender",
        type=Path,
        default=None,
        metavar="PATH",
        help="use this Blender executable instead of the bpy module",
    )


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    from common.settings import DEFAULT_COORDINATOR

    group = parser.add_argument_group("farm connection")
    group.add_argument(
        "--coordinator",
        default=None,
        metavar="URL",
        help=f"the coordinator (default: $TESSERA_COORDINATOR, else {DEFAULT_COORDINATOR})",
    )
    group.add_argument(
        "--token",
        default=None,
        metavar="T",
        help="your access token (default: $TESSERA_TOKEN, else the file $TESSERA_HOME/token)",
    )


def connect(args: argparse.Namespace, settings: Settings) -> TesseraClient:
    """A client for --coordinator/--token (else the settings'); a token is required."""
    from app.connection import CLI_RETRIES, resolve_connection
    from protocol.client import TesseraClient

    connection = resolve_connection(settings, url=args.coordinator, token=args.token)
    connection = connection.require_token(settings)
    return TesseraClient(connection.url, connection.token, retries=CLI_RETRIES)


def add_job_options(parser: argparse.ArgumentParser) -> None:
    """The options that shape a job: shared by `submit`, `render` and `demo`."""
    from protocol.models import DEVICES

    parser.add_argument(
        "--frames",
        type=frames,
        default=None,
        metavar="A-B",
        help="frames to render: N, A-B or A-BxSTEP (default: the scene's range)",
    )
    parser.add_argument(
        "--tiles",
        type=grid_or_auto,
        default=(1, 1),
        metavar="CxR|auto",
        help="split each frame into C columns x R rows of tiles (default 1x1); auto: "
        "choose from the frame size, frames and nodes",
    )
    parser.add_argument(
        "--samples", type=positive_int, default=None, help="override the scene's samples"
    )
    parser.add_argument(
        "--percentage",
        type=positive_int,
        default=None,
        help="override the scene's resolution percentage",
    )
    parser.add_argument("--priority", type=priority, default=50, help="0 to 100 (default 50)")
    parser.add_argument(
        "--device",
        type=str.upper,
        choices=DEVICES,
        default="ANY",
        help="the device class nodes must render with (default ANY)",
    )
    parser.add_argument(
        "--no-denoise",
        action="store_true",
        help="skip denoising even if the scene asks for it",
    )
    parser.add_argument("--name", default=None, help="job name (default: the file name)")
    parser.add_argument(
        "--preview-video",
        action="store_true",
        help="also assemble the finished frames into an H.264 MP4 preview",
    )
    parser.add_argument(
        "--raw",
        action="store_true",
        help="deliver only the raw multilayer EXR of every pass (skip the scene's "
        "compositor, colour management and output format)",
    )
    group = parser.add_argument_group("requirements (the farm leases only to nodes that meet them)")
    group.add_argument(
        "--min-vram",
        type=gigabytes,
        default=None,
        metavar="GB",
        help="GPU memory one GPU of the node must have, in GB, on GPU devices (default: 1.5x"
        " the peak memory the scene probe measures; 0: none)",
    )
    group.add_argument(
        "--min-ram",
        type=gigabytes,
        default=None,
        metavar="GB",
        help="memory the node must have, in GB (default: 1.5x the probe's peak; 0: none)",
    )
    group.add_argument(
        "--gpu",
        type=gpu_name,
        default=None,
        metavar="NAME",
        help="part of the GPU's name the node must have, e.g. 'RTX 4090' (needs a GPU --device)",
    )
    group.add_argument(
        "--pool",
        type=pool_name,
        default=None,
        metavar="NAME",
        help="render only on the nodes of this pool (you must own it or be in it)",
    )


def job_options_of(args: argparse.Namespace) -> JobOptions:
    """The `JobOptions` of `add_job_options`' flags (and `submit`'s prices, if given)."""
    from app.job_spec import job_options

    columns, rows = (1, 1) if args.tiles == AUTO else args.tiles
    return job_options(
        frames=args.frames,
        tiles={"columns": columns, "rows": rows},
        samples=args.samples,
        percentage=args.percentage,
        priority=args.priority,
        denoise=False if args.no_denoise else None,
        device=args.device,
        name=args.name,
        max_price=getattr(args, "max_price", 0.0),
        max_credits=getattr(args, "max_credits", None),
        preview_video=args.preview_video,
        finish=not args.raw,
        min_vram_gb=getattr(args, "min_vram", None),
        min_ram_gb=getattr(args, "min_ram", None),
        gpu=getattr(args, "gpu", None),
        pool=getattr(args, "pool", None),
        any_blender=getattr(args, "any_blender", False),
    )


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2), flush=True)
