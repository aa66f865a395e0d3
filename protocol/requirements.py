"""Wire models of job requirements and pools.

Split from `protocol.models` (which imports `JobRequirements` and the bounds from here)
to keep both small: what a job may ask of a node (memory, a GPU's name, a pool), the
units they are given in, and the pool bodies of the API. Data shapes and their
validation only: no I/O.
"""

from __future__ import annotations

import math
import re
from datetime import datetime

from pydantic import Field

from protocol.base import Strict

#: The most memory (MiB) a job may require or a node declare: 1 PiB.
MAX_MEMORY_MIB = 1 << 30
#: The most memory a job may ask for in decimal GB (1 PB, under MAX_MEMORY_MIB).
MAX_MEMORY_GB = 1_000_000.0
#: A pool's name: letters, digits, '_', '.', '-'.
POOL_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
#: How many pools a node may claim and a GPU list may hold, at most.
MAX_NODE_POOLS = 32
MAX_NODE_GPUS = 64
#: Text a stranger sends that others will see (a GPU or node name, a CPU model, why a
#: node is paused): printable, no control characters (C0, DEL or C1: a terminal would
#: act on an escape sequence in `tessera nodes`).
PRINTABLE_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*$"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str, limit: int = 300) -> str:
    """`text` with every control character a space, cut to `limit` characters: what a
    node sends of its own messages (an error's first line may hold a tab or a colour)."""
    return _CONTROL.sub(" ", text)[:limit]


def gb_to_mib(gb: float) -> int:
    """Decimal gigabytes (what cards and machines are sold by) as MiB, rounded up: a
    node's 8 GB card reports about 8192 MiB and meets `--min-vram 8` (7630 MiB)."""
    return math.ceil(gb * 1e9 / (1 << 20))


def format_mib(mib: int) -> str:
    """MiB in decimal GB, the unit of `--min-vram` / `--min-ram` ('7.5 GB')."""
    return f"{mib * (1 << 20) / 1e9:.1f} GB"


class JobRequirements(Strict):
    """What a node must have to be leased a job's tasks (the coordinator checks it on
    every lease, against what nodes declare: a claim it bounds, never trusts further).

    VRAM applies to GPU devices only (a CPU job needs none); RAM to the node as a whole.
    """

    #: MiB of memory one GPU of the node must have (0: none asked).
    min_vram_mib: int = Field(default=0, ge=0, le=MAX_MEMORY_MIB)
    #: MiB of memory the node must have (0: none asked).
    min_ram_mib: int = Field(default=0, ge=0, le=MAX_MEMORY_MIB)
    #: A case-insensitive part of the GPU's name ("" : any GPU).
    gpu: str = Field(default="", max_length=100, pattern=PRINTABLE_PATTERN)
    #: The pool whose nodes alone may render the job ("" : any node).
    pool: str = Field(default="", pattern=r"^([A-Za-z0-9_.-]{1,64})?$")
    #: The scene's peak render memory the submit-time probe measured, in MiB (0: not
    #: measured). Informative: the requirements above are what the coordinator enforces.
    measured_peak_mib: int = Field(default=0, ge=0, le=MAX_MEMORY_MIB)


class PoolInfo(Strict):
    """A pool: the accounts its owner added (their nodes may serve the pool's jobs, and
    they may submit jobs to it)."""

    name: str
    owner: str
    members: list[str] = Field(default_factory=list)
    created_at: datetime


class PoolCreate(Strict):
    name: str = Field(pattern=POOL_NAME_PATTERN)


class PoolMember(Strict):
    account: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.@-]+$")
