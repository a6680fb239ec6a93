"""Fixtures shared by several test folders."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.store.postgres import PostgresServer, unavailable_reason


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One private PostgreSQL server for the session; each test gets its own database.

    Skips (on CI: fails) when PostgreSQL is not installed. A server that should start but
    does not is an error, never a skip.
    """
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must run the PostgreSQL tests (scripts/setup.sh installs it)")
        pytest.skip(reason)
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()
