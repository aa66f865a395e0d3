"""Verification: how the farm knows a provider's pixels are honest.

Rooms:

- `policy`: who is sampled, how often, which window, what a record means (pure).
- `judge`: compares a sample's window with the tile (and a first sample) and decides.
- `upload_checks`: structure and values of every uploaded EXR against its task.
- `samples`: queues samples, applies verdicts, settles samples nobody could take.
- `reputation`: provider records and suspension in the database.
- `claims`: what providers say about tasks they could not do: confirmed by another
  provider before a task fails, contradicted at a cost, quoted to requesters.
"""

from coordinator.verify.policy import ProviderRecord, VerificationPolicy

__all__ = ["ProviderRecord", "VerificationPolicy"]
