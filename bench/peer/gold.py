"""The Goldilocks side: the real controller (`goldilocks run --config`) on a private OVS.

The workload becomes a scenario file that seeds an empty SQLite database; the controller runs
inside the sandbox's network namespace (where ovs-vswitchd is), and this process talks to its
REST API from inside that namespace too (`common.netns`). VM ports carry libvirt's
external_ids (`vm-id`, `attached-mac`, `iface-id`), so the controller binds them from OVSDB.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from bench.peer.common import (
    BenchError,
    BridgeWatch,
    FlowCount,
    FlowCounter,
    Summary,
    TcpListeners,
    echo_round_trip,
    flow_count,
    flow_lines,
    netns,
    plug_ports,
    poll,
    ports_bound,
    rss_kib,
    settle,
    traffic_check,
)
from bench.peer.engine import engine_split
from bench.peer.throughput import bundle_floor
from bench.peer.workload import Vm, Workload
from controller.client import ApiError, Client
from controller.scenario import default_vm_uuid
from fleet.control import free_port
from tests.ovs.harness import OvsSandbox

ROOT = Path(__file__).resolve().parents[2]
# The command an operator runs: the console script of this interpreter's environment.
GOLDILOCKS = Path(sys.executable).parent / "goldilocks"
BRIDGE = "glpeer"
HYPERVISOR = "hv1"
DPID = 1
PARKED = "tcp:127.0.0.1:1"  # a controller target nothing listens on (tcpmux): see GoldLab.boot
TOKEN = "bench-peer-admin-token-0123456789abcdef"
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_FLOW_MODS = re.compile(r"with (\d+) flow mods")
# A change already on the bridge with no flow event this long after it: the monitor missed it
# (seen once in many runs, at N=2000). The repetition is repeated, at most this many times.
MISSED_S = 30.0
MAX_MISSED = 3


def _ids(vm: Vm) -> dict[str, str]:
    """libvirt's external_ids for the VM's vNIC (the scenario gives the VM its default uuid)."""
    return {"iface-id": vm.name, "attached-mac": vm.mac, "vm-id": default_vm_uuid(vm.name)}


@dataclass(frozen=True)
class Marker:
    """One flow a change adds (or removes): its presence on the bridge marks the change's bundle."""

    line: str
    match: str
    present: bool
    count: int  # flows on the bridge once the change is in

    @staticmethod
    def of(before: frozenset[str], after: frozenset[str]) -> Marker:
        added, removed = sorted(after - before), sorted(before - after)
        if not added and not removed:
            raise BenchError("the change changed no flow")
        line = (added or removed)[0]
        cookie = re.search(r"cookie=(0x[0-9a-f]+)", line)
        table = re.search(r"table=(\d+)", line)
        match = f"table={table.group(1) if table else 0},cookie={cookie.group(1) if cookie else '0'}/-1"
        return Marker(line, match, bool(added), len(after))


