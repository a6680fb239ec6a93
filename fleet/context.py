"""Living context for a simulated fleet: a relay per hypervisor (root namespace, where the
hypervisor's own services run) and an agent in every VM host, as docs/agent.md describes.

Each VM's private directory (`<run>/vms/<vm>`, mounted at /run/goldilocks inside the VM) holds
its utmp file and its agent channel; logins and logouts are utmp records written there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from agent import utmp
from fleet.control import ROOT, Controller, wait_for

Spawn = Callable[..., subprocess.Popen[bytes]]
INSIDE = "/run/goldilocks"  # the VM's view of its private directory


def utmp_entries(users: list[str], gone: list[str], now: int) -> list[utmp.Entry]:
    """A utmp file's records: a boot record, USER_PROCESS per session, DEAD_PROCESS per ended one."""
    entries = [utmp.Entry(utmp.BOOT_TIME, line="~", user="reboot", tv_sec=now - 600)]
    for i, user in enumerate([*users, *gone]):
        kind = utmp.USER_PROCESS if i < len(users) else utmp.DEAD_PROCESS
        entries.append(utmp.Entry(kind, pid=2000 + i, line=f"pts/{i}", id=f"p{i}", user=user,
                                  session=2000 + i, tv_sec=now))
    return entries


@dataclass
class Context:
    controller: Controller
    vm_dirs: Path  # <run>/vms: one private directory per VM
    where: Mapping[str, str]  # VM -> hypervisor it is plugged on now (kept current by the fleet)
    apps: tuple[str, ...]
    ttl: int = 15
    interval: float = 0.5
    users: dict[str, list[str]] = field(default_factory=dict)
    gone: dict[str, list[str]] = field(default_factory=dict)
    relays: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def vm_dir(self, vm: str) -> Path:
        return self.vm_dirs / vm

    def start(self, users: Mapping[str, list[str]], spawn: Callable[[str], Spawn], hypervisors: list[str]) -> None:
        for vm in self.where:
            self.vm_dir(vm).mkdir(parents=True, exist_ok=True)
            self.users[vm], self.gone[vm] = list(users.get(vm, [])), []
            self._write_utmp(vm)
        for hv in hypervisors:
            token = self.controller.call("POST", "/tokens", {"name": f"relay-{hv}-{time.time_ns()}",
                                                             "role": "relay", "hypervisor": hv})["token"]
            (self.vm_dirs / f"relay-{hv}.token").write_text(token)
            self.start_relay(hv)
        for vm in self.where:
            wait_for(f"{vm}'s relay socket", lambda vm=vm: (self.vm_dir(vm) / "agent.sock").exists(), 20)
            self.start_agent(vm, spawn(vm))

    def start_relay(self, hv: str) -> None:
        config = self.vm_dirs / f"relay-{hv}.yaml"
        config.write_text(yaml.safe_dump({
            "hypervisor": hv, "api": self.controller.api_url,
            "token_file": str(self.vm_dirs / f"relay-{hv}.token"),
            "vms": {vm: f"unix:{self.vm_dir(vm) / 'agent.sock'}" for vm, h in self.where.items() if h == hv},
            "ttl_seconds": self.ttl, "rate": {"per_second": 20, "burst": 40}, "log_level": "INFO",
        }))
        with open(self.vm_dirs / f"relay-{hv}.log", "ab") as log:
            self.relays[hv] = subprocess.Popen([sys.executable, "-m", "agent.relay", "--config", str(config)],
                                               cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)

    def start_agent(self, vm: str, spawn: Spawn) -> None:
        config = self.vm_dir(vm) / "agent.yaml"
        config.write_text(yaml.safe_dump({
            "channel": f"unix:{INSIDE}/agent.sock", "utmp": f"{INSIDE}/utmp",
            "interval": self.interval, "heartbeat": 2, "log_level": "INFO",
            "apps": {app: [app] for app in self.apps},
        }))
        with open(self.vm_dir(vm) / "agent.log", "ab") as log:
            self.agents[vm] = spawn([sys.executable, "-m", "agent.guest", "--config", f"{INSIDE}/agent.yaml"],
                                    cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)

    def login(self, vm: str, user: str) -> None:
        self.users[vm].append(user)
        self._write_utmp(vm)

    def logout(self, vm: str, user: str) -> None:
        if user in self.users[vm]:
            self.users[vm].remove(user)
            self.gone[vm].append(user)
        self._write_utmp(vm)

    def _write_utmp(self, vm: str) -> None:
        utmp.write_entries(self.vm_dir(vm) / "utmp", utmp_entries(self.users[vm], self.gone[vm], int(time.time())))

    def rehome(self, hypervisors: list[str]) -> None:
        """Restart these hypervisors' relays so each serves the VMs plugged on it now: a
        migrated VM's channel goes with it, and its agent reconnects to the new relay."""
        for hv in hypervisors:
            _stop(self.relays.pop(hv))
        for hv in hypervisors:
            self.start_relay(hv)

    def stop(self) -> None:
        for proc in [*self.agents.values(), *self.relays.values()]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.agents.values(), *self.relays.values()]:
            _stop(proc)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
