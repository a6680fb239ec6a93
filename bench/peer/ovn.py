"""The OVN side: NB and SB ovsdb-servers, ovn-northd and ovn-controller, all private.

Every daemon runs from a directory inside the OvsSandbox's own (unix sockets only, pidfiles,
logs), ovn-controller inside the sandbox's network namespace with OVN_RUNDIR and OVS_RUNDIR
pointing there; br-int is a netdev bridge of that sandbox. Nothing reads or writes
/var/run/ovn, /etc/ovn or a system OVS. `stop()` kills every daemon it started, by pid.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.peer import common
from bench.peer.workload import Vm, Workload
from tests.ovs.harness import OvsSandbox, _read_pid, _run, _wait_gone, find_tool

NB_SCHEMA = Path("/usr/share/ovn/ovn-nb.ovsschema")
SB_SCHEMA = Path("/usr/share/ovn/ovn-sb.ovsschema")
TOOLS = ("ovn-northd", "ovn-controller", "ovn-nbctl", "ovn-sbctl", "ovn-appctl")
BRIDGE = "br-int"
SWITCH = "ls0"
CHASSIS = "gl-peer-hv1"
COMMANDS_PER_CALL = 600
DAEMONS = ("ovsdb-nb", "ovsdb-sb", "ovn-northd", "ovn-controller")


def missing() -> list[str]:
    """OVN tools or schemas this machine lacks (package ovn-central, ovn-host)."""
    out = [t for t in TOOLS if find_tool(t) is None]
    return out + [str(s) for s in (NB_SCHEMA, SB_SCHEMA) if not s.is_file()]


@dataclass(frozen=True)
class WaitTime:
    """One `ovn-nbctl --wait=hv --print-wait-time` change: wall time and its split."""

    wall: float
    northd: float | None
    controller: float | None
    bridge: float | None = None  # the change's last flow event on br-int (ovs-ofctl monitor)


_WAIT_LINE = re.compile(r"^\s*(ovn-northd delay before processing|ovn-northd completion|ovn-controller\(s\) completion):\s*(\d+)ms")


def parse_wait_time(text: str, wall: float) -> WaitTime:
    got = {m.group(1): int(m.group(2)) / 1000 for line in text.splitlines() if (m := _WAIT_LINE.match(line))}
    northd = got.get("ovn-northd completion")
    controller = got.get("ovn-controller(s) completion")
    return WaitTime(wall, northd, None if controller is None or northd is None else controller - northd)


class OvnLab:
    """NB/SB/northd/controller next to an OvsSandbox (which it does not own)."""

    def __init__(self, ovs: OvsSandbox) -> None:
        self.ovs = ovs
        self.dir = ovs.dir / "ovn"
        self.dir.mkdir()
        self.nb = f"unix:{self.dir / 'nb.sock'}"
        self.sb = f"unix:{self.dir / 'sb.sock'}"
        self.env = {**ovs.env, "OVN_RUNDIR": str(self.dir), "OVN_LOGDIR": str(self.dir), "OVN_DBDIR": str(self.dir)}
        self.ports: dict[str, Any] = {}

    # ---- daemons

    def start(self) -> None:
        for name, schema, sock in (("nb", NB_SCHEMA, self.nb), ("sb", SB_SCHEMA, self.sb)):
            db = self.dir / f"{name}.db"
            _run(["ovsdb-tool", "create", str(db), str(schema)], env=self.env)
            _run(["ovsdb-server", str(db), f"--remote=p{sock}", f"--pidfile={self.dir / f'ovsdb-{name}.pid'}",
                  f"--unixctl={self.dir / f'ovsdb-{name}.ctl'}", f"--log-file={self.dir / f'ovsdb-{name}.log'}",
                  "--detach", "--no-chdir", "-vconsole:off"], env=self.env)
        _run(["ovn-northd", f"--ovnnb-db={self.nb}", f"--ovnsb-db={self.sb}",
              f"--pidfile={self.dir / 'ovn-northd.pid'}", f"--unixctl={self.dir / 'ovn-northd.ctl'}",
              f"--log-file={self.dir / 'ovn-northd.log'}", "--detach", "--no-chdir", "-vconsole:off"], env=self.env)
        self.nbctl(["init"])
        self.ovs.add_bridge(BRIDGE, protocols="OpenFlow10,OpenFlow13,OpenFlow14,OpenFlow15")
        self.ovs.vsctl("set", "Open_vSwitch", ".", f"external_ids:system-id={CHASSIS}",
                       f"external_ids:ovn-remote={self.sb}", "external_ids:ovn-encap-type=geneve",
                       "external_ids:ovn-encap-ip=127.0.0.1", f"external_ids:ovn-bridge={BRIDGE}",
                       "external_ids:ovn-bridge-datapath-type=netdev")
        self.start_controller()

    def start_controller(self) -> None:
        _run(["ip", "netns", "exec", self.ovs.netns, find_tool("ovn-controller") or "ovn-controller",
              f"unix:{self.ovs.db_sock}", f"--pidfile={self.dir / 'ovn-controller.pid'}",
              f"--log-file={self.dir / 'ovn-controller.log'}", "--detach", "--no-chdir", "-vconsole:off"],
             env=self.env)

    def kill_controller(self) -> None:
        pid = self.pid("ovn-controller")
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 5.0)
        (self.dir / "ovn-controller.pid").unlink(missing_ok=True)

    def pid(self, daemon: str) -> int | None:
        return _read_pid(self.dir / f"{daemon}.pid")

    def stop(self) -> None:
        """Kill every daemon this lab started (by its pidfile), controller first."""
        for daemon in reversed(DAEMONS):
            pid = self.pid(daemon)
            if pid is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not _wait_gone(pid, 3.0):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 3.0)

    def log_tails(self, lines: int = 12) -> str:
        """The last lines of each OVN daemon's log: what a failed step leaves to go on."""
        out = []
        for daemon in DAEMONS:
            path = self.dir / f"{daemon}.log"
            tail = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else ["(no log)"]
            out += [f"--- {daemon}.log", *tail]
        return "\n".join(out)

    def rss(self) -> dict[str, int]:
        return {d: common.rss_kib(pid) for d in DAEMONS if (pid := self.pid(d)) is not None}

    # ---- tools

    def nbctl(self, cmd: Sequence[str], *opts: str, timeout: float = 300.0) -> str:
        tool = find_tool("ovn-nbctl") or "ovn-nbctl"
        done = subprocess.run([tool, f"--db={self.nb}", f"--timeout={int(timeout)}", *opts, *cmd], env=self.env,
                              capture_output=True, text=True, timeout=timeout + 10, check=False)
        if done.returncode != 0:
            raise common.BenchError(f"ovn-nbctl {' '.join(cmd[:3])} ... failed: {done.stderr.strip()[-500:]}")
        return done.stdout

    def batch(self, commands: Sequence[Sequence[str]], *opts: str) -> str:
        """Commands in as few ovn-nbctl transactions as the argument list allows."""
        out = []
        for start in range(0, len(commands), COMMANDS_PER_CALL):
            args: list[str] = []
            for cmd in commands[start:start + COMMANDS_PER_CALL]:
                args += ["--", *cmd]
            out.append(self.nbctl(args[1:], *opts))
        return "".join(out)

    def timed(self, commands: Sequence[Sequence[str]]) -> WaitTime:
        """One transaction with --wait=hv --print-wait-time, timed."""
        args: list[str] = []
        for cmd in commands:
            args += ["--", *cmd]
        start = time.monotonic()
        out = self.nbctl(args[1:], "--wait=hv", "--print-wait-time")
        return parse_wait_time(out, time.monotonic() - start)

    def flows(self) -> common.FlowCount:
        return common.FlowCount.of(common.flow_lines(self.ovs, BRIDGE))

    def count(self) -> int:
        return common.flow_count(self.ovs, BRIDGE)


