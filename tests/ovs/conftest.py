"""Fixtures for tests against a real, private Open vSwitch (see tests/ovs/harness.py)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import require
from tests.ovs.harness import OvsSandbox, unavailable_reason

BridgeFactory = Callable[..., str]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses the private OVS carries the ``ovs`` marker (``-m "not ovs"``)."""
    for item in items:
        if "ovs" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ovs)


@pytest.fixture(scope="session")
def ovs() -> Iterator[OvsSandbox]:
    """One private ovsdb-server + ovs-vswitchd for the whole session.

    Skips (on CI: fails) when this machine cannot run it: not root, or OVS not installed.
    A sandbox that should start but does not is an error, never a skip.
    """
    require(unavailable_reason(), "Open vSwitch")
    sandbox = OvsSandbox().start()
    try:
        yield sandbox
    finally:
        sandbox.stop()


@pytest.fixture
def bridge_factory(ovs: OvsSandbox) -> Iterator[BridgeFactory]:
    """Make netdev bridges (``make()`` -> "br1", or ``make("name", dpid=...)``).

    After the test, every bridge, VM port/namespace and link made during it is removed and
    conntrack is flushed, so tests sharing the session sandbox cannot see each other.
    """
    checkpoint = ovs.checkpoint()
    counter = itertools.count(1)

    def make(name: str | None = None, **kwargs: object) -> str:
        if name is None:
            name = next(f"br{n}" for n in counter if f"br{n}" not in ovs.bridges)
        return ovs.add_bridge(name, **kwargs)  # type: ignore[arg-type]

    try:
        yield make
    finally:
        ovs.rollback(checkpoint)
