"""Bearer-token authentication and the role check.

Every route but /health depends on `allow(...)`: it authenticates the bearer token against the
store (401 if missing, unknown or revoked) and then checks the principal's role (403 naming the
roles that may). Admins may do everything, so `allow` always includes them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from controller.api.deps import store_of
from controller.store.records import Principal, Role

ADMIN = (Role.ADMIN,)
WRITE = (Role.ADMIN, Role.OPERATOR)
READ = (Role.ADMIN, Role.OPERATOR, Role.AUDITOR)
AUDIT = (Role.ADMIN, Role.AUDITOR)
RELAY = (Role.RELAY,)

_bearer = HTTPBearer(auto_error=False, description="a token from POST /api/v1/tokens (or the bootstrap admin token)")


def unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


def authenticate(request: Request,
                 creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
    if creds is None or not creds.credentials.strip():
        raise unauthorized("missing bearer token")
    principal = store_of(request).authenticate(creds.credentials.strip())
    if principal is None:
        raise unauthorized("invalid or revoked token")
    return principal


def allow(*roles: Role) -> Callable[..., Principal]:
    """A dependency: the authenticated principal, if its role is one of `roles`."""
    allowed = tuple(dict.fromkeys(roles))

    # Async: it does no I/O, so it runs on the event loop rather than in a worker thread.
    async def check(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if principal.role not in allowed:
            names = [r.value for r in allowed]
            needed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
            raise HTTPException(403, f"role {principal.role.value} may not do this: it needs role {needed}")
        return principal

    check.roles = allowed  # type: ignore[attr-defined]
    return check


def forbidden(message: str) -> HTTPException:
    return HTTPException(403, message)