# ---- the measurements


def _ids(vm: Vm) -> dict[str, str]:
    return {"iface-id": vm.name, "attached-mac": vm.mac}


def set_up(lab: OvnLab, workload: Workload) -> None:
    lab.start()
    lab.batch(workload.ovn_topology(SWITCH))
    lab.ports = common.plug_ports(lab.ovs, BRIDGE, workload, _ids)
    common.poll("every port to get its ofport", lambda: common.ports_bound(lab.ovs, workload), every=0.05)
    lab.batch(workload.ovn_acls())
    lab.nbctl(["sync"], "--wait=hv")


def _acl_clear(workload: Workload) -> list[list[str]]:
    return [["acl-del", pg] for pg in workload.ovn_acl_groups()]


def cold_restart(lab: OvnLab, target: int, reps: int) -> tuple[list[float], list[float]]:
    """ovn-controller killed, br-int emptied, restarted → `target` flows; and → first flow."""
    full, first = [], []
    with common.FlowCounter(lab.ovs, BRIDGE) as counter:  # as bench/peer/gold.py counts its restarts
        for _ in range(reps):
            lab.kill_controller()
            lab.ovs.del_flows(BRIDGE)
            start = time.monotonic()
            lab.start_controller()
            first.append(common.poll("ovn-controller's first flow", lambda: counter.count() > 0, every=0.005) - start)
            full.append(common.poll(f"{target} flows after the restart", lambda: counter.count() == target,
                                    every=0.005) - start)
    lab.nbctl(["sync"], "--wait=hv")
    return full, first


