"""A real os-ken OpenFlow controller (subprocess) with and without apps.guard.install_guard.

Needs no OVS: the test itself plays the switches over TCP on 127.0.0.1.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "malformed"

CONTROLLER_SCRIPT = """
import logging, sys
sys.path.insert(0, {repo!r})
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
from os_ken import cfg
from os_ken.base.app_manager import AppManager  # also registers the ofp-* options
cfg.CONF(args=['--ofp-listen-host', '127.0.0.1', '--ofp-tcp-listen-port', sys.argv[1]],
         project='os_ken')
if sys.argv[2] == 'guard':
    from apps.guard import install_guard
    install_guard()
print('starting', flush=True)
AppManager.run_apps(['os_ken.controller.ofp_handler'])
"""

OFPT_FEATURES_REQUEST = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_fixture(path: Path) -> bytes:
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    return bytes.fromhex("".join(ln for ln in lines if ln and not ln.startswith("#")))


def hello(version: int) -> bytes:
    element = struct.pack("!HHI", 1, 8, (1 << 4) | (1 << 5))
    return struct.pack("!BBHI", version, 0, 8 + len(element), 1) + element


def connect(port: int, deadline: float = 10.0) -> socket.socket:
    end = time.monotonic() + deadline
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=2)
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


def read_message(sock: socket.socket, timeout: float) -> bytes:
    """One OpenFlow message, or b'' if the peer closed; raises TimeoutError."""
    sock.settimeout(timeout)
    head = recv_exact(sock, 8)
    if len(head) < 8:
        return b""
    length = struct.unpack("!H", head[2:4])[0]
    return head + recv_exact(sock, max(0, length - 8))


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return buf
        buf += chunk
    return buf


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True if the controller closes the connection within `seconds` (ignoring its messages)."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        try:
            sock.settimeout(left)
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def handshake_gets_features_request(port: int) -> bool:
    with connect(port) as sock:
        sock.sendall(hello(5))
        end = time.monotonic() + 5
        while time.monotonic() < end:
            msg = read_message(sock, end - time.monotonic())
            if not msg:
                return False
            if msg[1] == OFPT_FEATURES_REQUEST:
                return True
    return False


def start_controller(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[bytes], int]:
    script = tmp_path / "controller.py"
    script.write_text(CONTROLLER_SCRIPT.format(repo=str(REPO)))
    port = free_port()
    with open(tmp_path / f"controller-{mode}.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(script), str(port), mode],
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    connect(port).close()  # wait until it listens
    return proc, port


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def guarded_controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    tmp = tmp_path_factory.mktemp("guarded")
    proc, port = start_controller(tmp, "guard")
    yield port, tmp
    assert proc.poll() is None, "the guarded controller died"
    stop(proc)


FIXTURE_PATHS = sorted(FIXTURES.glob("*.hex"))


@pytest.mark.parametrize("path", FIXTURE_PATHS, ids=lambda p: p.stem)
def test_guarded_controller_closes_only_the_bad_connection(
        guarded_controller: tuple[int, Path], path: Path) -> None:
    port, tmp = guarded_controller
    payload = load_fixture(path)
    with connect(port) as bad:
        if payload[1] != 0:  # not itself a HELLO: say hello properly first
            bad.sendall(hello(payload[0]))
        bad.sendall(payload)
        assert closed_within(bad, 5.0), f"controller kept the connection open after {path.stem}"
    assert handshake_gets_features_request(port), "controller stopped serving other switches"
    assert "malformed message" in (tmp / "controller-guard.log").read_text()


def test_guarded_controller_survives_a_burst(guarded_controller: tuple[int, Path]) -> None:
    port, _ = guarded_controller
    payload = load_fixture(FIXTURES / "hello_zero_length_element.hex")
    socks = [connect(port) for _ in range(10)]
    for s in socks:
        s.sendall(payload)
    assert all(closed_within(s, 5.0) for s in socks)
    for s in socks:
        s.close()
    assert handshake_gets_features_request(port)


def test_unguarded_controller_hangs_on_zero_length_hello_element(tmp_path: Path) -> None:
    """Documents the bug the guard fixes: without it the connection is never closed."""
    proc, port = start_controller(tmp_path, "plain")
    try:
        with connect(port) as bad:
            bad.sendall(load_fixture(FIXTURES / "hello_zero_length_element.hex"))
            assert not closed_within(bad, 3.0)
        assert proc.poll() is None
    finally:
        stop(proc)
