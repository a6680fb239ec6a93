"""Store tests run against a real SQLite file and a real PostgreSQL server (tests/store/postgres.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest

from controller.policy.load import parse_policy
from controller.policy.validate import Problem
from controller.store import Store
from tests.store.postgres import PostgresServer

BACKENDS = ("sqlite", "postgresql")


class Clock:
    """Advances one second per reading: timestamps are distinct and ordered."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """A URL for a database that does not exist yet: the Store must create it."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/db/goldilocks.db"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.url()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(url: str, clock: Clock) -> Iterator[Store]:
    opened = Store(url, clock=clock)
    try:
        yield opened
    finally:
        opened.close()


def policy_check(document: Mapping[str, Any]) -> Sequence[Problem]:
    """The real policy parser and validator, as the API would pass it."""
    _, _, problems = parse_policy({"rules": document.get("rules", [])}, document.get("groups", {}))
    return problems


@pytest.fixture
def check() -> Callable[[Mapping[str, Any]], Sequence[Problem]]:
    return policy_check
