"""The northbound REST API: `create_app(store, controller)` (docs/api.md).

Writes go to the store first (the source of truth, which audits them) and then, once committed,
to the engine as the event they imply; reads come from the store or the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute

from controller.api import errors
from controller.api.deps import Services
from controller.api.limits import BodySizeLimit
from controller.api.port import ControllerPort
from controller.api.routes_context import router as context_router
from controller.api.routes_inventory import router as inventory_router
from controller.api.routes_ops import router as ops_router
from controller.api.routes_policy import router as policy_router
from controller.store import Store

PREFIX = "/api/v1"
DEFAULT_MAX_BODY = 1_048_576


def create_app(store: Store, controller: ControllerPort, *, max_body_bytes: int = DEFAULT_MAX_BODY,
               clock: Callable[[], float] = time.time) -> FastAPI:
    app = FastAPI(
        title="Goldilocks",
        version="1",
        summary="Context-aware microsegmentation for Open vSwitch hypervisors",
        description="Every route except /api/v1/health needs `Authorization: Bearer <token>`; see docs/api.md.",
        docs_url="/docs",
        openapi_url="/openapi.json",
        responses=errors.ERROR_RESPONSES,
    )
    app.state.services = Services(store, controller, clock)
    errors.install(app)
    for router in (inventory_router, context_router, policy_router, ops_router):
        _mount(app, router)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    return app


def _mount(app: FastAPI, router: APIRouter) -> None:
    """Add the router's routes to the app itself under PREFIX, so that `app.routes` lists every
    route flat (newer FastAPI versions nest included routers)."""
    for route in router.routes:
        assert isinstance(route, APIRoute), route
        app.add_api_route(
            PREFIX + route.path, route.endpoint, methods=sorted(route.methods), name=route.name,
            response_model=route.response_model, status_code=route.status_code, tags=route.tags,
            summary=route.summary, description=route.description, responses=route.responses,
        )
