"""Moved to `coordinator.verify.policy`; kept only so that `app/cli.py` (owned by another
package) keeps importing until it switches to `coordinator.VerificationPolicy`."""

from coordinator.verify.policy import VerificationPolicy

__all__ = ["VerificationPolicy"]
