"""The coordinator: accounts, jobs, scheduling with leases, verification, assembly,
credits and storage, behind an HTTP API. It may import `renderers` (tiling and EXR only)
and `protocol`, never Qt.

Rooms:

- `farm`: the facade the HTTP layer and the tests call; it builds the rooms below.
- `task_states`: the task state machine, the only place a task or job status changes
  (and what ripples from it: nodes, frames, jobs, payments, events); its sibling
  `frame_states` moves a frame (pending, denoising, finishing, done) and completes a job.
- `scheduler`: nodes, leases, matching, backups, heartbeats and expiry.
- `results`: uploads and failure reports for a lease; `verify/`: duplicate sampling.
- `jobs`, `planning` (every task kind is planned there), `pricing` (pure), `accounts`,
  `bundles`, `credits` with `ledger` (the double-entry book).
- `assembly`: merges a frame's tiles, hands it to its finish, encodes the job's movie
  and preview video; `deliverables`: a finish upload checked, unpacked and listed;
  `store`: content-addressed files (uploads are spooled once and adopted by rename);
  `db`: the one SQLite connection; `events`: the live event bus; `errors`: the domain
  errors.
- `http/`: the FastAPI skin (no SQL, no rules); `server`: runs it with uvicorn.
"""

from coordinator.config import CoordinatorConfig
from coordinator.errors import DomainError
from coordinator.verify.policy import VerificationPolicy

__all__ = ["CoordinatorConfig", "DomainError", "VerificationPolicy"]
