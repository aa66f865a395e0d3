"""The coordinator's domain errors: what a request did wrong, in the farm's own words.

The rooms raise these and never name an HTTP status; `coordinator.http.errors` maps each
class to its status in one place. Every class descends from `common.errors.TesseraError`,
so a message and a hint always travel together.
"""

from __future__ import annotations

from common.errors import TesseraError

__all__ = [
    "BadUploadError",
    "ConflictError",
    "DomainError",
    "HashMismatchError",
    "InsufficientCreditsError",
    "InvalidRequestError",
    "JobNotFoundError",
    "LeaseNotFoundError",
    "LeaseOverError",
    "NodeNotFoundError",
    "NotAllowedError",
    "NotAuthenticatedError",
    "NotFoundError",
    "StorageFullError",
    "TooManyRequestsError",
    "UploadTooLargeError",
]


class DomainError(TesseraError):
    """A request the farm's rules refuse."""


class NotAuthenticatedError(DomainError):
    """No token, or one that names no account."""


class NotAllowedError(DomainError):
    """The caller's role or account may not do this."""


class NotFoundError(DomainError):
    """No such thing, or not one the caller may see."""


class JobNotFoundError(NotFoundError):
    default_hint = "`tessera jobs` lists yours."


class LeaseNotFoundError(NotFoundError):
    default_hint = "Drop this task and ask for a new lease."


class NodeNotFoundError(NotFoundError):
    default_hint = "Register the node again (restart `tessera node`)."


class ConflictError(DomainError):
    """The request does not fit the current state (a name taken, a job finished)."""


class LeaseOverError(ConflictError):
    """The lease no longer accepts work: its task moved on."""


class InvalidRequestError(DomainError):
    """Well-formed, but the farm cannot do it as asked (a missing bundle, a bad tile)."""


class BadUploadError(DomainError):
    """An upload that is malformed: no or a wrong hash, a body that broke off."""


class HashMismatchError(BadUploadError):
    default_hint = "The data was corrupted in transit or the hash is wrong; upload it again."


class UploadTooLargeError(DomainError):
    """An upload past its size limit."""


class InsufficientCreditsError(DomainError):
    """The caller's balance cannot cover what the request would escrow."""


class StorageFullError(TesseraError):
    """The coordinator's disk cannot take this write now; the sender should retry later."""

    default_hint = (
        "Keep the data and send it again later; the farm's admin must free space in the "
        "coordinator's data folder."
    )


class TooManyRequestsError(TesseraError):
    """A request over its rate; answered with Retry-After."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"retry after {retry_after:.1f} s")
        self.retry_after = retry_after
