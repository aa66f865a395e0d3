"""Errors to HTTP: the only place a domain error gets its status code.

Every refusal is answered as a JSON `ErrorBody` that says what to fix; a crash is a
500 with the same shape, never a traceback.
"""

from __future__ import annotations

import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.errors import ApiError, TesseraError
from coordinator.errors import (
    BadUploadError,
    ConflictError,
    InsufficientCreditsError,
    InvalidRequestError,
    NotAllowedError,
    NotAuthenticatedError,
    NotFoundError,
    StorageFullError,
    TooManyRequestsError,
    UploadTooLargeError,
)
from coordinator.http.limits import too_many_requests
from protocol.models import ErrorBody

__all__ = [
    "STATUS",
    "crash_response",
    "error_response",
    "install_error_handlers",
    "reason",
    "status_of",
]

#: The HTTP status of each domain error (the first class that matches wins).
STATUS: tuple[tuple[type[TesseraError], int], ...] = (
    (BadUploadError, 400),
    (NotAuthenticatedError, 401),
    (InsufficientCreditsError, 402),
    (NotAllowedError, 403),
    (NotFoundError, 404),
    (ConflictError, 409),
    (UploadTooLargeError, 413),
    (InvalidRequestError, 422),
    (TooManyRequestsError, 429),
    (StorageFullError, 507),
)


def status_of(exc: TesseraError) -> int:
    if isinstance(exc, ApiError):
        return exc.status
    for kind, status in STATUS:
        if isinstance(exc, kind):
            return status
    return 500


def reason(status: int) -> str:
    return {
        400: "bad request",
        401: "unauthorized",
        403: "forbidden",
        404: "not found",
        408: "request timeout",
        409: "conflict",
        413: "too large",
        422: "invalid request",
        429: "too many requests",
        503: "unavailable",
        507: "insufficient storage",
    }.get(status, "error")


def error_response(
    status: int, error: str, detail: str, hint: str = "", headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorBody(error=error, detail=detail, hint=hint)
    return JSONResponse(status_code=status, content=body.model_dump(), headers=headers)


def install_error_handlers(app: FastAPI, storage_retry_after: float) -> None:
    @app.exception_handler(TesseraError)
    async def domain_error(_: Request, exc: TesseraError) -> JSONResponse:
        if isinstance(exc, TooManyRequestsError):
            return too_many_requests(exc.retry_after)
        status = status_of(exc)
        if status == 500:
            return crash_response(exc)
        headers = None
        if isinstance(exc, StorageFullError):
            # Nothing of this request was kept and nothing accepted before is touched:
            # the sender keeps its data and sends it again after Retry-After.
            headers = {"Retry-After": str(max(1, math.ceil(storage_retry_after)))}
        return error_response(status, reason(status), exc.message, exc.hint, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for item in exc.errors():
            where = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
            message = str(item.get("msg", "invalid")).removeprefix("Value error, ")
            problems.append(f"{where}: {message}" if where else message)
        return error_response(
            422,
            "invalid request",
            "; ".join(problems),
            "Fix the fields named above and send the request again.",
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status, headers = exc.status_code, dict(exc.headers or {})
        return error_response(status, reason(status), str(exc.detail), headers=headers)

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> JSONResponse:
        return crash_response(exc)


def crash_response(exc: BaseException) -> JSONResponse:
    """A 500: the server logs the exception; the client gets the usual error shape,
    never a traceback."""
    return error_response(
        500,
        "internal error",
        f"The coordinator failed on this request ({type(exc).__name__}).",
        "This is a bug in the coordinator; its log has the details.",
    )
