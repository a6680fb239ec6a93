"""Real traffic inside the VM hosts: probes (ping, TCP connect), servers that listen under a
process name the agent can recognise, and TCP connections held open across events."""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fleet.matrix import Cell

# A process that renames itself (PR_SET_NAME, what /proc/PID/comm shows: the agent's view of
# "postgres") and echoes on every port it is given, one thread per connection.
SERVER = r"""
import ctypes, socket, sys, threading
ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)
def echo(conn):
    with conn:
        while data := conn.recv(4096):
            conn.sendall(data)
def serve(port):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen(64)
    while True:
        threading.Thread(target=echo, args=(sock.accept()[0],), daemon=True).start()
for port in sys.argv[2:]:
    threading.Thread(target=serve, args=(int(port),), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""

# One TCP connection kept open; each line on stdin asks "still alive?": a token goes out and
# must come back within the given seconds.
HOLDER = r"""
import select, socket, sys
try:
    conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
except OSError as exc:
    print("refused", exc, flush=True); sys.exit(1)
print("open", flush=True)
for n, line in enumerate(sys.stdin):
    token, got = b"ping%d\n" % n, b""
    try:
        conn.sendall(token)
        while token not in got and select.select([conn], [], [], float(line))[0]:
            chunk = conn.recv(4096)
            if not chunk:
                break
            got += chunk
    except OSError:
        pass
    print("open" if token in got else "cut", flush=True)
"""

Spawn = Callable[..., subprocess.Popen[bytes]]  # a host's popen: runs a command in the VM


def probe_command(probe: str, ip: str, timeout: float) -> list[str]:
    if probe == "ping":
        return ["ping", "-n", "-q", "-c", "1", "-W", f"{timeout:g}", ip]
    port = probe.split("/", 1)[1]
    return ["timeout", f"{timeout:g}", "bash", "-c", f"exec 3<>/dev/tcp/{ip}/{port}"]


def run_probes(cells: Iterable[Cell], spawn: Callable[[str], Spawn], address: Callable[[str], str],
               timeout: float = 1.0, parallel: int = 24) -> dict[Cell, bool]:
    """Every probe, `parallel` at a time: True when it got through."""
    pending, running, results = list(cells), [], {}
    while pending or running:
        while pending and len(running) < parallel:
            src, dst, probe = cell = pending.pop()
            proc = spawn(src)(probe_command(probe, address(dst), timeout), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
            running.append((cell, proc))
        time.sleep(0.02)
        for item in [r for r in running if r[1].poll() is not None]:
            running.remove(item)
            results[item[0]] = item[1].returncode == 0
    return results


class _Reader:
    """Lines from a child's stdout, each read with a deadline."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc, self.buf = proc, b""

    def line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return ""
            chunk = os.read(fd, 4096)
            if not chunk:
                return ""
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode(errors="replace").strip()


def _end(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        if proc.stdin:
            proc.stdin.close()
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=3)
    with contextlib.suppress(OSError):
        if proc.stdout:
            proc.stdout.close()


@dataclass
class Server:
    """Listeners on `ports` in a VM, in one process named `process`."""

    vm: str
    process: str
    ports: tuple[int, ...]
    proc: subprocess.Popen[bytes]

    @staticmethod
    def start(spawn: Spawn, vm: str, process: str, ports: tuple[int, ...]) -> Server:
        proc = spawn([sys.executable, "-u", "-c", SERVER, process, *map(str, ports)],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        got = _Reader(proc).line(10)
        if got != "ready":
            _end(proc)
            raise RuntimeError(f"server {process} on {vm} did not start: {got!r}")
        return Server(vm, process, ports, proc)

    def stop(self) -> None:
        _end(self.proc)


@dataclass
class HeldConnection:
    name: str
    proc: subprocess.Popen[bytes]
    reader: _Reader

    @staticmethod
    def open(spawn: Spawn, name: str, ip: str, port: int) -> HeldConnection:
        proc = spawn([sys.executable, "-u", "-c", HOLDER, ip, str(port)],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        conn = HeldConnection(name, proc, _Reader(proc))
        first = conn.reader.line(10)
        if first != "open":
            conn.close()
            raise RuntimeError(f"connection {name} to {ip}:{port} could not be opened: {first!r}")
        return conn

    def alive(self, timeout: float = 1.0) -> bool:
        if self.proc.poll() is not None or self.proc.stdin is None:
            return False
        try:
            self.proc.stdin.write(f"{timeout:g}\n".encode())
            self.proc.stdin.flush()
        except OSError:
            return False
        return self.reader.line(timeout + 5) == "open"

    def close(self) -> None:
        _end(self.proc)