class GoldLab:
    """One `goldilocks run` process, its config, database and log, on a sandbox bridge."""

    def __init__(self, ovs: OvsSandbox, workload: Workload) -> None:
        self.ovs, self.workload = ovs, workload
        self.dir = ovs.dir / "goldilocks"
        self.dir.mkdir()
        self.of_port, self.api_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.database = 0  # which database file the next start uses
        self.log_path = self.dir / "controller-0.log"
        self.client = Client(f"http://127.0.0.1:{self.api_port}", TOKEN)
        self.scenario = self.dir / "scenario.yaml"
        self.scenario.write_text(yaml.safe_dump(workload.goldilocks_scenario(HYPERVISOR, DPID), sort_keys=False))
        self.ports: dict[str, Any] = {}

    def set_up(self) -> None:
        self.ovs.add_bridge(BRIDGE, dpid=DPID, protocols="OpenFlow14")
        self.set_controller()
        self.ports = plug_ports(self.ovs, BRIDGE, self.workload, _ids)
        poll("every port to get its ofport", lambda: ports_bound(self.ovs, self.workload), every=0.05)

    def set_controller(self) -> None:
        self.ovs.vsctl("set-controller", BRIDGE, f"tcp:127.0.0.1:{self.of_port}", "--", "set", "Controller", BRIDGE,
                       "connection-mode=out-of-band", "max_backoff=1000")

    def _config(self) -> Path:
        """The configuration of the database in use: one file per database, written once, as an
        operator's stays put between restarts (its restore plan is kept beside it)."""
        path = self.dir / f"goldilocks-{self.database}.yaml"
        if path.exists():
            return path
        path.write_text(yaml.safe_dump({
            "scenario": str(self.scenario),
            "database": f"sqlite:///{self.dir / f'goldilocks-{self.database}.db'}",
            "api": {"listen": "127.0.0.1", "port": self.api_port},
            "openflow": {"listen": "127.0.0.1", "port": self.of_port},
            "hypervisors": {HYPERVISOR: {"ovsdb": f"unix:{self.ovs.db_sock}", "bridge": BRIDGE}},
            "log_level": "INFO"}))
        return path

    def start(self, fresh: bool = True) -> tuple[float, float]:
        """Start the controller on a fresh, empty database (or the last one); the wall-clock and
        monotonic times it started (before the process is spawned, as ovn.py times ovn-controller)."""
        self.starts += 1
        self.database += fresh
        self.log_path = self.dir / f"controller-{self.starts}.log"
        config = self._config()
        began = time.time(), time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(["ip", "netns", "exec", self.ovs.netns, str(GOLDILOCKS),
                                          "run", "--config", str(config)], cwd=ROOT,
                                         env={**os.environ, "GOLDILOCKS_ADMIN_TOKEN": TOKEN},
                                         stdout=log, stderr=subprocess.STDOUT)
        return began

    def boot(self, fresh: bool = True, target: int | None = None,
             count: Callable[[], int] | None = None) -> tuple[float, float, float, float | None]:
        """(Re)start the controller from nothing: killed, the bridge emptied and its controller
        target parked on a dead address until the OpenFlow listener is up, then given back at
        once, as a switch already retrying would connect (OVS would otherwise wait out its
        reconnect backoff). Parked, not removed: OVS flushes a bridge's flows whenever it goes
        from no controller to one (connmgr_set_controllers), which would wipe what the starting
        controller has already put back (controller/warmstart.py).
        Returns the start's wall-clock and monotonic times, the seconds to listening and, given
        a `target` flow count, the seconds until the bridge first held that many flows, which
        may come before the listener when a flow snapshot is restored (counted by `count`, by
        default `ovs-ofctl dump-aggregate`)."""
        self.kill()
        self.ovs.vsctl("set-controller", BRIDGE, PARKED)
        self.ovs.del_flows(BRIDGE)
        with TcpListeners(self.ovs.netns) as listeners:  # the killed controller's listener is gone
            wall, start = self.start(fresh)
            up, full = self._wait_up(listeners, start, target, count)
        return wall, start, up, full

    def _wait_up(self, listeners: TcpListeners, start: float, target: int | None,
                 count: Callable[[], int] | None) -> tuple[float, float | None]:
        up: float | None = None
        full: float | None = None

        def both() -> bool:
            nonlocal up, full
            if up is None and listeners.listening(self.of_port):
                up = time.monotonic() - start
                self.set_controller()
            if full is None and target is not None and (count or self.count)() == target:
                full = time.monotonic() - start
            return up is not None and (target is None or full is not None)

        poll("the OpenFlow listener" + (f" and {target} flows" if target is not None else ""), self.alive(both),
             every=0.005)
        assert up is not None
        return up, full

    def alive(self, check: Callable[[], bool]) -> Callable[[], bool]:
        """`check`, failing the run at once if the controller process has exited."""
        def checked() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchError(f"the controller exited ({self.proc.returncode}):\n{self.log()[-2000:]}")
            return check()

        return checked

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_times(self, pattern: str, after: float) -> list[float]:
        """Wall-clock times of this run's log lines containing `pattern`, at or after `after`."""
        return [t for t, _ in self.log_lines(pattern, after)]

    def log_lines(self, pattern: str, after: float) -> list[tuple[float, str]]:
        """(wall-clock time, line) of this run's log lines containing `pattern`, at or after `after`."""
        out = []
        for line in self.log().splitlines():
            stamp = _LOG_TIME.match(line)
            if stamp and pattern in line:
                t = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                if t >= after - 0.001:
                    out.append((t, line))
        return out

    def snapshot_stored(self) -> None:
        """Wait for the running controller to have stored its bridge's flow snapshot."""
        poll("the bridge's flow snapshot", self.alive(lambda: f"flow snapshot of {HYPERVISOR} stored" in self.log()),
             every=0.02)

    def synced_since(self, wall: float) -> None:
        """Wait for the log's first "in sync" line at or after `wall`."""
        poll("the bridge in sync", self.alive(lambda: bool(self.log_times("in sync", wall))), every=0.02)

    def api(self, method: str, path: str, body: Any = None) -> Any:
        with netns(self.ovs.netns):
            return self.client.request(method, path, body)

    def api_up(self) -> bool:
        try:
            self.api("GET", "/health")
            return True
        except ApiError as exc:
            if exc.status:
                raise
            return False

    def ready(self) -> None:
        """Wait for the API, then use a generated operator token: the bootstrap admin token is
        one the operator chose, so every request would verify it with scrypt (~100 ms here)."""
        self.client = Client(self.client.base, TOKEN)
        poll("the API", self.alive(self.api_up), every=0.05)
        made = self.api("POST", "/tokens", {"name": f"bench-operator-{self.starts}", "role": "operator"})
        self.client = Client(self.client.base, made["token"])

    def publish(self, document: dict[str, Any]) -> None:
        self.api("PUT", "/policy/draft", {"document": document})
        self.api("POST", "/policy/draft/publish")

    def settled(self, change: Callable[[], None]) -> frozenset[str]:
        """Make `change`, wait for the bridge to be in sync after it, then for its flows to settle."""
        wall = time.time()
        change()
        self.synced_since(wall)
        return settle("the bridge after the change", self.lines)

    def count(self) -> int:
        return flow_count(self.ovs, BRIDGE)

    def lines(self) -> frozenset[str]:
        return frozenset(flow_lines(self.ovs, BRIDGE))

    def marked(self, marker: Marker) -> bool:
        return (marker.line in flow_lines(self.ovs, BRIDGE, marker.match)) == marker.present \
            and self.count() == marker.count


