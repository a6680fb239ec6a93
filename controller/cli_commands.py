"""The `goldilocks` command's parser and commands (its entry point is controller/cli.py)."""

from __future__ import annotations

import argparse
import ipaddress
import json
from collections.abc import Sequence
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from controller.model import PROTOCOLS

# The compiler, engine and explainer are imported by the commands that use them: the ones that
# need none start sooner.
if TYPE_CHECKING:
    from controller.engine import Engine
    from controller.flows.compile import World
    from controller.policy.explain import Explanation
    from controller.scenario import Scenario, ScenarioError
    from controller.warmstart import Restores

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(path: str, err: TextIO) -> Scenario | None:
    from controller.scenario import ScenarioError, load_scenario

    try:
        return load_scenario(path)
    except ScenarioError as exc:
        _print_problems(path, exc, err)
        return None


def _print_problems(path: str, exc: ScenarioError, err: TextIO) -> None:
    problems = exc.problems
    print(f"{path}: {len(problems)} problem{'s' if len(problems) != 1 else ''}:", file=err)
    for p in problems:
        print(f"  {p}", file=err)


def _engine(sc: Scenario) -> Engine:
    from controller.engine import Engine

    return Engine(sc.inventory, sc.directory, sc.policy, sc.groups)


def cmd_check(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    sc = _load(args.scenario, err)
    if sc is None:
        return EXIT_INVALID
    inv = sc.inventory
    print(f"{args.scenario}: valid — {len(inv.hypervisors)} hypervisors, {len(inv.vms)} VMs, "
          f"{len(sc.groups)} groups, {len(sc.policy.rules)} rules", file=out)
    return EXIT_OK


def cmd_compile(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    sc = _load(args.scenario, err)
    if sc is None:
        return EXIT_INVALID
    if args.hypervisor not in sc.inventory.hypervisors:
        known = ", ".join(sorted(sc.inventory.hypervisors)) or "none"
        print(f"unknown hypervisor {args.hypervisor!r} (known: {known})", file=err)
        return EXIT_USAGE
    from controller.flows.compile import compile_bridge
    from controller.flows.render import render_flows

    flows = compile_bridge(_engine(sc).world(), args.hypervisor)
    if args.stats:
        print(json.dumps(flow_stats(flows), indent=2, sort_keys=True), file=out)
    else:
        out.write(render_flows(flows))
    return EXIT_OK


def flow_stats(flows: frozenset) -> dict[str, object]:
    from controller.flows.pipeline import CookieKind, cookie_kind
    from controller.flows.types import Conjunction

    kinds: dict[str, int] = {}
    for f in flows:
        kind = cookie_kind(f.cookie)
        name = kind.name.lower() if kind is not None else "foreign"
        kinds[name] = kinds.get(name, 0) + 1
    conj = sum(1 for f in flows if any(isinstance(a, Conjunction) for a in f.actions))
    return {"flows": len(flows), "by_kind": kinds, "conjunctive_clauses": conj,
            "policy_flows": kinds.get(CookieKind.RULE.name.lower(), 0)}


def _resolve_dst(world: World, text: str) -> object | None:
    vm = world.inventory.vm_by_name(text)
    if vm is not None:
        return vm
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        return None


def cmd_explain(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.scenario is None:
        return _api(args, err, lambda c: _print_explanation(c.request("POST", "/explain", {
            "src": args.src, "dst": args.dst, "protocol": args.proto, "port": args.port}), args.json, out))
    sc = _load(args.scenario, err)
    if sc is None:
        return EXIT_INVALID
    world = _engine(sc).world()
    src = world.inventory.vm_by_name(args.src)
    if src is None:
        print(f"--src: no VM named {args.src!r} (VMs: {', '.join(sorted(v.name for v in world.inventory.vms.values()))})", file=err)
        return EXIT_USAGE
    dst = _resolve_dst(world, args.dst)
    if dst is None:
        print(f"--dst: {args.dst!r} is neither a VM name nor an IPv4 address", file=err)
        return EXIT_USAGE
    if args.proto in ("tcp", "udp") and not 1 <= args.port <= 65535:
        print(f"--port: {args.port} out of range (1-65535) for {args.proto}", file=err)
        return EXIT_USAGE
    from controller.policy.explain import explain

    result = explain(world, sc.groups, src, dst, args.proto, args.port)  # type: ignore[arg-type]
    if args.json:
        print(json.dumps(explanation_json(result), indent=2), file=out)
    else:
        print("\n".join(result.lines()), file=out)
    return EXIT_OK


def explanation_json(e: Explanation) -> dict[str, object]:
    return {
        "src": e.src, "dst": e.dst, "protocol": e.protocol, "port": e.port, "verdict": e.verdict,
        "rule": None if e.rule is None else {"id": e.rule.id, "tier": e.rule.tier, "position": e.rule.position},
        "reason": e.reason, "enforced_at": list(e.enforced_at),
        "monitored": [r.id for r in e.monitored],
        "memberships": [
            {"group": m.group, "vm": m.vm, "member": m.member, "selector": m.selector,
             "evidence": [{"term": ev.term, "satisfied": ev.satisfied,
                           "facts": [{"attr": str(f.attr), "key": f.key, "value": f.value,
                                      "provenance": str(f.provenance), "observed_at": f.observed_at}
                                     for f in ev.facts]} for ev in m.evidence]}
            for m in e.memberships
        ],
    }


def reachability(sc: Scenario, world: World) -> list[list[str]]:
    from controller.policy.explain import explain
    from controller.policy.whatif import policy_probes

    names = sorted(vm.name for vm in world.inventory.vms.values())
    probes = policy_probes((sc.policy,), world.inventory.vms.values())
    rows = [["from \\ to"] + names]
    for s in names:
        row = [s]
        for d in names:
            if s == d:
                row.append("-")
                continue
            src, dst = world.inventory.vm_by_name(s), world.inventory.vm_by_name(d)
            ok = [p for p in probes if explain(world, sc.groups, src, dst, p[0], p[1]).allowed]  # type: ignore[arg-type]
            row.append(",".join(proto if proto == "icmp" else f"{proto}/{port}" for proto, port in ok) or "deny")
        rows.append(row)
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def cmd_demo(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """The live demo (Goldilocks managing a Mininet fleet), or with --compile-only the examples
    compiled offline."""
    if args.compile_only or args.scenario:
        return compile_demo(args.scenario, out, err)
    from fleet.ovs import unavailable_reason

    reason = unavailable_reason()
    if reason:
        print(f"goldilocks demo: {reason}.\nRun it as root (sudo make demo), or see the compiled "
              "examples with `goldilocks demo --compile-only`.", file=err)
        return EXIT_USAGE
    from fleet.demo import run_demo

    return run_demo(out, stay=args.stay)


def compile_demo(scenarios: list[str], out: TextIO, err: TextIO) -> int:
    from controller.flows.compile import compile_bridge

    paths = scenarios or sorted(str(p) for p in EXAMPLES.glob("*.yaml"))
    for path in paths:
        sc = _load(path, err)
        if sc is None:
            return EXIT_INVALID
        world = _engine(sc).world()
        print(f"== {path}", file=out)
        for hv in sorted(sc.inventory.hypervisors):
            stats = flow_stats(compile_bridge(world, hv))
            print(f"   {hv}: {stats['flows']} flows ({stats['policy_flows']} for policy, "
                  f"{stats['conjunctive_clauses']} conjunctive clauses)", file=out)
        print("   reachability (new connections the policy allows):", file=out)
        print("\n".join("   " + line for line in format_table(reachability(sc, world)).splitlines()), file=out)
        print(file=out)
    print("Next: goldilocks explain SCENARIO --src VM --dst VM --proto tcp --port N   (see README)", file=out)
    return EXIT_OK


def cmd_sim(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from fleet.runner import run_many

    return run_many(args, out)


def cmd_run(args: argparse.Namespace, out: TextIO, err: TextIO, restores: Restores | None = None) -> int:
    """`restores`: those started from the configuration's restore plan before the command line
    was parsed (controller/cli.py); without them, they start once the file is parsed."""
    import logging

    from controller.config import ConfigError, load_config
    from controller.warmstart import (
        FIRST_WAIT_S,
        LOGGER,
        plan_of,
        plan_path,
        start_restores,
        store_plan,
    )

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(str(exc), file=err)
        return EXIT_INVALID
    early = restores is not None
    if restores is None:
        restores = start_restores(config)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger(LOGGER)
    if early:
        log.info("flow restores started from the restore plan %s, before the configuration was parsed",
                 plan_path(args.config))
    if restores is not None:
        restores.report_to(log)
    if (problem := store_plan(args.config, plan_of(config))) is not None:
        log.warning("%s; the next start restores after parsing its configuration", problem)
    if restores is not None and not early:  # early ones were waited for before the imports above
        # Waited for up to a second: the imports below take about that long, and would hold
        # the interpreter the restores run in.
        restores.wait(FIRST_WAIT_S)
    from controller.scenario import ScenarioError
    from controller.service import run

    try:
        return run(config, restores)
    except ScenarioError as exc:
        # The scenario is read only to seed an empty database (docs/running.md), so it is
        # checked only then: run() raises this before starting anything. Not on every restart,
        # where it would stop a controller for a file it does not read (and cost 0.5 s at 2000 VMs).
        _print_problems(str(config.scenario), exc, err)
        return EXIT_INVALID


def _print_explanation(data: dict, as_json: bool, out: TextIO) -> None:
    if as_json:
        print(json.dumps(data, indent=2), file=out)
        return
    svc = data["protocol"] if data["protocol"] == "icmp" else f"{data['protocol']}/{data['port']}"
    lines = [f"{data['src']} -> {data['dst']} {svc}: {str(data['verdict']).upper()}"]
    rule = data.get("rule")
    lines.append(f"  decided by rule {rule['id']!r} (tier {rule['tier']}, position {rule['position']})" if rule
                 else f"  {data.get('reason')}")
    lines += [f"  enforced {p}" for p in data.get("enforced_at", [])]
    lines += [f"  monitor-only rule {r!r} matches (counted, not enforced)" for r in data.get("monitored", [])]
    for m in data.get("memberships", []):
        lines.append(f"  {m['vm']} is {'' if m['member'] else 'NOT '}a member of group {m['group']!r} ({m['selector']})")
        for ev in m.get("evidence", []):
            facts = "; ".join(f"{f['attr']}{'.' + f['key'] if f['key'] else ''}={f['value']} ({f['provenance']})"
                              for f in ev.get("facts", [])) or "no such attribute"
            lines.append(f"      [{'yes' if ev['satisfied'] else 'no '}] {ev['term']}  <- {facts}")
    print("\n".join(lines), file=out)


def _api(args: argparse.Namespace, err: TextIO, action) -> int:  # type: ignore[no-untyped-def]
    from controller.client import ApiError, Client

    try:
        action(Client.from_env(getattr(args, "api", None), getattr(args, "token", None)))
    except ApiError as exc:
        print(f"goldilocks: {exc}", file=err)
        return EXIT_USAGE if exc.status in (0, 401, 403) else EXIT_INVALID
    return EXIT_OK


def _policy_document(path: str) -> dict:
    """A policy document from a YAML file: either {groups, rules} or a scenario's {groups, policy: {rules}}."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with groups and rules")
    rules = data.get("rules", (data.get("policy") or {}).get("rules", []))
    return {"groups": data.get("groups") or {}, "rules": rules or []}


def cmd_policy(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    def show(data: object) -> None:
        print(json.dumps(data, indent=2, sort_keys=True), file=out)

    if args.action == "apply":
        try:
            document = _policy_document(args.file)
        except (OSError, ValueError) as exc:
            print(f"goldilocks: {exc}", file=err)
            return EXIT_USAGE
        body = {"document": document, "comment": args.comment or ""}
        return _api(args, err, lambda c: print(f"draft saved (based on revision {c.request('PUT', '/policy/draft', body).get('based_on')}); "
                                               "check it with `goldilocks whatif`, then `goldilocks policy publish`", file=out))
    if args.action == "validate":
        return _api(args, err, lambda c: show(c.request("POST", "/policy/draft/validate")))
    if args.action == "publish":
        return _api(args, err, lambda c: print(f"published revision {c.request('POST', '/policy/draft/publish')['number']}", file=out))
    if args.action == "revert":
        return _api(args, err, lambda c: print(
            f"revision {args.revision} restored as revision {c.request('POST', '/policy/revert', {'revision': args.revision})['number']}", file=out))
    if args.action == "discard":
        return _api(args, err, lambda c: (c.request("DELETE", "/policy/draft"), print("draft discarded", file=out)))
    if args.action == "history":
        return _api(args, err, lambda c: show(c.request("GET", "/policy/history")))
    return _api(args, err, lambda c: show(c.request("GET", "/policy/draft" if args.draft else "/policy")))


def cmd_whatif(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    def report(c) -> None:  # type: ignore[no-untyped-def]
        data = c.request("POST", "/policy/draft/whatif")
        for title, key in (("newly allowed", "newly_allowed"), ("newly denied", "newly_denied")):
            items = data.get(key, [])
            print(f"{title}: {len(items)}", file=out)
            for it in items:
                print(f"  {it['src']} -> {it['dst']} {it['service']}: {it['before']} -> {it['after']}", file=out)
        for f in data.get("flows", []):
            print(f"flows on {f['hypervisor']}: {f['before']} -> {f['after']} ({f['after'] - f['before']:+d})", file=out)
        if data.get("truncated"):
            print("(large fleet: only VMs named by the changed rules were checked)", file=out)
    return _api(args, err, report)


def cmd_status(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    def report(c) -> None:  # type: ignore[no-untyped-def]
        rows = [["hypervisor", "connected", "state", "desired", "installed", "last error"]]
        status = c.request("GET", "/status")
        for b in status["hypervisors"]:
            installed = "-" if b.get("installed_flows") is None else str(b["installed_flows"])
            rows.append([b["hypervisor"], "yes" if b["connected"] else "no", b["state"], str(b["desired_flows"]),
                         installed, b.get("last_error") or ""])
        print(format_table(rows), file=out)
        rows = [["rule", "packets", "bytes", "last hit"]]
        for h in sorted(c.request("GET", "/rules/hits"), key=lambda h: h["rule_id"]):
            rows.append([h["rule_id"], str(h["packets"]), str(h["bytes"]),
                         "never" if h.get("last_hit") is None else _when(h["last_hit"])])
        print(file=out)
        print(format_table(rows), file=out)
    return _api(args, err, report)


def _when(epoch: float) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_audit(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    def report(c) -> None:  # type: ignore[no-untyped-def]
        for e in c.request("GET", f"/audit?limit={args.limit}"):
            print(f"{_when(e['at'])}  {e['actor']:<12} {e['action']:<24} {e['target']:<28} {e.get('outcome', 'ok')}",
                  file=out)
    return _api(args, err, report)


def _api_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", metavar="URL", help="API base URL (default $GOLDILOCKS_API or http://127.0.0.1:8080)")
    p.add_argument("--token", help="bearer token (default $GOLDILOCKS_TOKEN)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="goldilocks", description=(
        "Context-aware microsegmentation for Open vSwitch hypervisors. "
        "Scenario files describe hypervisors, VMs, context, groups and policy (docs/scenario.md)."))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser("check", help="validate a scenario file; exit 0 if valid, 1 listing every problem")
    c.add_argument("scenario", help="scenario YAML file")
    c.set_defaults(func=cmd_check)
    c = sub.add_parser("compile", help="print one hypervisor's bridge flows (ovs-ofctl add-flows syntax)")
    c.add_argument("scenario", help="scenario YAML file")
    c.add_argument("--hypervisor", required=True, metavar="NAME", help="hypervisor whose bridge to compile")
    c.add_argument("--stats", action="store_true", help="print flow counts as JSON instead of the flows")
    c.set_defaults(func=cmd_compile)
    c = sub.add_parser("explain", help="verdict and reasons for a new connection from a VM "
                                       "(from a scenario file, or from the running controller's API)")
    c.add_argument("scenario", nargs="?", help="scenario YAML file; omit to ask the API")
    _api_options(c)
    c.add_argument("--src", required=True, metavar="VM", help="source VM name")
    c.add_argument("--dst", required=True, metavar="VM|IP", help="destination VM name or IPv4 address")
    c.add_argument("--proto", required=True, choices=[x for x in PROTOCOLS if x != "any"], help="protocol")
    c.add_argument("--port", type=int, default=0, help="destination port (tcp/udp)")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=cmd_explain)
    c = sub.add_parser("policy", help="edit, publish and revert the running controller's policy (API client)")
    c.add_argument("action", choices=["show", "apply", "validate", "publish", "discard", "revert", "history"],
                   help="show the active policy (--draft: the draft), apply FILE as the draft, validate/publish/"
                        "discard the draft, revert to REVISION, list the history")
    c.add_argument("file", nargs="?", help="apply: YAML with groups and rules (or a scenario file)")
    c.add_argument("--revision", type=int, help="revert: the revision to restore")
    c.add_argument("--draft", action="store_true", help="show: the draft instead of the active policy")
    c.add_argument("--comment", help="apply: a note kept with the revision")
    _api_options(c)
    c.set_defaults(func=cmd_policy)
    c = sub.add_parser("whatif", help="what the draft would change: pairs newly allowed or denied, flows per hypervisor")
    _api_options(c)
    c.set_defaults(func=cmd_whatif)
    c = sub.add_parser("status", help="each hypervisor's bridge (connected, in sync, flow counts) and rule hit counts (API client)")
    _api_options(c)
    c.set_defaults(func=cmd_status)
    c = sub.add_parser("audit", help="the audit log: who changed what, when (API client)")
    c.add_argument("--limit", type=int, default=50, help="how many entries, newest first")
    _api_options(c)
    c.set_defaults(func=cmd_audit)
    c = sub.add_parser("run", help="run the OpenFlow controller: OVSDB monitors, os-ken app, engine (docs/running.md)")
    c.add_argument("--config", required=True, metavar="FILE", help="controller config YAML")
    c.set_defaults(func=cmd_run)
    c = sub.add_parser("demo", help="run Goldilocks on a simulated Mininet fleet and play the identity story "
                                    "(root); --compile-only: compile the examples and print who may reach whom")
    c.add_argument("scenario", nargs="*", help="with --compile-only: scenario files (default: the shipped examples)")
    c.add_argument("--compile-only", action="store_true", help="no fleet: compile scenarios offline")
    c.add_argument("--stay", action="store_true", help="keep the controller and the fleet up until Ctrl-C")
    c.set_defaults(func=cmd_demo)
    c = sub.add_parser("sim", help="run simulation scenarios on a Mininet fleet (root; docs/simulation.md)")
    c.add_argument("scenario", nargs="+", help="simulation files, e.g. mininet/scenarios/*.yaml")
    from fleet.options import add_controller_options

    add_controller_options(c)
    c.set_defaults(func=cmd_sim)
    return p


def run_command(argv: Sequence[str], out: TextIO, err: TextIO, restores: Restores | None = None) -> int:
    """Run the command line `argv`; `restores` already started for `run` (controller/cli.py)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.func is cmd_policy and args.action == "apply" and not args.file:
        parser.error("policy apply needs FILE")
    if args.func is cmd_policy and args.action == "revert" and args.revision is None:
        parser.error("policy revert needs --revision N")
    if args.func is cmd_run:
        return cmd_run(args, out, err, restores)
    return int(args.func(args, out, err))
