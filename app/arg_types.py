"""argparse value types shared by the CLI's commands: each turns bad text into a usage
error that names the value and what would be accepted. No I/O here."""

from __future__ import annotations

import argparse
import math
import re


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
