"""bench/install: flow-install throughput and change-to-flows latency on a real Open vSwitch.

    python -m bench.install [--quick] [--out docs/benchmarks.md]

Needs root. Starts its own OvsSandbox (tests/ovs/harness.py: private ovsdb-server + ovs-vswitchd
in their own network namespace) and tears it down. The Goldilocks side is the real os-ken app and
Service, run in a child process re-executed under `ip netns exec <netns>` (the switch's 127.0.0.1
is inside that namespace). Prints markdown and writes it into the "## bench/install" section of
the output file. No timing asserts.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import logging
import os
import pstats
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from apps import ofwire
from bench.compile import (
    Scale,
    _context_event,
    _direct_world,
    _p95,
    _tier_event,
    machine_info,
    make_directory,
    make_groups,
    make_inventory,
    make_policy,
)
from bench.compile import (
    write_section as _write_section,
)
from controller.flows.compile import compile_bridge
from controller.flows.pipeline import (
    COOKIE_PREFIX,
    COOKIE_PREFIX_MASK,
    TIER_ORDER,
    rule_cookie,
    rule_number,
)
from controller.flows.render import render_flows
from controller.flows.types import Conjunction, FlowSpec, Match
from controller.model import Hypervisor
from controller.policy.schema import Action, GroupEndpoint, Policy, Port, Rule

SECTION = "## bench/install"
ROOT = Path(__file__).resolve().parents[1]
FULL_SIZES = (1_000, 10_000, 100_000)
QUICK_SIZES = (1_000,)
LATENCY_SCALE = Scale(1_000, 100, 10)  # bench/compile's small world; hv000 is the sandbox bridge
LATENCY_HV = "hv000"
LATENCY_DPID = 1  # make_inventory gives hv000 dpid 1
UPLINK = 65000
COOKIE_MATCH = f"cookie={COOKIE_PREFIX:#x}/{COOKIE_PREFIX_MASK:#x}"


# ---- the flows -------------------------------------------------------------------------------


def compiled_flows() -> frozenset[FlowSpec]:
    """hv000 of bench/compile's small world (1k VMs / 100 rules / 10 HVs): ~3.7k real flows."""
    inventory, directory, groups = make_inventory(LATENCY_SCALE), make_directory(), make_groups()
    world = _direct_world(inventory, directory, make_policy(LATENCY_SCALE, groups), groups)
    return compile_bridge(world, LATENCY_HV, check=False)


