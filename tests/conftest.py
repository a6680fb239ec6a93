"""Fixtures shared by several test folders."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.store.postgres import PostgresServer, unavailable_reason


def require(reason: str | None, what: str) -> None:
    """Skip when this machine cannot run `what` (a real condition: not root, not installed);
    under CI fail instead, so CI can never pass by skipping."""
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must run the {what} tests (scripts/setup.sh installs it)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One private PostgreSQL server for the session; each test gets its own database.

    Skips (on CI: fails) when PostgreSQL is not installed. A server that should start but
    does not is an error, never a skip.
    """
    require(unavailable_reason(), "PostgreSQL")
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()
