"""Errors only the node daemon raises, as subclasses of the common `TesseraError` tree.

Each says what is wrong with a bundle or a lease in words a provider can act on. This
module imports nothing but `common.errors`; it adds no new base class.
"""

from __future__ import annotations

from common.errors import BundleError, TesseraError


class UnsafeBundleError(BundleError):
    """A bundle that would write outside its folder or exhaust the disk: never extracted.

    Retrying on another node cannot help, so the task fails as not retryable.
    """

    default_hint = (
        "The bundle was refused before anything was written. Re-pack the scene with "
        "`tessera submit` (paths relative, no links, a reasonable size)."
    )


class LeaseError(TesseraError):
    """A lease the node cannot act on: a render without an assignment, a scene path that
    leaves the bundle, an identifier that is not a safe file name."""

    default_hint = "This is a coordinator bug or a version mismatch; update both sides."
