"""The Goldilocks controller for a simulation: started here (`goldilocks run`, SQLite in the run
directory), or given by address. Either way the runner talks to it through its REST API."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from controller.client import ApiError, Client

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(what: str, check: Callable[[], bool], timeout: float = 30.0, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


@dataclass(frozen=True)
class HypervisorLink:
    """How the controller reaches one hypervisor's OVSDB and which bridge and uplink are its."""

    ovsdb: str
    bridge: str
    uplink: str


@dataclass
class Controller:
    """A `goldilocks run` process, or (`managed=False`) one someone else runs."""

    run_dir: Path
    openflow: tuple[str, int]
    api_url: str
    token: str
    managed: bool = True
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _log: Path | None = field(default=None, repr=False)

    @staticmethod
    def local(run_dir: Path, api_port: int | None = None) -> Controller:
        port = api_port or free_port()
        return Controller(run_dir, ("127.0.0.1", free_port()), f"http://127.0.0.1:{port}",
                          "sim-" + secrets.token_hex(16))

    @staticmethod
    def remote(address: str, api_url: str, token: str, run_dir: Path) -> Controller:
        host, _, port = address.rpartition(":")
        return Controller(run_dir, (host or "127.0.0.1", int(port)), api_url.rstrip("/"), token, managed=False)

    @property
    def client(self) -> Client:
        return Client(self.api_url, self.token)

    @property
    def database(self) -> Path:
        return self.run_dir / "goldilocks.db"

    def write_config(self, world: Path, hypervisors: dict[str, HypervisorLink]) -> Path:
        api_port = int(self.api_url.rsplit(":", 1)[1])
        path = self.run_dir / "goldilocks.yaml"
        path.write_text(yaml.safe_dump({
            "scenario": str(world),
            "database": f"sqlite:///{self.database}",
            "api": {"listen": "127.0.0.1", "port": api_port},
            "openflow": {"listen": self.openflow[0], "port": self.openflow[1]},
            "hypervisors": {name: {"ovsdb": link.ovsdb, "bridge": link.bridge, "uplinks": [link.uplink]}
                            for name, link in hypervisors.items()},
            "log_level": "INFO",
        }, sort_keys=False))
        return path

    def start(self) -> None:
        if not self.managed:
            return
        self.starts += 1
        self._log = self.run_dir / f"controller-{self.starts}.log"
        with open(self._log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "controller.cli", "run", "--config", str(self.run_dir / "goldilocks.yaml")],
                cwd=ROOT, env={**os.environ, "GOLDILOCKS_ADMIN_TOKEN": self.token},
                stdout=log, stderr=subprocess.STDOUT)
        wait_for("the controller's API", self.healthy, timeout=60)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self, sig: int = signal.SIGKILL) -> None:
        if not self.managed:
            raise RuntimeError("cannot restart a controller this simulation did not start")
        self.stop(sig)
        self.start()

    def log(self) -> str:
        return self._log.read_text(errors="replace") if self._log and self._log.exists() else ""

    def healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"the controller exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
        try:
            return self.call("GET", "/health").get("status") == "ok"
        except ApiError:
            return False

    def in_sync(self, hypervisors: list[str]) -> bool:
        try:
            status = self.call("GET", "/status")
        except ApiError as exc:
            if exc.status in (401, 403):  # waiting would not help: a wrong token
                raise RuntimeError(f"the controller at {self.api_url} refuses the token: {exc}") from None
            return False
        states = {b["hypervisor"]: (b["connected"], b["state"]) for b in status["hypervisors"]}
        return all(states.get(hv) == (True, "in_sync") for hv in hypervisors)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        return self.client.request(method, path, body)
