"""The wire between the coordinator, its nodes and its clients.

Rooms:

- `protocol.models`: the pydantic models of every request and response of API v1, and
  the wire enums (job, task and frame states, failure kinds, devices).
- `protocol.accounts`: accounts, LAN joining, wallets and the ledger's check;
  `protocol.requirements`: what a job asks of a node, pools.
- `protocol.output`: what a job delivers (movie settings, a finish's manifest, the
  deliverables a client downloads); `protocol.base`: the strict base model, SHA-256.
- `protocol.client`: `TesseraClient`, the typed HTTP client every side uses.
- `protocol.discovery`: zeroconf advertising and browsing of farms and nodes on a LAN.

Imports pydantic, requests and zeroconf only (never the coordinator, a node or Qt).
"""

from protocol.client import TesseraClient
from protocol.models import API_PREFIX, FailureKind, FrameState, FrameStatus, JobSpec

__all__ = ["API_PREFIX", "FailureKind", "FrameState", "FrameStatus", "JobSpec", "TesseraClient"]
