"""Listening-port discovery from /proc, against real listeners in real processes."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from agent import procnet
from tests.agent.support import wait_for
from tests.conftest import require

LISTENER = r"""
import ctypes, socket, sys
name = sys.argv[1]
if name:
    ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)  # PR_SET_NAME: what /proc/PID/comm shows
tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
tcp.bind(("127.0.0.1", 0)); tcp.listen()
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("127.0.0.1", 0))
tcp6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
tcp6.bind(("::1", 0)); tcp6.listen()
out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
out.connect(("127.0.0.1", 9))  # a connected udp socket is not a listener
print(tcp.getsockname()[1], udp.getsockname()[1], tcp6.getsockname()[1], out.getsockname()[1], flush=True)
sys.stdin.read()
"""


class Listener:
    def __init__(self, name: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LISTENER, name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.tcp, self.udp, self.tcp6, self.connected_udp = map(
            int, self.proc.stdout.readline().split()
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


# A process name of its own: a real PostgreSQL (other tests') may be running on this machine.
COMM = "pgtest" + secrets.token_hex(3)
APPS = {"postgres": [COMM, "postmaster"]}


@pytest.fixture
def postgres() -> Iterator[Listener]:
    listener = Listener(COMM)
    yield listener
    listener.stop()


def test_finds_the_app_and_its_ports(postgres: Listener) -> None:
    apps = procnet.running_apps(APPS)
    assert f"tcp/{postgres.tcp}" in apps["postgres"]
    assert f"udp/{postgres.udp}" in apps["postgres"]
    assert f"tcp/{postgres.tcp6}" in apps["postgres"]
    assert f"udp/{postgres.connected_udp}" not in apps["postgres"]


def test_rename_map_names_the_app(postgres: Listener) -> None:
    apps = procnet.running_apps({"db": ["postmaster", COMM]})
    assert f"tcp/{postgres.tcp}" in apps["db"]
    assert "postgres" not in apps


def test_unknown_processes_are_ignored(postgres: Listener) -> None:
    other = Listener("")  # comm stays the interpreter's name
    try:
        apps = procnet.running_apps({**APPS, "nginx": ["nginx"]})
        ports = {p for listed in apps.values() for p in listed}
        assert f"tcp/{other.tcp}" not in ports
        assert "nginx" not in apps
        assert procnet.running_apps({}) == {}
    finally:
        other.stop()


def test_stopping_the_app_removes_it(postgres: Listener) -> None:
    assert f"tcp/{postgres.tcp}" in procnet.running_apps(APPS)["postgres"]
    postgres.stop()
    wait_for("postgres gone", lambda: "postgres" not in procnet.running_apps(APPS))


def test_parse_table() -> None:
    text = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0100007F:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000   0        0 111 1\n"
        "   1: 0100007F:1538 0100007F:D431 01 00000000:00000000 00:00000000 00000000   0        0 112 1\n"
        "   2: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000   0        0 0 1\n"
    )
    assert procnet.parse_table(text, "tcp") == [procnet.Listener("tcp", 5432, 111)]
    udp = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref\n"
        "  7: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   0 0 201 2\n"
        "  8: 0100007F:9C40 0100007F:0035 01 00000000:00000000 00:00000000 00000000   0 0 202 2\n"
    )
    assert procnet.parse_table(udp, "udp") == [procnet.Listener("udp", 53, 201)]


def test_comm_names_are_truncated_like_the_kernel() -> None:
    assert procnet.app_names({"es": ["elasticsearch-server"]}) == {"elasticsearch-s": "es"}


def _can_unshare_net() -> bool:
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False)
    return done.returncode == 0


def test_apps_in_another_network_namespace_are_not_ours() -> None:
    """A simulated VM (own netns, shared process table) must not claim another VM's apps."""
    require(None if _can_unshare_net() else "needs root (unshare -n) for a second network namespace",
            "network namespace")
    script = (
        "import ctypes, socket, sys\n"
        "ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)\n"
        "s = socket.socket(); s.bind(('0.0.0.0', 0)); s.listen()\n"
        "print(s.getsockname()[1], flush=True); sys.stdin.read()\n"
    )
    other = subprocess.Popen(
        ["unshare", "-n", sys.executable, "-c", script, COMM],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout is not None
        assert other.stdout.readline().strip()  # it is up and listening, in its own namespace
        assert procnet.running_apps(APPS) == {}
    finally:
        other.kill()
        other.wait(10)
