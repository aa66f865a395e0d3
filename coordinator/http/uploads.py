"""Uploads: a request body streamed into the store's spool, hashed as it comes, and
refused past its limit or when the disk is nearly full. The spooled file is then
adopted by the store (renamed, not copied) or deleted.

A small body (its Content-Length no larger than a JSON request may be) can instead be
read into memory first (`read_small`), so that the route checks the lease, spools and
accepts it in one trip to the thread pool (the load test's tiles, docs/load-test.md)."""

from __future__ import annotations

import re

from starlette.requests import ClientDisconnect, Request

from coordinator.errors import BadUploadError, UploadTooLargeError
from coordinator.store import SpooledUpload, Store, TooLargeError
from protocol.base import SHA256_PATTERN

__all__ = ["check_room", "check_sha", "read_small", "small_length", "spool"]


def check_sha(sha256: str) -> None:
    if not re.fullmatch(SHA256_PATTERN, sha256):
        raise BadUploadError(f"'{sha256[:80]}' is not a SHA-256 (64 lower-case hex digits).")


def check_room(store: Store, request: Request, keep_free: int) -> None:
    """Refuse (507) before reading an upload that would leave the data folder's disk
    with less than `keep_free` free (a sender that does not say its size is checked
    for 0)."""
    length = request.headers.get("content-length", "0")
    store.check_room(int(length) if length.isdigit() else 0, keep_free)


async def spool(store: Store, request: Request, limit: int) -> SpooledUpload:
    """Stream the request body into a spool file, refusing it past `limit` bytes. A
    full disk is `StorageFullError` (507); a sender whose connection broke mid-body
    gets nothing stored (it sends the whole body again)."""
    with store.spool(limit) as body:
        try:
            async for chunk in request.stream():
                body.write(chunk)
        except TooLargeError as exc:
            raise UploadTooLargeError(exc.message) from None
        except ClientDisconnect:
            # Nobody is left to read this; a domain error (not a crash) keeps the log quiet.
            raise BadUploadError(f"The upload broke off after {body.size} bytes.") from None
        return body.finish()


def small_length(request: Request, limit: int) -> int | None:
    """The body's declared length when it is at most `limit` bytes (None: stream it)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) <= limit:
        return int(length)
    return None


async def read_small(request: Request) -> bytes:
    """The whole body of a request whose Content-Length `small_length` accepted (the HTTP
    server never passes more than the declared length)."""
    try:
        return await request.body()
    except ClientDisconnect:
        raise BadUploadError("The upload broke off before its end.") from None
