"""Real things for the agent tests: a recording HTTP API, relay and agent processes, utmp files."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")

# glibc x86_64 struct utmp, written independently of agent.utmp.
UTMP = struct.Struct("<h2xi32s4s32s256shhiii16s20s")
USER_PROCESS, DEAD_PROCESS, LOGIN_PROCESS = 7, 8, 6


def utmp_record(ut_type: int, user: str, line: str = "pts/0", pid: int = 4242) -> bytes:
    now = int(time.time())
    return UTMP.pack(
        ut_type,
        pid,
        line.encode(),
        line[-4:].encode(),
        user.encode(),
        b"10.0.0.9",
        0,
        0,
        pid,
        now,
        0,
        b"",
        b"",
    )


def write_utmp(path: Path, records: list[bytes]) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(b"".join(records))
    tmp.replace(path)


def wait_for(what: str, fn: Callable[[], T | None], timeout: float = 8.0, step: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


@dataclass
class Post:
    path: str
    authorization: str | None
    body: dict[str, Any]
    at: float


@dataclass
class Api:
    """A real HTTP server standing in for the controller: records every request it gets."""

    status: int = 200
    posts: list[Post] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> Api:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with api.lock:
                    status = api.status
                    if status == 200:
                        api.posts.append(
                            Post(
                                self.path,
                                self.headers.get("Authorization"),
                                json.loads(raw),
                                time.time(),
                            )
                        )
                payload = (
                    b'{"ok": true}' if status == 200 else b'{"detail": "controller unavailable"}'
                )
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def for_vm(self, vm: str) -> list[Post]:
        with self.lock:
            return [p for p in self.posts if p.path == f"/api/v1/vms/{vm}/context/guest"]

    def all(self) -> list[Post]:
        with self.lock:
            return list(self.posts)

    def set_status(self, status: int) -> None:
        with self.lock:
            self.status = status


class Proc:
    """A real `python -m MODULE --config FILE` process, with its output kept in a file."""

    def __init__(
        self,
        module: str,
        config: dict[str, Any],
        workdir: Path,
        name: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"{name}.log"
        self.module, self.env = module, env or {}
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        env = {**os.environ, "PYTHONPATH": str(REPO), **self.env}
        with self.log_path.open("ab") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", self.module, "--config", str(self.config_path)],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def terminate(self, timeout: float = 10.0) -> int:
        assert self.popen is not None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout)

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def send_lines(path: str, lines: list[bytes], pause: float = 0.0) -> None:
    """A raw client on a VM's channel, as a (misbehaving) guest would be."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        for line in lines:
            sock.sendall(line if line.endswith(b"\n") else line + b"\n")
            if pause:
                time.sleep(pause)
        time.sleep(0.2)  # let the relay read before we close


def msg(seq: int, context: dict[str, Any], kind: str = "report", **extra: Any) -> bytes:
    return json.dumps(
        {"seq": seq, "kind": kind, "sent_at": time.time(), "context": context, **extra}
    ).encode()


def read_status(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class LineServer:
    """A plain unix-socket listener that keeps every JSON line it gets (a relay's bare stand-in)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lines: list[dict[str, Any]] = []
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.conns.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        with conn.makefile("rb") as stream:
            try:
                for raw in stream:
                    with self.lock:
                        self.lines.append(json.loads(raw))
            except (OSError, ValueError):
                return

    def messages(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.lines)

    def close(self) -> None:
        """Go away like a dying relay: the listener and every connection."""
        self.sock.close()
        with self.lock:
            for conn in self.conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
        os.unlink(self.path)