# ---- the measurements


@dataclass(frozen=True)
class Change:
    """A change made through the API, and how to undo it (`prepare` runs untimed first)."""

    apply: Callable[[], None]
    revert: Callable[[], None]
    prepare: Callable[[], None] = lambda: None
    prepare_revert: Callable[[], None] = lambda: None


def learn(lab: GoldLab, change: Change) -> tuple[Marker, Marker]:
    """Make the change and undo it once, untimed: the marker flow of each direction."""
    before = lab.lines()
    change.prepare()
    after = lab.settled(change.apply)
    change.prepare_revert()
    back = lab.settled(change.revert)
    if back != before:
        raise BenchError("the bridge differs after a change and its undo")
    return Marker.of(before, after), Marker.of(after, before)


def timed_change(lab: GoldLab, change: Change, reps: int) -> dict[str, Any]:
    """Each repetition: API call(s) → the change's last flow event on the bridge (confirmed by
    the marker flow and the flow count); the log splits it into API, bundle sent and in sync."""
    # The monitor starts before the warm-up: OVS 3.1 did not report to a monitor opened after
    # the warm-up the first re-add of the flows the warm-up had added and deleted (at N=2,000,
    # every time; bench/README.md). Events before a repetition's start are not counted.
    watch = BridgeWatch(lab.ovs, BRIDGE)
    total, api, bundle, in_sync, flow_mods = [], [], [], [], []
    missed: list[str] = []

    def undo() -> None:
        change.prepare_revert()
        change.revert()
        poll("the undo on the bridge", lab.alive(lambda: lab.marked(back)))

    try:
        forward, back = learn(lab, change)
        while len(total) < reps:
            change.prepare()
            wall, start = time.time(), time.monotonic()
            change.apply()
            took = time.monotonic() - start
            try:
                last = watch.wait_quiet(start, timeout=MISSED_S)
            except BenchError:
                if not lab.marked(forward) or len(missed) >= MAX_MISSED:
                    raise
                # On the bridge, yet not one event from the monitor: this repetition cannot be
                # timed. Say so, undo it, and repeat it under a new monitor (started before the
                # undo, as above).
                missed.append(watch.state())
                log_missed(missed[-1])
                watch.close()
                watch = BridgeWatch(lab.ovs, BRIDGE)
                undo()
                continue
            api.append(took)
            if not lab.marked(forward):  # the burst was not the whole change: wait for it, count that
                last = poll("the change on the bridge", lab.alive(lambda: lab.marked(forward)))
            total.append(last - start)
            sent = lab.log_lines(": bundle ", wall)[:1]
            bundle += [t - wall for t, _ in sent]
            flow_mods += [int(m.group(1)) for _, line in sent if (m := _FLOW_MODS.search(line))]
            in_sync += [t - wall for t in lab.log_times("in sync", wall)[:1]]
            undo()
    finally:
        watch.close()
    out: dict[str, Any] = Summary.of(total).ms()
    if missed:
        out["monitor_missed"] = missed
    out["api_median_ms"] = round(Summary.of(api).median * 1000, 1)
    for key, values in (("bundle_sent_median_ms", bundle), ("in_sync_median_ms", in_sync)):
        if values:
            out[key] = round(Summary.of(values).median * 1000, 1)
    if flow_mods:
        out["flow_mods"] = int(Summary.of(flow_mods).median)
    return out


