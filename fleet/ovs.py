"""A private Open vSwitch for a simulation: ovsdb-server and ovs-vswitchd in the root network
namespace (where Mininet puts switch interfaces), with their own run directory.

Mininet's OVSSwitch runs plain `ovs-vsctl`; `OVS_RUNDIR`/`OVS_DBDIR` (set in `env()`, and in
os.environ while the fleet runs) point it at this instance, never at a system OVS.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
TOOLS = ("ovsdb-tool", "ovsdb-server", "ovs-vswitchd", "ovs-vsctl", "ovs-ofctl", "ovs-appctl",
         "mnexec", "ip", "ethtool", "ping", "ifconfig")


def which(name: str) -> str | None:
    """Path of a tool, also in the sbin directories a non-login PATH may lack."""
    extra = os.pathsep.join(("/usr/sbin", "/sbin", "/usr/local/sbin"))
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + extra)


def unavailable_reason() -> str | None:
    """Why a simulation cannot run on this machine, or None when it can."""
    if os.geteuid() != 0:
        return "Mininet simulations need root (network namespaces, veth pairs, ovs-vswitchd)"
    missing = [tool for tool in TOOLS if which(tool) is None]
    if missing:
        return f"Mininet simulations need these tools, not installed: {', '.join(missing)}"
    if not SCHEMA.is_file():
        return f"Mininet simulations need {SCHEMA} (package openvswitch-common)"
    try:
        import mininet.net  # noqa: F401  (the real Mininet, from the venv)
    except ImportError:
        return "Mininet simulations need the mininet Python package (pip install -e '.[dev]')"
    return None


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 30) -> str:
    """Run a command; raise with its stderr when it fails."""
    proc = subprocess.run([which(cmd[0]) or cmd[0], *cmd[1:]], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


@dataclass(frozen=True)
class PrivateOvs:
    """The daemons' files all live in `dir` (short: unix socket paths are limited to 108 bytes)."""

    dir: Path

    @property
    def db_sock(self) -> Path:
        return self.dir / "db.sock"

    def env(self) -> dict[str, str]:
        return {"OVS_RUNDIR": str(self.dir), "OVS_DBDIR": str(self.dir), "OVS_LOGDIR": str(self.dir),
                "OVS_SYSCONFDIR": str(self.dir)}

    def _daemon_env(self) -> dict[str, str]:
        return {**os.environ, **self.env()}

    def start(self) -> None:
        db = self.dir / "conf.db"
        db.unlink(missing_ok=True)  # a kept run directory: start from an empty database
        run(["ovsdb-tool", "create", str(db), str(SCHEMA)], env=self._daemon_env())
        run(["ovsdb-server", str(db), f"--remote=punix:{self.db_sock}", "--pidfile", "--detach",
             "--no-chdir", "--log-file", "-vconsole:off"], env=self._daemon_env())
        self.vsctl("--no-wait", "init")
        self.start_vswitchd()

    def start_vswitchd(self) -> None:
        run(["ovs-vswitchd", f"unix:{self.db_sock}", "--pidfile", "--detach", "--no-chdir",
             "--log-file", "-vconsole:off"], env=self._daemon_env())

    def stop_vswitchd(self) -> None:
        """Stop ovs-vswitchd as a crash or an upgrade would: bridges stay in the database."""
        self._kill("ovs-vswitchd")

    def stop(self) -> None:
        for daemon in ("ovs-vswitchd", "ovsdb-server"):
            self._kill(daemon)

    def _kill(self, daemon: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.dir / f"{daemon}.pid").read_text().strip())
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not Path(f"/proc/{pid}").exists() or _zombie(pid):
                    return
                time.sleep(0.05)
            os.kill(pid, signal.SIGKILL)

    def vsctl(self, *args: str) -> str:
        return run(["ovs-vsctl", f"--db=unix:{self.db_sock}", "--timeout=20", *args],
                   env=self._daemon_env())

    def ofctl(self, *args: str) -> str:
        return run(["ovs-ofctl", "-O", "OpenFlow14", *args], env=self._daemon_env())

    def dump_flows(self, bridge: str) -> list[str]:
        out = self.ofctl("dump-flows", f"unix:{self.dir / bridge}.mgmt", "--no-stats")
        return [line.strip() for line in out.splitlines() if "cookie=" in line]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return True
