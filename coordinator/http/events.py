"""The server-sent event stream: the bus's events a caller may see, as they come."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from starlette.requests import Request

from coordinator.events import EventBus
from coordinator.farm import Farm, Principal
from protocol.models import Role

__all__ = ["event_stream"]

KEEP_ALIVE_SECONDS = 15.0


async def event_stream(
    farm: Farm, bus: EventBus, request: Request, who: Principal, after: int, job: str | None
) -> AsyncIterator[str]:
    last, quiet_since = after, time.monotonic()
    yield ": connected\n\n"
    while not farm.stopping.is_set():
        if await request.is_disconnected() or farm.accounts.is_revoked(who.account):
            return
        batch = bus.since(last, job)
        if batch and who.role is not Role.ADMIN and job is None:
            owned = farm.owned_job_ids(who)
            visible = [e for e in batch if e.job_id in owned]
        else:
            visible = batch
        for event in visible:
            yield f"id: {event.seq}\ndata: {event.model_dump_json()}\n\n"
        if batch:
            last, quiet_since = batch[-1].seq, time.monotonic()
        elif time.monotonic() - quiet_since > KEEP_ALIVE_SECONDS:
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
        await asyncio.sleep(0.1)
