"""The FastAPI application: one `Services` per app (the farm, the limits, the LAN
join), the lifespan that starts and stops the farm, the error handlers and the routes."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from coordinator.config import CoordinatorConfig
from coordinator.farm import Farm
from coordinator.http.auth import LanJoin
from coordinator.http.errors import install_error_handlers
from coordinator.http.limits import Limits, RequestLimits
from coordinator.http.routes import router
from protocol.models import API_PREFIX

__all__ = ["Services", "create_app"]


class Services:
    """Everything a request handler may touch, built once per app."""

    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.farm = Farm.open(config)
        farm = self.farm
        self.limits = Limits(
            config,
            known=farm.accounts.known,
            authenticate=farm.authenticate,
            node_count=lambda who: sum(1 for n in farm.nodes(who) if n.owner == who.account),
        )
        self.lan = LanJoin(self.farm, config.lan_secret)
        self.admin_token = self.farm.ensure_admin()

    @property
    def stopping(self) -> threading.Event:
        """Set when the server shuts down: long polls and event streams end."""
        return self.farm.stopping


def create_app(config: CoordinatorConfig) -> FastAPI:
    services = Services(config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        services.farm.start()
        try:
            yield
        finally:
            services.farm.stop()

    app = FastAPI(
        title="Tessera coordinator",
        version=config.version,
        lifespan=lifespan,
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=f"{API_PREFIX}/docs",
        # The coordinator configures no OpenTelemetry; FastAPI's native telemetry would
        # still ask on every request whether a provider appeared (the load test saw it).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.services = services
    app.add_middleware(RequestLimits, limits=services.limits)
    install_error_handlers(app, config.storage_retry_after)
    app.include_router(router(services))
    return app