def log_missed(state: str) -> None:
    print(f"goldilocks: a change reached the bridge but its flow monitor reported nothing ({state}); "
          "repeating it", file=sys.stderr, flush=True)


def cold_start(lab: GoldLab, target: int, reps: int, fresh: bool = True) -> dict[str, Any]:
    """Process start (fresh database, emptied bridge) → all `target` flows installed.

    The bridge gets its controller target back the moment the OpenFlow listener is up, as a
    switch already retrying would connect (OVS would otherwise wait out its reconnect backoff;
    the bridge is empty, so OVS's flush on a first controller costs nothing)."""
    full, boot, connect, ready, install, restored, in_sync = [], [], [], [], [], [], []
    with FlowCounter(lab.ovs, BRIDGE) as counter:
        for _ in range(reps):
            if not fresh:  # a controller that has run a while has stored its bridge's flow snapshot
                lab.snapshot_stored()
            wall, _, up, done = lab.boot(fresh, target, counter.count)
            boot.append(up)
            assert done is not None
            full.append(done)
            lab.synced_since(wall)
            connect += [t - wall for t in lab.log_times("connected", wall)[:1]]
            dumping, synced = lab.log_times(": dumping", wall)[:1], lab.log_times("in sync", wall)[:1]
            ready += [t - wall for t in dumping]
            install += [b - a for a, b in zip(dumping, synced, strict=False)]
            restored += [t - wall for t in lab.log_times(": restored ", wall)[:1]]
            in_sync += [t - wall for t in synced]
    database = "empty database seeded from the scenario" if fresh else "the database of the run before"
    out: dict[str, Any] = {**Summary.of(full).ms(), "what": f"goldilocks run started ({database}, bridge emptied) → "
                           "all flows on the bridge", "restored_from_snapshot": len(restored)}
    for key, values in (("start_to_listening", boot), ("start_to_switch_connected", connect),
                        ("start_to_first_dump", ready), ("install", install), ("start_to_restored", restored),
                        ("start_to_in_sync", in_sync)):
        if values:
            out[f"{key}_median_ms"] = round(Summary.of(values).median * 1000, 1)
    return out


