"""The simulation scenario file (docs/simulation.md), parsed into values. Pure: no I/O but
reading the file(s); every fault is reported at once with its location, as for world files.

A simulation names a world (a scenario file of docs/scenario.md, or one inline), the servers
to start in the VMs, the probes that make up the reachability matrix, and a timeline: steps
of events, each followed by the matrix expected once the fleet has settled.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from controller.policy.load import at, mapping_fields, str_field, type_name
from controller.policy.validate import Problem
from controller.scenario import (
    Scenario,
    ScenarioError,
    load_scenario,
    load_yaml,
    parse_scenario,
    yaml_problem,
)

PROBE = re.compile(r"^(ping|tcp/(\d{1,5}))$")
DEFAULT_SETTLE = 15.0

# Each event kind: its required and optional keys (a bare value is allowed where noted below).
EVENT_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "login": (("vm", "user"), ()),
    "logout": (("vm", "user"), ()),
    "tags": (("vm", "tags"), ()),
    "start": (("vm", "process", "ports"), ()),
    "stop": (("vm", "process"), ()),
    "quarantine": (("vm",), ("reason",)),
    "release": (("vm",), ()),
    "edr": (("vm", "verdict"), ()),
    "migrate": (("vm", "to"), ()),
    "restart": (("what",), ()),
    "uplink": (("hypervisor", "state"), ()),
    "flap": (("hypervisor",), ("seconds",)),
    "hold": (("name", "from", "to", "port"), ()),
    "wait": (("seconds",), ()),
}
# Events that may be written with a bare value: `restart: controller`, `wait: 2`, `release: vm`.
BARE_KEY = {"restart": "what", "wait": "seconds", "release": "vm"}
DESCRIPTIONS = {
    "login": "{user} logs in on {vm}",
    "logout": "{user} logs out of {vm}",
    "tags": "{vm}'s tags become: {tags}",
    "start": "{process} starts on {vm} ({ports})",
    "stop": "{process} stops on {vm}",
    "quarantine": "an operator quarantines {vm}{reason}",
    "release": "an operator releases {vm}",
    "edr": "the EDR calls {vm} {verdict}",
    "migrate": "{vm} migrates to {to}",
    "restart": "{what} restarts",
    "uplink": "{hypervisor}'s uplink goes {state}",
    "flap": "{hypervisor}'s uplink flaps ({seconds} s down)",
    "hold": "connection {name} held open: {from} -> {to} tcp/{port}",
    "wait": "wait {seconds} s",
}
RESTARTABLE = ("controller", "ovs")
VERDICTS = ("clean", "suspicious", "malicious", "unknown")


class SimulationError(ScenarioError):
    """Every problem of a simulation file (and of its world), each with its location."""


@dataclass(frozen=True)
class Event:
    """One thing that happens in the fleet; `args` as written (validated), sorted by key."""

    kind: str
    args: tuple[tuple[str, object], ...]

    def get(self, key: str, default: object = None) -> object:
        return dict(self.args).get(key, default)

    def text(self, key: str) -> str:
        return str(self.get(key, ""))

    def number(self, key: str, default: float = 0.0) -> float:
        value = self.get(key, default)
        return float(value) if isinstance(value, (int, float)) else default

    def ports(self) -> tuple[int, ...]:
        value = self.get("ports", ())
        return tuple(int(p) for p in value) if isinstance(value, tuple) else ()

    def describe(self) -> str:
        """One line for the runner's output: "alice logs in on fin-desk2"."""
        values = {**dict(self.args), "ports": ", ".join(f"tcp/{p}" for p in self.ports()),
                  "reason": f" ({self.text('reason')})" if self.get("reason") else "",
                  "seconds": f"{self.number('seconds', 1.0):g}",
                  "tags": ", ".join(f"{k}={v}" for k, v in dict(self.get("tags") or {}).items())}
        return DESCRIPTIONS[self.kind].format_map(values)


@dataclass(frozen=True)
class Step:
    title: str
    events: tuple[Event, ...]
    expect: frozenset[tuple[str, str, str]] | None  # allowed (src, dst, probe); None: no matrix
    connections: tuple[tuple[str, bool], ...] = ()  # held connection -> expected alive


