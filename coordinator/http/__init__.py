"""The coordinator's HTTP API (FastAPI), version 1, under /api/v1: the skin over `Farm`.

Rooms:

- `app`: `create_app` and the per-app `Services`; the lifespan starts and stops the farm.
- `routes`: every route; each one authenticates, calls one `Farm` method, and answers.
- `auth`: bearer tokens, the role each route needs, and the LAN join handshake.
- `uploads`: streaming an upload's body into the store's spool (written once, hashed
  as it comes).
- `events`: the server-sent event stream.
- `errors`: the one place a domain error becomes an HTTP status and an `ErrorBody`.
- `limits`: rate, size and load limits (ASGI middleware).

No SQL and no rules here: those live in the farm's rooms (`coordinator.farm`).
"""

from coordinator.http.app import Services, create_app

__all__ = ["Services", "create_app"]