def synthetic_clause(j: int) -> FlowSpec:
    """A table-12 conjunctive clause in Goldilocks form: rule cookie, distinct ipv4_dst."""
    rule = f"bench-syn-{j // 500}"
    n = (172 << 24) | (16 << 16) | j  # 172.16.0.0/12: never a compiled address
    ip = ".".join(str((n >> s) & 0xFF) for s in (24, 16, 8, 0))
    priority = 30_000 - 2 * (j // 500 % 1000)
    return FlowSpec(12, priority, Match.of(eth_type=0x0800, ipv4_dst=ip),
                    (Conjunction(rule_number(rule), 2, 3),), rule_cookie(rule))


def make_flows(n: int, base: frozenset[FlowSpec]) -> frozenset[FlowSpec]:
    """Exactly n distinct flows: a seeded sample of the compiled bridge, topped up with clauses."""
    ordered = sorted(base)
    if n <= len(ordered):
        return frozenset(random.Random(n).sample(ordered, n))
    out = set(ordered) | {synthetic_clause(j) for j in range(n - len(ordered))}
    assert len(out) == n and len({f.key for f in out}) == n
    return frozenset(out)


# ---- OVS tools from any process (the sandbox's sockets are files) ------------------------------


def vsctl(sandbox: Path, *args: str) -> str:
    return _tool(["ovs-vsctl", f"--db=unix:{sandbox / 'db.sock'}", "--timeout=30", *args])


def ofctl(sandbox: Path, command: str, bridge: str, *args: str) -> str:
    return _tool(["ovs-ofctl", "-O", "OpenFlow14", command, f"unix:{sandbox / (bridge + '.mgmt')}", *args])


def _tool(cmd: list[str], timeout: float = 300.0) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    return done.stdout


def goldilocks_flow_count(sandbox: Path, bridge: str) -> int:
    out = ofctl(sandbox, "dump-flows", bridge, "--no-stats", COOKIE_MATCH)
    return sum(1 for line in out.splitlines() if line.strip() and "_FLOW reply" not in line)


def add_bridge_cmd(bridge: str, dpid: int, controller: str | None = None) -> list[str]:
    """add-br with the controller set in the same transaction (OVS flushes on its first controller)."""
    cmd = ["add-br", bridge, "--", "set", "Bridge", bridge, "datapath_type=netdev", "fail_mode=secure",
           "protocols=OpenFlow14", f"other_config:datapath-id={dpid:016x}"]
    if controller:
        cmd += ["--", "set-controller", bridge, controller, "--", "set", "Controller", bridge,
                "connection-mode=out-of-band"]
    return cmd


# ---- the floor: ovs-ofctl --bundle add-flows -----------------------------------------------------


def measure_floor(sandbox: Path, sizes: tuple[int, ...], base: frozenset[FlowSpec], reps: int,
                  tmp: Path) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for n in sizes:
        path = tmp / f"flows-{n}.txt"
        path.write_text(render_flows(make_flows(n, base)))
        times, counts = [], []
        for r in range(reps if n < 100_000 else 1):
            bridge = f"glf{n // 1000}k{r}"[:15]
            vsctl(sandbox, *add_bridge_cmd(bridge, 0x200 + r))
            start = time.perf_counter()
            _tool(["ovs-ofctl", "-O", "OpenFlow14", "--bundle", "add-flows",
                   f"unix:{sandbox / (bridge + '.mgmt')}", str(path)])
            times.append(time.perf_counter() - start)
            counts.append(goldilocks_flow_count(sandbox, bridge))
            vsctl(sandbox, "del-br", bridge)
        out[n] = {"s": statistics.median(times), "n": len(times), "installed": counts}
        print(f"  floor {n:,}: {out[n]['s']:.3f} s (installed {counts})", file=sys.stderr, flush=True)
    return out


# ---- encoding alone, no switch -----------------------------------------------------------------

ENCODE_SIZE = 100_000
OSKEN_SAMPLE = 2_000  # os-ken is ~100x slower: a sample gives its per-flow cost


def measure_encode(base: frozenset[FlowSpec], reps: int = 3) -> dict[str, float]:
    """µs per flow to turn bundle adds into bytes, best of `reps`: apps/ofwire cold (caches
    cleared, as for flows never sent before) and warm (the same specs again, e.g. a reconnect),
    and the os-ken objects Goldilocks used before (ofcodec.flow_mod inside an OFPBundleAddMsg)."""
    from os_ken.ofproto import ofproto_v1_4, ofproto_v1_4_parser

    from apps.ofcodec import flow_mod
    from apps.ofwire import OF14, BundleXids, encode_staged
    from controller.flows.reconcile import diff, plan

    ops = plan(diff(make_flows(ENCODE_SIZE, base), frozenset()))
    xids = BundleXids(1, len(ops))

    def encode_all() -> float:
        start = time.perf_counter()
        for _ in encode_staged(OF14, 1, xids, ops):
            pass
        return (time.perf_counter() - start) / len(ops) * 1e6

    cold, warm = [], []
    for _ in range(reps):
        ofwire.clear_caches()
        cold.append(encode_all())
        warm.append(encode_all())
    ofwire.clear_caches()

    class Datapath:  # all os-ken's serializers read from a datapath
        ofproto, ofproto_parser = ofproto_v1_4, ofproto_v1_4_parser

    start = time.perf_counter()
    for xid, op in enumerate(ops[:: len(ops) // OSKEN_SAMPLE]):  # spread over the whole mix
        msg = ofproto_v1_4_parser.OFPBundleAddMsg(Datapath, 1, 3, flow_mod(ofproto_v1_4, ofproto_v1_4_parser, Datapath, op), [])
        msg.set_xid(xid)
        msg.serialize()
    osken = (time.perf_counter() - start) / len(ops[:: len(ops) // OSKEN_SAMPLE]) * 1e6
    return {"cold_us": min(cold), "warm_us": min(warm), "osken_us": osken, "flows": len(ops)}


class GcClock:
    """Wall time the garbage collector spends, from gc.callbacks: how much of a phase is GC."""

    def __init__(self) -> None:
        self.total, self._start = 0.0, 0.0

    def __enter__(self) -> Self:
        gc.callbacks.append(self._tick)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._tick)

    def _tick(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._start


def measure_phases(base: frozenset[FlowSpec], n: int = ENCODE_SIZE, reps: int = 3) -> dict[str, Any]:
    """The engine thread's work for one install of n flows into an empty bridge, phase by phase,
    in-process and without a switch, as runtime.py does it: diff and plan (on FlowsDumped),
    encode (apps/ofwire, cold), apply_plan (on BundleCommitted). Median of `reps`; µs per flow,
    and how much of each phase was garbage collection."""
    from apps.ofwire import OF14, BundleXids, encode_staged
    from controller.flows.reconcile import apply_plan, diff, plan
    from controller.service import GC_THRESHOLDS

    desired = make_flows(n, base)

    def encode(ops: tuple[Any, ...]) -> tuple[Any, ...]:
        for _ in encode_staged(OF14, 1, BundleXids(1, len(ops)), ops):
            pass
        return ops  # the next step reads the plan again

    steps: dict[str, Callable[[Any], Any]] = {
        "diff": lambda _: diff(desired, frozenset()),
        "plan": plan,
        "encode (apps/ofwire, cold)": encode,
        "apply_plan": lambda ops: apply_plan(frozenset(), ops),
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    saved = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)  # the GC as `goldilocks run` sets it: see controller/service.py
    gc.freeze()
    try:
        _run_phases(steps, runs, reps)
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)
    return {name: {"us": statistics.median(t for t, _ in r) / n * 1e6,
                   "gc_us": statistics.median(g for _, g in r) / n * 1e6} for name, r in runs.items()} | {"flows": n}


def _run_phases(steps: dict[str, Callable[[Any], Any]], runs: dict[str, list[tuple[float, float]]],
                reps: int) -> None:
    for _ in range(reps):
        ofwire.clear_caches()
        value: Any = None
        for name, step in steps.items():
            with GcClock() as clock:
                start = time.perf_counter()
                value = step(value)
                runs[name].append((time.perf_counter() - start, clock.total))


# ---- Goldilocks in-process: os-ken app + Service inside the namespace ------------------------------


class FixedEngine:
    """Stands in for the Engine in the throughput phase: fixed desired flows per bridge."""

    def __init__(self, bridges: dict[str, tuple[int, frozenset[FlowSpec]]]) -> None:
        self._bridges = bridges

    def desired(self, hypervisor: str) -> frozenset[FlowSpec]:
        return self._bridges[hypervisor][1]

    def hypervisor_records(self) -> dict[str, Hypervisor]:
        return {hv: Hypervisor(hv, UPLINK, dpid) for hv, (dpid, _) in self._bridges.items()}

    def hypervisors(self) -> tuple[str, ...]:
        return tuple(sorted(self._bridges))

    def handle(self, event: Any) -> list[Any]:
        return []


class Probe:
    """Timestamps of the southbound path, taken by wrapping the Service's post/_run/execute."""

    def __init__(self, service: Any, profile: cProfile.Profile | None = None) -> None:
        from controller.runtime import BundleCommitted, SyncState

        self.service = service
        self.marks: dict[str, float] = {}
        self.done = threading.Event()
        self.watch: tuple[str, Any] | None = None  # (hypervisor, the posted event or None)
        self._committed, self._in_sync = BundleCommitted, SyncState.IN_SYNC
        post, run, self._profile = service.post, service._run, profile

        def hooked_post(event: Any) -> None:
            self.marks.setdefault(f"post:{type(event).__name__}", time.perf_counter())
            post(event)

        def hooked_run(event: Any, now: float) -> None:
            if self._profile is not None:
                self._profile.runcall(run, event, now)
            else:
                run(event, now)
            self._after(event)

        service.post, service._run = hooked_post, hooked_run

    def wrap_execute(self, execute: Callable[[Any], None]) -> Callable[[Any], None]:
        def hooked(cmd: Any) -> None:
            name = type(cmd).__name__
            self.marks.setdefault(f"exec:{name}", time.perf_counter())
            execute(cmd)
            self.marks.setdefault(f"exec_end:{name}", time.perf_counter())
        return hooked

    def arm(self, hypervisor: str, event: Any = None) -> None:
        self.marks, self.watch = {}, (hypervisor, event)
        self.done.clear()

    def _after(self, event: Any) -> None:
        if self.watch is None:
            return
        hv, posted = self.watch
        b = self.service.runtime.bridge(hv)
        if b.state is self._in_sync and (isinstance(event, self._committed) or (posted is not None and event is posted)):
            self.marks["in_sync"] = time.perf_counter()
            self.marks["noop"] = float(not isinstance(event, self._committed))
            self.watch = None
            self.done.set()


def _listening(port: int) -> bool:
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False


def start_controller(engine: Any, profile: cProfile.Profile | None = None) -> tuple[Any, Probe, int]:
    """The real os-ken app and Service (as controller.service.run starts them), in this process."""
    import socket

    from os_ken.base import app_manager

    import apps.goldilocks_app as app_module
    from apps.guard import install_guard
    from controller.config import Config
    from controller.runtime import Runtime
    from controller.service import Service, configure_os_ken, tune_interpreter

    tune_interpreter()  # the controller process's GC and switch interval, as controller.service.run sets them

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = Config(path=ROOT / "bench", scenario=ROOT / "bench", listen="127.0.0.1", port=port)
    configure_os_ken(config)
    install_guard(logging.getLogger("goldilocks.guard"))
    service = Service(config, Runtime(engine))  # bound hypervisors with dpids: no OVSDB monitor needed
    probe = Probe(service, profile)
    app_module.attach(service)
    manager = app_manager.AppManager.get_instance()
    manager.load_apps(["apps.goldilocks_app"])
    manager.instantiate_apps(**manager.create_contexts())
    app = app_module.southbound()
    assert app is not None
    service.attach_southbound(probe.wrap_execute(app.execute))
    gc.freeze()  # as controller.service.run: what boot built (here: every bridge's flows) lives on
    service.start_engine()
    deadline = time.monotonic() + 10
    while not _listening(port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"os-ken is not listening on 127.0.0.1:{port}")
        time.sleep(0.02)
    return service, probe, port


def _split(m: dict[str, float], t0_key: str) -> dict[str, float]:
    t0 = m[t0_key]
    keys = {"dumped": "post:FlowsDumped", "send_start": "exec:SendBundle", "send_end": "exec_end:SendBundle",
            "committed": "post:BundleCommitted", "in_sync": "in_sync"}
    return {k: m[v] - t0 for k, v in keys.items() if v in m}


def child_throughput(sandbox: Path, sizes: list[int], reps: int, profile_top: int) -> dict[str, Any]:
    base = compiled_flows()
    plan: list[tuple[str, str, int, int]] = []  # (hypervisor, bridge, dpid, n)
    for n in sizes:
        for r in range(reps if n < 100_000 else 1):
            plan.append((f"hv-{n}-{r}", f"glg{n // 1000}k{r}"[:15], 0x100 + len(plan), n))
    flows = {n: make_flows(n, base) for n in sizes}
    engine = FixedEngine({hv: (dpid, flows[n]) for hv, _, dpid, n in plan})
    profile = cProfile.Profile() if profile_top else None
    service, probe, port = start_controller(engine, profile)
    results: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes}
    for hv, bridge, dpid, n in plan:
        ofwire.clear_caches()  # every install encodes cold, as a controller meeting new flows does
        probe.arm(hv)
        vsctl(sandbox, *add_bridge_cmd(bridge, dpid, f"tcp:127.0.0.1:{port}"))
        if not probe.done.wait(timeout=600):
            raise RuntimeError(f"{bridge}: not in sync after 600 s ({service.runtime.bridge(hv)})")
        b = service.runtime.bridge(hv)
        split = _split(probe.marks, "post:SwitchConnected")
        installed = goldilocks_flow_count(sandbox, bridge)
        results[n].append({**split, "installed": installed, "flow_mods": b.flow_mods_sent, "bundles": b.bundles_sent})
        print(f"  goldilocks {n:,}: {split['in_sync']:.3f} s, installed {installed:,}", file=sys.stderr, flush=True)
        vsctl(sandbox, "del-br", bridge)
    out: dict[str, Any] = {"runs": {str(n): runs for n, runs in results.items()}}
    if profile is not None:
        buf = io.StringIO()
        pstats.Stats(profile, stream=buf).sort_stats("cumulative").print_stats(profile_top)
        tot = io.StringIO()
        pstats.Stats(profile, stream=tot).sort_stats("tottime").print_stats(profile_top)
        out["profile"] = buf.getvalue() + "\n" + tot.getvalue()
    service.stop()
    return out


def _policy_with_rule(policy: Policy) -> Policy:
    last = max((r.position for r in policy.rules if r.tier == TIER_ORDER[-1]), default=0)
    rule = Rule("bench-install-added", TIER_ORDER[-1], last + 1, GroupEndpoint("tier-t0"),
                GroupEndpoint("tier-t1"), (Port("tcp", 9999, 9999),), Action.ALLOW)
    bigger = Policy((*policy.rules, rule), policy.groups)
    return Policy(bigger.ordered(), bigger.groups)


def child_latency(sandbox: Path, reps: int) -> dict[str, Any]:
    from controller.engine import Engine
    from controller.events import PolicyChanged

    inventory, directory, groups = make_inventory(LATENCY_SCALE), make_directory(), make_groups()
    policy = make_policy(LATENCY_SCALE, groups)
    assert inventory.hypervisors[LATENCY_HV].dpid == LATENCY_DPID
    start = time.perf_counter()
    engine = Engine(inventory, directory, policy, groups)  # vNICs already carry ofports
    build_s = time.perf_counter() - start
    service, probe, port = start_controller(engine)
    bridge = "gllat"
    probe.arm(LATENCY_HV)
    vsctl(sandbox, *add_bridge_cmd(bridge, LATENCY_DPID, f"tcp:127.0.0.1:{port}"))
    if not probe.done.wait(timeout=120):
        raise RuntimeError(f"{bridge}: initial sync did not finish ({service.runtime.bridge(LATENCY_HV)})")
    initial = {"flows": len(engine.desired(LATENCY_HV)), "s": probe.marks["in_sync"] - probe.marks["post:SwitchConnected"],
               "installed": goldilocks_flow_count(sandbox, bridge)}
    vm = inventory.vms["vm-00000"]  # on hv000, tier t0; its login flip moves it in/out of t0-finance
    bigger = _policy_with_rule(policy)
    kinds: dict[str, Callable[[int], Any]] = {
        "login flip (ContextReported)": lambda k: _context_event(vm, k),
        "tier change (VmUpserted)": lambda k: _tier_event(vm, k),
        "policy: add/remove one rule (PolicyChanged)": lambda k: PolicyChanged(bigger if k % 2 == 0 else policy, groups),
    }
    out: dict[str, Any] = {"engine_build_s": build_s, "initial": initial, "kinds": {}}
    for name, make in kinds.items():
        times, splits, ops, mismatches, counts = [], [], [], 0, set()
        for k in range(reps if reps % 2 == 0 else reps + 1):  # even: the world ends as it began
            event = make(k)
            before = service.runtime.bridge(LATENCY_HV).flow_mods_sent
            probe.arm(LATENCY_HV, event)
            t0 = time.perf_counter()
            service.post(event)
            if not probe.done.wait(timeout=60):
                raise RuntimeError(f"{name}: no barrier reply within 60 s ({service.runtime.bridge(LATENCY_HV)})")
            m = probe.marks
            times.append(m["in_sync"] - t0)
            m["posted"] = t0
            splits.append(_split(m, "posted"))
            ops.append(service.runtime.bridge(LATENCY_HV).flow_mods_sent - before)
            installed = goldilocks_flow_count(sandbox, bridge)  # engine thread idle: desired is stable
            want = len(engine.desired(LATENCY_HV))
            counts.add(want)
            mismatches += installed != want
        out["kinds"][name] = {
            "n": len(times), "median_ms": statistics.median(times) * 1e3, "p95_ms": _p95(times) * 1e3,
            "max_ms": max(times) * 1e3, "ops_median": statistics.median(ops), "noop": sum(1 for o in ops if o == 0),
            "flow_counts": sorted(counts), "count_mismatches": mismatches,
            "split_ms": {k: statistics.median(s[k] for s in splits if k in s) * 1e3
                         for k in ("send_start", "send_end", "committed", "in_sync")},
        }
        print(f"  {name}: median {out['kinds'][name]['median_ms']:.1f} ms, ops {out['kinds'][name]['ops_median']}",
              file=sys.stderr, flush=True)
    service.stop()
    return out


def run_child(netns: str, args: list[str], timeout: float) -> dict[str, Any]:
    cmd = ["ip", "netns", "exec", netns, sys.executable, "-m", "bench.install", *args]
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"child {args[:2]} failed (exit {done.returncode})")
    return json.loads(lines[-1])


# ---- reporting -------------------------------------------------------------------------------


def _ovs_version() -> str:
    try:
        return _tool(["ovs-vswitchd", "--version"]).splitlines()[0].strip()
    except Exception as exc:  # noqa: BLE001
        return f"unknown ({exc})"


def render(floor: dict[int, dict[str, Any]], gold: dict[str, Any], lat: dict[str, Any], encode: dict[str, float],
           phases: dict[str, Any], quick: bool) -> str:
    lines = [SECTION, "",
             "Flows installed on a real Open vSwitch (`python -m bench.install`; see bench/README.md): one netdev "
             "bridge, fail_mode=secure, OpenFlow 1.4, in a private OvsSandbox. Goldilocks is the real os-ken app and "
             "Service in-process inside the sandbox's network namespace." + (" **Quick run.**" if quick else ""),
             "", *machine_info(), f"- OVS: {_ovs_version()}", ""]
    lines += ["### Install throughput, empty bridge", "",
              ("| flows | ovs-ofctl --bundle add-flows (s) | flows/s | Goldilocks connect → in sync (s) | flows/s "
              "| Goldilocks / floor | southbound: bundle start → barrier reply (s) | southbound / floor "
              "| installed (Goldilocks) | n |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for n, f in floor.items():
        runs = gold["runs"][str(n)]
        g = statistics.median(r["in_sync"] for r in runs)
        south = statistics.median(r["committed"] - r["send_start"] for r in runs)
        installed = ", ".join(sorted({f"{r['installed']:,}" for r in runs}))
        lines.append(f"| {n:,} | {f['s']:.3f} | {n / f['s']:,.0f} | {g:.3f} | {n / g:,.0f} | {f['s'] / g:.0%} "
                     f"| {south:.3f} | {f['s'] / south:.0%} | {installed} | {len(runs)} |")
    lines += ["", "Split of the Goldilocks install (median, seconds from SwitchConnected posted):", "",
              "| flows | dump reply posted | bundle start (diff+plan done) | last flow mod queued | barrier reply posted | in sync |",
              "|---|---|---|---|---|---|"]
    for n in floor:
        runs = gold["runs"][str(n)]
        cells = [f"{statistics.median(r[k] for r in runs):.3f}" for k in ("dumped", "send_start", "send_end", "committed", "in_sync")]
        lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
    lines += ["", ("Floor: wall time of `ovs-ofctl -O OpenFlow14 --bundle add-flows BR FILE` (process start, parse, one "
              "atomic bundle). Goldilocks: from the app posting SwitchConnected to the runtime back IN_SYNC after the "
              "bundle's barrier reply (flow dump, diff, one atomic bundle of N adds, barrier, then commit, barrier). "
              "The flows are "
              "hv000 of bench/compile's 1k VMs / 100 rules / 10 HVs world (3.7k flows; a seeded sample of it for 1k), "
              "topped up with distinct table-12 conjunctive clauses under Goldilocks rule cookies; installed = "
              "Goldilocks-cookie flows on the bridge afterwards (`ovs-ofctl dump-flows`). Every install encodes cold "
              "(apps/ofwire's caches cleared first). Southbound: the app's part and the switch's — encode, send, OVS "
              "parsing the adds, barrier reply, commit, barrier reply — "
              "without the runtime's diff and plan before it or its bookkeeping after it."), ""]
    lines += ["### Encoding alone (no switch)", "",
              f"µs per flow to turn {encode['flows']:,} bundle adds (the 100k set) into bytes, best of 3, in-process:", "",
              "| apps/ofwire, cold | apps/ofwire, warm (same specs again) | os-ken objects (before; 2,000-flow sample) |",
              "|---|---|---|",
              f"| {encode['cold_us']:.1f} | {encode['warm_us']:.1f} | {encode['osken_us']:.1f} |", ""]
    lines += ["### The engine thread's work per flow (no switch)", "",
              (f"One install of {phases['flows']:,} flows into an empty bridge, as controller/runtime.py does it, "
               "in-process: µs per flow, median of 3, and how much of it the garbage collector took "
               "(gc.callbacks)."), "",
              "| phase | µs per flow | of which GC |", "|---|---|---|"]
    lines += [f"| {name} | {p['us']:.1f} | {p['gc_us']:.1f} |" for name, p in phases.items() if name != "flows"]
    lines.append("")
    ini = lat["initial"]
    lines += ["### Latency: one change → flows on the bridge (barrier reply)", "",
              (f"World: bench/compile's 1k VMs / 100 rules / 10 HVs (Engine build {lat['engine_build_s']:.1f} s); "
              f"the bridge is hv000 ({ini['flows']:,} flows, initial sync {ini['s']:.2f} s, installed "
              f"{ini['installed']:,}). The event is posted into the Service queue; the clock stops when the runtime "
              "has processed BundleCommitted (barrier reply) and is back IN_SYNC."), "",
              ("| change | median (ms) | p95 (ms) | max (ms) | n | flow mods per change | engine+send done (ms) "
              "| barrier reply posted (ms) | bridge flow counts | count mismatches |"),
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, k in lat["kinds"].items():
        s = k["split_ms"]
        counts = " / ".join(f"{c:,}" for c in k["flow_counts"])
        lines.append(f"| {name} | {k['median_ms']:.1f} | {k['p95_ms']:.1f} | {k['max_ms']:.1f} | {k['n']} "
                     f"| {k['ops_median']:g}{' (' + str(k['noop']) + ' no-op)' if k['noop'] else ''} "
                     f"| {s.get('send_end', float('nan')):.1f} | {s.get('committed', float('nan')):.1f} "
                     f"| {counts} | {k['count_mismatches']} |")
    lines += ["", ("Each repetition alternates the change and its reverse (login u0 ↔ u1, so vm-00000 joins/leaves "
              "`t0-finance`; tier t0 ↔ t1; the policy with and without one extra `tier-t0 → tier-t1 tcp/9999` "
              "allow rule). Bridge flow counts: the engine's desired count after the changes (both states); "
              "mismatches: repetitions where `ovs-ofctl dump-flows` disagreed with it."), ""]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    import bench.compile as compile_bench

    saved = compile_bench.SECTION
    compile_bench.SECTION = SECTION
    try:
        _write_section(path, section)
    finally:
        compile_bench.SECTION = saved


# ---- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.install", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1k flows and 10 latency repetitions (< 60 s)")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"), help="markdown file to update")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--reps", type=int, default=None, help="latency repetitions per change (default 30, quick 10)")
    p.add_argument("--throughput-reps", type=int, default=3, help="installs per size below 100k (100k: one)")
    p.add_argument("--sizes", type=str, default=None, help="comma-separated flow counts (default 1000,10000,100000)")
    p.add_argument("--profile", type=int, default=0, metavar="TOP",
                   help="cProfile the engine thread during the Goldilocks installs; print TOP entries")
    p.add_argument("--child", choices=("throughput", "latency"), help=argparse.SUPPRESS)
    p.add_argument("--sandbox", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _child_main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        if args.child == "throughput":
            out = child_throughput(args.sandbox, [int(s) for s in args.sizes.split(",")], args.throughput_reps, args.profile)
        else:
            out = child_latency(args.sandbox, args.reps)
        print(json.dumps(out), flush=True)
        code = 0
    except Exception:
        logging.getLogger("bench.install").exception("child failed")
        code = 1
    sys.stderr.flush()
    os._exit(code)  # os-ken's hub threads are not daemons


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        _child_main(args)
    if os.geteuid() != 0:
        print("bench.install needs root (network namespaces, a private ovs-vswitchd)", file=sys.stderr)
        return 2
    from tests.ovs.harness import OvsSandbox, unavailable_reason

    reason = unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else (QUICK_SIZES if args.quick else FULL_SIZES)
    reps = args.reps or (10 if args.quick else 30)
    sandbox = OvsSandbox().start()
    try:
        sdir = sandbox.dir
        print(f"sandbox {sandbox.netns} in {sdir}", file=sys.stderr, flush=True)
        base = compiled_flows()
        print("encoding, engine-thread phases ...", file=sys.stderr, flush=True)
        encode = measure_encode(base)
        phases = measure_phases(base)
        print("floor (ovs-ofctl) ...", file=sys.stderr, flush=True)
        floor = measure_floor(sdir, sizes, base, args.throughput_reps, sdir)
        print("goldilocks install ...", file=sys.stderr, flush=True)
        child = ["--sandbox", str(sdir), "--throughput-reps", str(args.throughput_reps), "--reps", str(reps)]
        gold = run_child(sandbox.netns, ["--child", "throughput", "--sizes", ",".join(map(str, sizes)),
                                         "--profile", str(args.profile), *child], timeout=900)
        print("latency ...", file=sys.stderr, flush=True)
        lat = run_child(sandbox.netns, ["--child", "latency", *child], timeout=600)
    finally:
        sandbox.stop()
    section = render(floor, gold, lat, encode, phases, args.quick)
    print(section)
    if gold.get("profile"):
        print("\n## profile of the engine thread during the Goldilocks installs\n")
        print(gold["profile"])
    if not args.no_write:
        write_section(args.out, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