@dataclass(frozen=True)
class Simulation:
    title: str
    source: str
    world: Scenario
    world_file: Path | None  # the world's file, or None when it is inline (`world_data`)
    world_data: Mapping[str, object] | None
    servers: tuple[tuple[str, str, tuple[int, ...]], ...]  # (vm, process name, ports)
    apps: tuple[str, ...]  # process names the agents report as apps
    sources: tuple[str, ...]
    targets: tuple[tuple[str, tuple[str, ...]], ...]  # destination VM -> probes
    settle: float
    steps: tuple[Step, ...] = field(default=())

    @property
    def vms(self) -> tuple[str, ...]:
        return tuple(sorted(vm.name for vm in self.world.inventory.vms.values()))


_TOP = ("title", "world", "servers", "apps", "matrix", "settle", "steps")


def load_simulation(path: str | os.PathLike[str]) -> Simulation:
    source = os.fspath(path)
    try:
        data = load_yaml(Path(source).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise SimulationError([Problem(source, f"cannot read file: {exc}")], source) from exc
    except yaml.YAMLError as exc:
        raise SimulationError([yaml_problem(source, exc)], source) from exc
    return parse_simulation(data, source, Path(source).resolve().parent)


def parse_simulation(data: object, source: str = "<simulation>", base: Path = Path(".")) -> Simulation:
    """A Simulation from plain data; raise SimulationError listing every problem."""
    problems: list[Problem] = []
    top = mapping_fields(data, "", ("world", "steps"), tuple(k for k in _TOP if k not in ("world", "steps")),
                         problems)
    if top is None:
        raise SimulationError(problems, source)
    world, world_file, world_data = _world(top.get("world"), base, problems)
    if world is None:
        raise SimulationError(problems, source)
    names = {vm.name for vm in world.inventory.vms.values()}
    hvs = set(world.inventory.hypervisors)
    servers = _servers(top.get("servers", {}), names, problems)
    apps = _names(top.get("apps", sorted({p for _, p, _ in servers})), "apps", problems)
    sources, targets = _matrix(top.get("matrix"), names, problems)
    settle = _seconds(top.get("settle", DEFAULT_SETTLE), "settle", problems)
    title = str_field(top.get("title", Path(source).stem), "title", problems) or ""
    steps = _steps(top.get("steps"), _Names(names, hvs), sources, targets, problems)
    if problems:
        raise SimulationError(problems, source)
    return Simulation(title, source, world, world_file, world_data, servers, apps, sources, targets,
                      settle or DEFAULT_SETTLE, steps)


@dataclass(frozen=True)
class _Names:
    vms: set[str]
    hypervisors: set[str]


def grid_world(hypervisors: int, vms_per_hypervisor: int) -> dict[str, object]:
    """A world of N hypervisors with M VMs each: `hv1`..`hvN`, VMs `hv1-vm1`.. tagged with their
    hypervisor and index, addresses 10.0.0.X/24 and 02:00:00:00:HH:VV."""
    return {
        "hypervisors": [{"name": f"hv{h}", "uplink": 100, "dpid": h} for h in range(1, hypervisors + 1)],
        "vms": [{"name": f"hv{h}-vm{v}", "hypervisor": f"hv{h}", "tags": {"host": f"hv{h}", "index": str(v)},
                 "vnics": [{"mac": f"02:00:00:00:{h:02x}:{v:02x}",
                            "ips": [f"10.0.0.{(h - 1) * vms_per_hypervisor + v}"]}]}
                for h in range(1, hypervisors + 1) for v in range(1, vms_per_hypervisor + 1)],
    }


def _grid(value: Mapping[str, object], problems: list[Problem]) -> Mapping[str, object] | None:
    """`world: {grid: {hypervisors: N, vms_per_hypervisor: M}, groups: .., policy: ..}`."""
    grid = mapping_fields(value["grid"], "world.grid", ("hypervisors", "vms_per_hypervisor"), (), problems)
    if grid is None or len(grid) != 2:
        return None
    n, m = grid["hypervisors"], grid["vms_per_hypervisor"]
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in (n, m)) or n * m > 250:  # type: ignore[operator]
        problems.append(Problem("world.grid", f"need 1 or more hypervisors and VMs each, at most 250 VMs in all "
                                              f"(one /24), got {n} x {m}"))
        return None
    clash = [k for k in ("hypervisors", "vms") if k in value]
    if clash:
        problems.append(Problem("world", f"grid makes the {' and '.join(clash)}: give them or the grid, not both"))
        return None
    return {**{k: v for k, v in value.items() if k != "grid"}, **grid_world(int(n), int(m))}  # type: ignore[call-overload]


