"""bench/compile: full compile time, flows per hypervisor and incremental latency.

    python -m bench.compile [--quick] [--out docs/benchmarks.md]

Builds synthetic worlds with the real core API (Engine, compile_bridge), one fresh subprocess
per (VMs, rules, hypervisors) combination so that peak RSS is per world. Prints markdown tables
and writes them into the "## bench/compile" section of the output file. No timing asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from controller.engine import Engine
from controller.events import ContextReported, VmUpserted
from controller.flows.compile import World, compile_bridge
from controller.flows.pipeline import TIER_ORDER, CookieKind, cookie_kind
from controller.flows.types import Conjunction, FlowSpec
from controller.identity.graph import effective_vm
from controller.identity.groups import GroupDef, compute_members
from controller.identity.selector import parse_selector
from controller.model import VM, Attr, Fact, Gateway, Hypervisor, Inventory, Port, Provenance, VNic
from controller.policy.schema import Action, AppService, GroupEndpoint, Policy, Rule, Service
from controller.policy.validate import validate_policy

SECTION = "## bench/compile"
N_TIERS = 20
N_DEPTS = 5
N_USERS = 200
DIRECTORY_GROUPS = ("finance", "eng", "hr")  # user k is in group k % 4 (3 = no group)
DB_TIERS = frozenset(f"t{n}" for n in range(N_TIERS) if n % 5 == 4)  # run postgres
UPLINK = 65000
SEED = 1


@dataclass(frozen=True)
class Scale:
    vms: int
    rules: int
    hvs: int

    @property
    def label(self) -> str:
        return f"{self.vms // 1000}k VMs / {self.rules} rules / {self.hvs} HVs"


FULL = [Scale(v, r, h) for v in (1_000, 10_000) for r in (100, 500) for h in (10, 100)]
QUICK = [Scale(1_000, 100, 10)]


@dataclass(frozen=True)
class Budgets:
    engine_s: float = 150.0  # skip the Engine build when its estimate exceeds this
    incremental_s: float = 15.0  # time box per incremental event kind (at least 3 repetitions)
    compile_s: float = 8.0  # stop repeating compile_bridge (median of up to 3) after this
    reps: int = 50
    ram_fraction: float = 0.6  # skip the Engine when its estimated RSS exceeds this share of RAM


# ---- the synthetic world ---------------------------------------------------------------------


def _mac(i: int) -> str:
    return "02:00:" + ":".join(f"{(i >> s) & 0xFF:02x}" for s in (24, 16, 8, 0))


def _ip(i: int) -> str:
    n = i + 256  # skip 10.0.0.x
    return f"10.{(n >> 16) & 0xFF}.{(n >> 8) & 0xFF}.{n & 0xFF}"


def _guest_facts(tier: str, user: str) -> frozenset[Fact]:
    facts = {Fact(Attr.USER, "", user, Provenance.GUEST, 1.0)}
    if tier in DB_TIERS:
        facts.add(Fact(Attr.APP, "postgres", "tcp/5432", Provenance.GUEST, 1.0))
    return frozenset(facts)


def _platform_facts(tier: str, dept: str) -> frozenset[Fact]:
    return frozenset({Fact(Attr.TAG, "tier", tier, Provenance.PLATFORM), Fact(Attr.TAG, "dept", dept, Provenance.PLATFORM)})


def make_vm(i: int, hvs: int) -> VM:
    tier, dept = f"t{i % N_TIERS}", f"d{(i // N_TIERS) % N_DEPTS}"
    nic = VNic(_mac(i), (_ip(i),), i // hvs + 1, f"vnet{i}")
    facts = _platform_facts(tier, dept) | _guest_facts(tier, f"u{i % N_USERS}")
    return VM(f"vm-{i:05d}", f"vm-{i:05d}", f"hv{i % hvs:03d}", (nic,), facts)


def make_inventory(scale: Scale) -> Inventory:
    hvs = {f"hv{h:03d}": Hypervisor(f"hv{h:03d}", UPLINK, h + 1) for h in range(scale.hvs)}
    vms = {vm.uuid: vm for vm in (make_vm(i, scale.hvs) for i in range(scale.vms))}
    return Inventory(hvs, vms, Gateway("10.0.0.1", "02:ff:00:00:00:01"))


def make_directory() -> dict[str, frozenset[str]]:
    return {f"u{k}": frozenset({DIRECTORY_GROUPS[k % 4]}) for k in range(N_USERS) if k % 4 < 3}


def make_groups() -> dict[str, GroupDef]:
    texts = {f"tier-t{n}": f"tag.tier == 't{n}'" for n in range(N_TIERS)}
    texts |= {f"t{n}-finance": f"tag.tier == 't{n}' && usergroup == 'finance'" for n in range(N_TIERS)}
    texts |= {f"dept-d{k}": f"tag.dept == 'd{k}'" for k in range(N_DEPTS)}
    return {name: GroupDef(name, parse_selector(text), text) for name, text in texts.items()}


def _services(rng: random.Random) -> tuple[Service, ...]:
    kind = rng.random()
    if kind < 0.45:
        port = rng.choice((22, 80, 443, 3306, 8443))
        return (Port("tcp", port, port),)
    if kind < 0.60:
        return (Port("tcp", 80, 80), Port("tcp", 443, 443))
    if kind < 0.75:
        return (rng.choice((Port("tcp", 8000, 8099), Port("udp", 5000, 5100), Port("tcp", 1024, 2047))),)
    if kind < 0.85:
        return (Port("icmp"),)
    return (AppService("postgres"),)


def make_rule(i: int, rng: random.Random, groups: list[str], positions: dict[str, int]) -> Rule:
    tier = rng.choices(TIER_ORDER, weights=(1, 2, 7))[0]
    positions[tier] += 1
    services = _services(rng)
    src = rng.choice(groups)
    if isinstance(services[0], AppService):
        dst = f"tier-{rng.choice(sorted(DB_TIERS))}"
    else:
        dst = rng.choice(groups)
    action = Action.DENY if rng.random() < 0.15 else Action.ALLOW
    return Rule(f"r{i:04d}", tier, positions[tier], GroupEndpoint(src), GroupEndpoint(dst), services, action)


def make_policy(scale: Scale, groups: dict[str, GroupDef]) -> Policy:
    rng = random.Random(SEED)
    names = sorted(groups)
    positions = {t: 0 for t in TIER_ORDER}
    rules = tuple(make_rule(i, rng, names, positions) for i in range(scale.rules))
    policy = Policy(rules, {g.name: g.text for g in groups.values()})
    problems = validate_policy(policy, groups)
    if problems:
        raise SystemExit(f"synthetic policy is invalid: {problems[0]}")
    return Policy(policy.ordered(), policy.groups)


# ---- measuring -------------------------------------------------------------------------------


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _ram_mb() -> float:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _p95(xs: list[float]) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def _flow_stats(flows: frozenset[FlowSpec]) -> tuple[int, int, int]:
    """(all flows, rule flows, conjunctive clause flows)."""
    rule = sum(1 for f in flows if cookie_kind(f.cookie) == CookieKind.RULE)
    clauses = sum(1 for f in flows if any(isinstance(a, Conjunction) for a in f.actions))
    return len(flows), rule, clauses


def _direct_world(inventory: Inventory, directory: dict[str, frozenset[str]], policy: Policy,
                  groups: dict[str, GroupDef]) -> World:
    effective = {u: effective_vm(vm, directory) for u, vm in inventory.vms.items()}
    members = compute_members(groups, effective.values())
    return World(replace(inventory, vms=effective), members, policy)


def _time_loop(make_event: Callable[[int], Any], engine: Engine, budgets: Budgets) -> dict[str, Any]:
    times: list[float] = []
    ops = 0
    deadline = time.perf_counter() + budgets.incremental_s
    for k in range(budgets.reps):
        event = make_event(k)
        t, commands = _timed(lambda: engine.handle(event))
        times.append(t)
        ops += sum(len(c.ops) for c in commands)
        if time.perf_counter() > deadline and k >= 2:
            break
    return {"n": len(times), "median_ms": statistics.median(times) * 1e3, "p95_ms": _p95(times) * 1e3,
            "ops_per_event": ops / len(times)}


def _victim(inventory: Inventory) -> VM:
    """A VM in tier t0 (selected by t0-finance when a finance user is logged in)."""
    return inventory.vms["vm-00000"]


def _context_event(vm: VM, k: int) -> ContextReported:
    user = "u1" if k % 2 == 0 else "u0"  # u0 (its login at start) is in finance, u1 in eng
    return ContextReported(vm.uuid, Provenance.GUEST, _guest_facts("t0", user))


def _tier_event(vm: VM, k: int) -> VmUpserted:
    tier = "t1" if k % 2 == 0 else "t0"
    facts = frozenset(f for f in vm.facts if not (f.attr is Attr.TAG and f.key == "tier"))
    return VmUpserted(replace(vm, facts=facts | {Fact(Attr.TAG, "tier", tier, Provenance.PLATFORM)}))


def measure(scale: Scale, budgets: Budgets) -> dict[str, Any]:
    out: dict[str, Any] = {"scale": asdict(scale)}
    inventory, directory, groups = make_inventory(scale), make_directory(), make_groups()
    policy = make_policy(scale, groups)
    world = _direct_world(inventory, directory, policy, groups)
    rss_before = _rss_now_mb()
    times: list[float] = []
    flows: frozenset[FlowSpec] = frozenset()
    while len(times) < 3 and sum(times) < budgets.compile_s:
        flows = frozenset()
        t, flows = _timed(lambda: compile_bridge(world, "hv000", check=False))
        times.append(t)
    out["compile_bridge_s"] = statistics.median(times)
    out["compile_bridge_n"] = len(times)
    out["one_bridge_flows"] = _flow_stats(flows)
    bridge_mb = max(_rss_now_mb() - rss_before, 1.0)
    del flows, world
    est_s = out["compile_bridge_s"] * scale.hvs * 1.3
    est_mb = bridge_mb * scale.hvs * 1.5
    out["engine_estimate"] = {"s": est_s, "mb": est_mb}
    if est_s > budgets.engine_s or est_mb > budgets.ram_fraction * _ram_mb():
        out["skipped"] = f"Engine not built: estimated {est_s:.0f} s, {est_mb / 1024:.1f} GiB"
        out["peak_rss_mb"] = _peak_rss_mb()
        return out
    t, engine = _timed(lambda: Engine(inventory, directory, policy, groups))
    out["engine_build_s"] = t
    stats = [_flow_stats(engine.desired(hv)) for hv in engine.hypervisors()]
    out["flows_per_hv"] = {name: _summary([s[i] for s in stats]) for i, name in enumerate(("all", "rule", "clauses"))}
    vm = _victim(inventory)
    out["context_event"] = _time_loop(lambda k: _context_event(vm, k), engine, budgets)
    _reset(engine, vm)
    out["tier_event"] = _time_loop(lambda k: _tier_event(vm, k), engine, budgets)
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _reset(engine: Engine, vm: VM) -> None:
    engine.handle(VmUpserted(vm))
    engine.handle(ContextReported(vm.uuid, Provenance.GUEST, _guest_facts("t0", "u0")))


def _summary(xs: list[int]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


# ---- running each combination in its own process ---------------------------------------------


def run_child(scale: Scale, budgets: Budgets, timeout_s: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.compile", "--one", str(scale.vms), str(scale.rules), str(scale.hvs),
           "--engine-budget", str(budgets.engine_s), "--incremental-budget", str(budgets.incremental_s)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"scale": asdict(scale), "skipped": f"timed out after {timeout_s:.0f} s"}
    if done.returncode != 0:
        return {"scale": asdict(scale), "skipped": f"failed (exit {done.returncode}): {done.stderr.strip()[-300:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- reporting -------------------------------------------------------------------------------


def machine_info() -> list[str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    date = subprocess.run(["date", "-u"], capture_output=True, text=True, check=False).stdout.strip()
    return [
        f"- Date: {date or datetime.now(timezone.utc).isoformat()}",
        f"- CPU: {cpu}, {os.cpu_count()} cores",
        f"- RAM: {_ram_mb() / 1024:.1f} GiB",
        f"- Python: {platform.python_version()} ({platform.python_implementation()})",
    ]


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _row(r: dict[str, Any], cells: Callable[[dict[str, Any]], list[str]]) -> str:
    label = Scale(**r["scale"]).label
    return "| " + " | ".join([label, *cells(r)]) + " |"


def _table(title: str, header: list[str], results: list[dict[str, Any]],
           cells: Callable[[dict[str, Any]], list[str]]) -> list[str]:
    head = ["world", *header]
    return [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *(_row(r, cells) for r in results), ""]


def _flows_cells(r: dict[str, Any]) -> list[str]:
    f = r.get("flows_per_hv")
    if f is None:
        n, rule, clauses = r.get("one_bridge_flows") or (None, None, None)
        return [f"{_fmt(n, ',')} (hv000 only)", "—", "—", _fmt(rule, ","), _fmt(clauses, ",")]
    return [f"{f['all']['median']:,.0f}", f"{f['all']['min']:,}", f"{f['all']['max']:,}",
            f"{f['rule']['median']:,.0f}", f"{f['clauses']['median']:,.0f}"]


def _latency_cells(r: dict[str, Any]) -> list[str]:
    cells = []
    for key in ("context_event", "tier_event"):
        e = r.get(key)
        cells += ["—"] * 3 if e is None else [f"{e['median_ms']:.1f}", f"{e['p95_ms']:.1f}", f"{e['n']}"]
    return cells


def render(results: list[dict[str, Any]]) -> str:
    lines = [SECTION, "",
             "Synthetic worlds built with the real core (`python -m bench.compile`; see bench/README.md). "
             "Each world runs in a fresh process. One vNIC per VM, VMs spread evenly over the hypervisors, "
             f"{N_TIERS} tiers, {N_DEPTS} departments, one guest-reported login per VM "
             f"({N_USERS} users, 3 directory groups), postgres on the db tiers; "
             f"{len(make_groups())} groups (tier, tier && usergroup == 'finance', dept); rules ~85% allow.",
             "", *machine_info(), ""]
    lines += _table("Full compile (Engine build, every bridge) and one bridge",
                    ["Engine build (s)", "compile_bridge, 1 HV (ms, median)", "peak RSS (MiB)"], results,
                    lambda r: [_fmt(r.get("engine_build_s"), ".2f"),
                               f"{r['compile_bridge_s'] * 1e3:,.0f} (n={r.get('compile_bridge_n', 3)})",
                               _fmt(r.get("peak_rss_mb"), ",.0f")])
    lines += _table("Flows per hypervisor",
                    ["flows median", "min", "max", "rule flows (median)", "conjunctive clauses (median)"],
                    results, _flows_cells)
    lines += _table("Incremental latency, `Engine.handle` (ms)",
                    ["login flip median", "p95", "n", "tier change median", "p95", "n"], results, _latency_cells)
    lines += ["Login flip: a `ContextReported` that swaps one VM's logged-in user between a finance and an "
              "eng user (it joins/leaves `t0-finance`). Tier change: a `VmUpserted` moving that VM between "
              "tiers t0 and t1. Repetitions stop early once a time box is spent (n shows how many ran).", ""]
    notes = [f"- {Scale(**r['scale']).label}: {r['skipped']}" for r in results if r.get("skipped")]
    if notes:
        lines += ["Not measured (their compile_bridge, flows and peak RSS cover the world and one bridge only):",
                  "", *notes, ""]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n\nMeasured performance of the Goldilocks core.\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        kept_after = lines[end:]
        new = "\n".join(lines[:start] + section.rstrip("\n").splitlines() + ([""] + kept_after if kept_after else [])) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


# ---- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.compile", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="only the smallest world (smoke test)")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"), help="markdown file to update")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--engine-budget", type=float, default=Budgets.engine_s)
    p.add_argument("--incremental-budget", type=float, default=Budgets.incremental_s)
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per world before giving up")
    p.add_argument("--one", nargs=3, type=int, metavar=("VMS", "RULES", "HVS"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budgets = Budgets(engine_s=args.engine_budget, incremental_s=args.incremental_budget)
    if args.one:
        print(json.dumps(measure(Scale(*args.one), budgets)))
        return 0
    if args.quick:
        budgets = replace(budgets, incremental_s=min(budgets.incremental_s, 5.0))
    results = []
    for scale in QUICK if args.quick else FULL:
        print(f"running {scale.label} ...", file=sys.stderr, flush=True)
        results.append(run_child(scale, budgets, args.timeout))
    section = render(results)
    print(section)
    if not args.no_write:
        write_section(args.out, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
