"""bench/peer's listening-socket check sees exactly the TCP listeners of its network namespace.

A restart's poll asks it when the controller's OpenFlow listener is up; a wrong answer would
give the bridge its controller at the wrong moment. Needs root (network namespaces).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
from collections.abc import Iterator

import pytest

from bench.peer.common import TcpListeners, netns
from tests.conftest import require


@pytest.fixture
def namespace() -> Iterator[str]:
    require(None if os.geteuid() == 0 else "not root", "network namespaces")
    name = "gltcp" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


def _listener(family: int, address: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((address, 0))
    sock.listen()
    return sock


def test_sees_the_listeners_of_its_namespace_only(namespace: str) -> None:
    outside = _listener(socket.AF_INET, "127.0.0.1")
    with netns(namespace):
        v4, v6 = _listener(socket.AF_INET, "127.0.0.1"), _listener(socket.AF_INET6, "::1")
        client = socket.create_connection(("127.0.0.1", v4.getsockname()[1]))
        accepted, _ = v4.accept()
    try:
        with TcpListeners(namespace) as listeners:
            assert listeners.ports() == {v4.getsockname()[1], v6.getsockname()[1]}  # not the connections' ports
            assert not listeners.listening(outside.getsockname()[1])
            v6.close()
            assert listeners.ports() == {v4.getsockname()[1]}
            v4.close()
            assert listeners.ports() == frozenset()
    finally:
        for sock in (outside, v4, v6, client, accepted):
            sock.close()