def _world(value: object, base: Path, problems: list[Problem]) -> tuple[Scenario | None, Path | None, Mapping[str, object] | None]:
    if isinstance(value, Mapping) and "grid" in value:
        value = _grid(value, problems)
        if value is None:
            return None, None, None
    try:
        if isinstance(value, str):
            path = (base / value).resolve()
            return load_scenario(path), path, None
        if isinstance(value, Mapping):
            return parse_scenario(value, "world"), None, value
    except ScenarioError as exc:
        prefix = "world" if isinstance(value, Mapping) else f"world ({value})"
        problems.extend(Problem(f"{prefix}: {p.location}", p.message) for p in exc.problems)
        return None, None, None
    problems.append(Problem("world", f"expected a scenario file name or an inline scenario, got {type_name(value)}"))
    return None, None, None


def _vm(value: object, loc: str, names: set[str], problems: list[Problem]) -> str | None:
    name = str_field(value, loc, problems)
    if name is not None and name not in names:
        problems.append(Problem(loc, f"unknown VM {name!r} (VMs: {', '.join(sorted(names))})"))
        return None
    return name


def _port(value: object, loc: str, problems: list[Problem]) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        problems.append(Problem(loc, f"expected a port number 1-65535, got {value!r}"))
        return None
    return value


def _ports(value: object, loc: str, problems: list[Problem]) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        problems.append(Problem(loc, f"expected a non-empty list of port numbers, got {type_name(value)}"))
        return ()
    ports = [_port(p, f"{loc}[{i}]", problems) for i, p in enumerate(value)]
    return tuple(p for p in ports if p is not None)


def _seconds(value: object, loc: str, problems: list[Problem]) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 600:
        problems.append(Problem(loc, f"expected seconds (0-600), got {value!r}"))
        return None
    return float(value)


def _names(value: object, loc: str, problems: list[Problem]) -> tuple[str, ...]:
    if not isinstance(value, list):
        problems.append(Problem(loc, f"expected a list of names, got {type_name(value)}"))
        return ()
    return tuple(n for i, v in enumerate(value) if (n := str_field(v, f"{loc}[{i}]", problems)) is not None)


def _servers(value: object, names: set[str], problems: list[Problem]) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    if not isinstance(value, Mapping):
        problems.append(Problem("servers", f"expected VM -> {{process: [ports]}}, got {type_name(value)}"))
        return ()
    servers = []
    for vm, processes in value.items():
        loc = at("servers", str(vm))
        name = _vm(vm, loc, names, problems)
        if not isinstance(processes, Mapping):
            problems.append(Problem(loc, f"expected process name -> [ports], got {type_name(processes)}"))
            continue
        for process, ports in processes.items():
            ploc = at(loc, str(process))
            if _process_name(process, ploc, problems) and name:
                servers.append((name, str(process), _ports(ports, ploc, problems)))
    return tuple(servers)


def _process_name(value: object, loc: str, problems: list[Problem]) -> bool:
    # The kernel keeps 15 characters of a process name (/proc/PID/comm): the agent sees no more.
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", value):
        problems.append(Problem(loc, f"process name {value!r}: 1-15 characters of letters, digits, _ . -"))
        return False
    return True