def measure(workload: Workload, reps: int, log: Any = print) -> dict[str, Any]:
    """Set up, measure and tear down Goldilocks for one workload; the run's figures."""
    with OvsSandbox() as ovs:
        lab = GoldLab(ovs, workload)
        try:
            began = time.monotonic()
            lab.set_up()
            wall, _, _, _ = lab.boot()
            lab.synced_since(wall)
            lab.ready()
            target = settle("the bridge", lab.count)
            log(f"goldilocks N={workload.n}: set up in {time.monotonic() - began:.1f} s, {target} flows")
            return _measure(lab, workload, target, reps, log)
        except BaseException:
            sys.stderr.write(lab.log()[-3000:])
            raise
        finally:
            lab.kill()


def _measure(lab: GoldLab, workload: Workload, target: int, reps: int, log: Any) -> dict[str, Any]:
    lines = sorted(lab.lines())
    with_policy = FlowCount.of(lines)
    floor = bundle_floor(lab.ovs, lines, reps)
    checks = traffic_check(lab.ports, workload)
    echo = echo_round_trip(lab.ovs, BRIDGE)
    assert lab.proc is not None
    rss = rss_kib(lab.proc.pid)
    cold = cold_start(lab, target, reps)
    restart = cold_start(lab, target, reps, fresh=False)
    lab.ready()
    log(f"goldilocks: cold start {cold}")
    join = timed_change(lab, tag_change(lab, workload), reps)
    log(f"goldilocks: membership {join}")
    rule = timed_change(lab, publish_change(lab, workload.goldilocks_policy(added=True), workload.goldilocks_policy()),
                        reps)
    log(f"goldilocks: rule added {rule}")
    without = len(lab.settled(lambda: lab.publish(workload.goldilocks_policy(empty=True))))
    apply = timed_change(lab, publish_change(lab, workload.goldilocks_policy(), workload.goldilocks_policy(empty=True)),
                         reps)
    log(f"goldilocks: apply policy {apply}")
    flows = {"total": with_policy.total, "conjunctive": with_policy.conjunctive, "without_policy": without,
             "policy": with_policy.total - without}
    install = {"flows": len(lines), "floor_ms": round(floor * 1000, 1), "goldilocks_ms": cold.get("install_median_ms")}
    return {"system": "goldilocks", "version": _version(), "flows": flows, "cold_start": cold, "restart": restart,
            "install": install, "switch_echo": echo, "membership_change": join, "rule_added": rule, "apply_policy": apply,
            "rss_kib": {"total": rss, "controller": rss},
            "engine_in_process": engine_split(workload, HYPERVISOR, DPID, reps),
            "traffic": [c.__dict__ for c in checks], "traffic_ok": all(c.held for c in checks)}


def tag_change(lab: GoldLab, workload: Workload) -> Change:
    """The groupless VM gets the tier tag that makes it a member (`PUT /vms/{vm}/tags`), and loses it."""
    path = f"/vms/{workload.joiner.name}/tags"
    return Change(lambda: lab.api("PUT", path, {"tags": {"tier": workload.join_tier}}),
                  lambda: lab.api("PUT", path, {"tags": {}}))


def publish_change(lab: GoldLab, document: dict[str, Any], undo: dict[str, Any]) -> Change:
    """A policy published (the draft written untimed first), and the policy before it published back."""
    return Change(lambda: lab.api("POST", "/policy/draft/publish"), lambda: lab.api("POST", "/policy/draft/publish"),
                  prepare=lambda: lab.api("PUT", "/policy/draft", {"document": document}),
                  prepare_revert=lambda: lab.api("PUT", "/policy/draft", {"document": undo}))


def _version() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    return f"goldilocks {done.stdout.strip() or 'unknown'} (+ working tree)"
