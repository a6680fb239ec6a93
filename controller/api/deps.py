"""Where routes find the store, the controller and the clock (set on app.state by create_app)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from controller.api.port import ControllerPort
from controller.store import Store


@dataclass(frozen=True)
class Services:
    store: Store
    controller: ControllerPort
    clock: Callable[[], float]


def services_of(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


def store_of(request: Request) -> Store:
    return services_of(request).store


async def services(request: Request) -> Services:
    """`services_of` as a dependency. Async because it does no I/O: FastAPI runs a sync
    dependency in a worker thread, a hand-over each way for every request."""
    return services_of(request)


Svc = Annotated[Services, Depends(services)]