def _probe(value: object, loc: str, problems: list[Problem]) -> str | None:
    if not isinstance(value, str) or not (m := PROBE.match(value)) or (m.group(2) and not 1 <= int(m.group(2)) <= 65535):
        problems.append(Problem(loc, f"probe {value!r}: expected ping or tcp/PORT"))
        return None
    return value


def _matrix(value: object, names: set[str], problems: list[Problem]) -> tuple[tuple[str, ...], tuple[tuple[str, tuple[str, ...]], ...]]:
    top = mapping_fields(value, "matrix", ("targets",), ("sources",), problems)
    if top is None:
        return (), ()
    sources = top.get("sources", sorted(names))
    srcs = tuple(v for i, s in enumerate(sources if isinstance(sources, list) else [])
                 if (v := _vm(s, f"matrix.sources[{i}]", names, problems)))
    if not isinstance(sources, list):
        problems.append(Problem("matrix.sources", f"expected a list of VMs, got {type_name(sources)}"))
    targets = top.get("targets")
    if not isinstance(targets, Mapping) or not targets:
        problems.append(Problem("matrix.targets", f"expected VM -> [probes], got {type_name(targets)}"))
        return srcs, ()
    out = []
    for dst, probes in targets.items():
        loc = at("matrix.targets", str(dst))
        name = _vm(dst, loc, names, problems)
        if not isinstance(probes, list) or not probes:
            problems.append(Problem(loc, f"expected a list of probes (ping, tcp/PORT), got {type_name(probes)}"))
            continue
        checked = tuple(p for i, v in enumerate(probes) if (p := _probe(v, f"{loc}[{i}]", problems)))
        if name:
            out.append((name, checked))
    return srcs, tuple(out)


def _steps(value: object, names: _Names, sources: tuple[str, ...],
           targets: tuple[tuple[str, tuple[str, ...]], ...], problems: list[Problem]) -> tuple[Step, ...]:
    if not isinstance(value, list) or not value:
        problems.append(Problem("steps", f"expected a non-empty list of steps, got {type_name(value)}"))
        return ()
    steps: list[Step] = []
    held: set[str] = set()
    for i, item in enumerate(value):
        loc = f"steps[{i}]"
        step = mapping_fields(item, loc, ("title",), ("do", "expect", "connections"), problems)
        if step is None:
            continue
        title = str_field(step.get("title"), at(loc, "title"), problems) or ""
        events = _events(step.get("do", []), at(loc, "do"), names, held, problems)
        expect = _expect(step.get("expect"), at(loc, "expect"), sources, targets, steps, problems)
        conns = _connections(step.get("connections", {}), at(loc, "connections"), held, problems)
        steps.append(Step(title, events, expect, conns))
    return tuple(steps)


def _events(value: object, loc: str, names: _Names, held: set[str], problems: list[Problem]) -> tuple[Event, ...]:
    if not isinstance(value, list):
        problems.append(Problem(loc, f"expected a list of events, got {type_name(value)}"))
        return ()
    events = []
    for i, item in enumerate(value):
        eloc = f"{loc}[{i}]"
        if not isinstance(item, Mapping) or len(item) != 1:
            problems.append(Problem(eloc, f"expected one event (one of {', '.join(EVENT_KEYS)}), got {item!r}"))
            continue
        (kind, body), = item.items()
        if kind not in EVENT_KEYS:
            problems.append(Problem(eloc, mapping_problem(kind)))
            continue
        if kind in BARE_KEY and not isinstance(body, Mapping):
            body = {BARE_KEY[kind]: body}
        event = _event(str(kind), body, at(eloc, str(kind)), names, held, problems)
        if event is not None:
            events.append(event)
    return tuple(events)


def mapping_problem(kind: object) -> str:
    problems: list[Problem] = []
    mapping_fields({kind: None}, "", (), tuple(EVENT_KEYS), problems)
    return problems[0].message.replace("unknown key", "unknown event")