def toggled(lab: OvnLab, apply: list[list[str]], revert: list[list[str]], reps: int) -> list[WaitTime]:
    """Each repetition: the change timed (and its last flow event on br-int), then its reverse."""
    out = []
    with common.BridgeWatch(lab.ovs, BRIDGE) as watch:
        for _ in range(reps):
            start = time.monotonic()
            timed = lab.timed(apply)
            time.sleep(0.05)  # let the monitor's reader catch up
            last = watch.last_since(start)
            out.append(replace(timed, bridge=None if last is None else last - start))
            lab.timed(revert)
    return out


def _wait_summary(times: list[WaitTime]) -> dict[str, Any]:
    out: dict[str, Any] = common.Summary.of([t.wall for t in times]).ms()
    for key in ("northd", "controller", "bridge"):
        values = [getattr(t, key) for t in times if getattr(t, key) is not None]
        if values:
            out[f"{key}_median_ms"] = round(common.Summary.of(values).median * 1000, 1)
    return out


def measure(workload: Workload, reps: int, log: Any = print) -> dict[str, Any]:
    """Set up, measure and tear down OVN for one workload; the run's figures."""
    with OvsSandbox() as ovs:
        lab = OvnLab(ovs)
        try:
            began = time.monotonic()
            set_up(lab, workload)
            target = common.settle("br-int", lab.count)
            log(f"ovn N={workload.n}: set up in {time.monotonic() - began:.1f} s, {target} flows")
            return _measure(lab, workload, target, reps, log)
        except Exception as exc:
            raise common.BenchError(f"{exc}\n{lab.log_tails()}") from exc
        finally:
            lab.stop()


def _measure(lab: OvnLab, workload: Workload, target: int, reps: int, log: Any) -> dict[str, Any]:
    with_policy = lab.flows()
    checks = common.traffic_check(lab.ports, workload)
    echo = common.echo_round_trip(lab.ovs, BRIDGE)
    rss = lab.rss()
    restart, first = cold_restart(lab, target, reps)
    log(f"ovn: cold restart {common.Summary.of(restart).median:.2f} s")
    joiner = workload.joiner
    uuid = lab.nbctl(["--bare", "--columns=_uuid", "find", "Logical_Switch_Port", f"name={joiner.name}"]).strip()
    pg = workload.pg(workload.join_tier)
    join = toggled(lab, [["add", "Port_Group", pg, "ports", uuid]], [["remove", "Port_Group", pg, "ports", uuid]], reps)
    log(f"ovn: membership {_wait_summary(join)}")
    added = workload.ovn_acls(added_only=True)
    rule = toggled(lab, added, [["acl-del", *added[0][1:5]]], reps)
    log(f"ovn: rule added {_wait_summary(rule)}")
    lab.timed(_acl_clear(workload))
    without = lab.flows()
    apply = toggled(lab, workload.ovn_acls(), _acl_clear(workload), reps)
    lab.timed(workload.ovn_acls())
    log(f"ovn: apply policy {_wait_summary(apply)}")
    cold = {**common.Summary.of(restart).ms(),
            "first_flow_median_ms": round(common.Summary.of(first).median * 1000, 1),
            "what": "ovn-controller restart (SIGKILL, br-int emptied) → all flows"}
    flows = {"total": with_policy.total, "conjunctive": with_policy.conjunctive,
             "without_policy": without.total, "policy": with_policy.total - without.total}
    return {"system": "ovn", "version": _version(), "flows": flows, "cold_start": cold, "restart": cold,
            "switch_echo": echo,
            "membership_change": _wait_summary(join), "rule_added": _wait_summary(rule),
            "apply_policy": _wait_summary(apply), "rss_kib": {"total": sum(rss.values()), **rss},
            "traffic": [c.__dict__ for c in checks], "traffic_ok": all(c.held for c in checks)}


def _version() -> str:
    out = _run(["ovn-controller", "--version"], check=False).stdout
    return (out.splitlines() or ["unknown"])[0].strip()