def _event(kind: str, body: object, loc: str, names: _Names, held: set[str], problems: list[Problem]) -> Event | None:
    required, optional = EVENT_KEYS[kind]
    fields = mapping_fields(body, loc, required, optional, problems)
    if fields is None or any(k not in fields for k in required):
        return None
    before = len(problems)
    args: dict[str, object] = dict(fields)
    for key, value in fields.items():
        kloc = at(loc, key)
        if key in ("vm", "from") or (key == "to" and kind == "hold"):
            _vm(value, kloc, names.vms, problems)
        elif key in ("hypervisor",) or (key == "to" and kind == "migrate"):
            if value not in names.hypervisors:
                problems.append(Problem(kloc, f"unknown hypervisor {value!r} (hypervisors: {', '.join(sorted(names.hypervisors))})"))
        elif key == "port":
            _port(value, kloc, problems)
        elif key == "ports":
            args[key] = _ports(value, kloc, problems)
        elif key == "process":
            _process_name(value, kloc, problems)
        elif key in ("seconds",):
            _seconds(value, kloc, problems)
        elif key == "tags":
            _tags(value, kloc, problems)
        elif key == "what" and value not in RESTARTABLE:
            problems.append(Problem(kloc, f"can restart {' or '.join(RESTARTABLE)}, not {value!r}"))
        elif key == "state" and value not in ("up", "down"):
            problems.append(Problem(kloc, f"expected up or down, got {value!r}"))
        elif key == "verdict" and value not in VERDICTS:
            problems.append(Problem(kloc, f"expected one of {', '.join(VERDICTS)}, got {value!r}"))
        elif key in ("user", "name", "reason"):
            str_field(value, kloc, problems)
    if kind == "hold":
        held.add(str(fields["name"]))
    if len(problems) > before:
        return None
    return Event(kind, tuple(sorted(args.items())))


def _tags(value: object, loc: str, problems: list[Problem]) -> None:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        problems.append(Problem(loc, "expected tag name -> string value (quote values like 'true')"))


def _expect(value: object, loc: str, sources: tuple[str, ...], targets: tuple[tuple[str, tuple[str, ...]], ...],
            steps: list[Step], problems: list[Problem]) -> frozenset[tuple[str, str, str]] | None:
    """`expect`: source -> {destination: [allowed probes]}; every other cell is expected denied.
    `same` repeats the last matrix expected before this step."""
    if value is None:
        return None
    if value == "same":
        earlier = [s.expect for s in steps if s.expect is not None]
        if not earlier:
            problems.append(Problem(loc, "'same' but no earlier step expects a matrix"))
            return None
        return earlier[-1]
    if not isinstance(value, Mapping):
        problems.append(Problem(loc, f"expected source -> {{destination: [probes]}} or 'same', got {type_name(value)}"))
        return None
    columns = {(dst, probe) for dst, probes in targets for probe in probes}
    allowed = set()
    for src, row in value.items():
        rloc = at(loc, str(src))
        if src not in sources:
            problems.append(Problem(rloc, f"{src!r} is not a source of the matrix (matrix.sources)"))
            continue
        if not isinstance(row, Mapping):
            problems.append(Problem(rloc, f"expected destination -> [probes], got {type_name(row)}"))
            continue
        for dst, probes in row.items():
            dloc = at(rloc, str(dst))
            for j, probe in enumerate(probes if isinstance(probes, list) else [probes]):
                if (dst, probe) not in columns:
                    problems.append(Problem(f"{dloc}[{j}]", f"{dst} {probe} is not a column of the matrix (matrix.targets)"))
                else:
                    allowed.add((str(src), str(dst), str(probe)))
    return frozenset(allowed)


def _connections(value: object, loc: str, held: set[str], problems: list[Problem]) -> tuple[tuple[str, bool], ...]:
    if not isinstance(value, Mapping):
        problems.append(Problem(loc, f"expected connection name -> open or cut, got {type_name(value)}"))
        return ()
    out = []
    for name, state in value.items():
        cloc = at(loc, str(name))
        if name not in held:
            problems.append(Problem(cloc, f"no connection {name!r} is held by this or an earlier step (hold:)"))
        elif state not in ("open", "cut"):
            problems.append(Problem(cloc, f"expected open or cut, got {state!r}"))
        else:
            out.append((str(name), state == "open"))
    return tuple(out)
