"""Run a simulation: build the fleet, play its timeline, print every matrix, tally the checks.

    python mininet/run.py mininet/scenarios/finance-identity.yaml [--controller HOST:PORT ...]
    goldilocks sim mininet/scenarios/finance-identity.yaml

Each step's events are applied, then the probes are repeated (only the cells that still
differ) until the matrix is as expected or `settle` seconds have passed: flows follow context
asynchronously (agent interval, relay, one bundle), so "eventually, within settle" is the
contract being checked.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import yaml

from controller.model import Attr, Provenance
from fleet.control import Controller, HypervisorLink, wait_for
from fleet.matrix import Cell, Grid, Tally, expected_matrix, mismatches, render
from fleet.options import add_controller_options
from fleet.spec import Event, Simulation, SimulationError, Step, load_simulation
from fleet.traffic import HeldConnection, Server, run_probes

if TYPE_CHECKING:  # Mininet is imported only when a fleet is built
    from fleet.context import Context
    from fleet.net import Fleet
    from fleet.ovs import PrivateOvs


@dataclass
class Running:
    """Everything a simulation started, so that `close()` can end all of it."""

    sim: Simulation
    run_dir: Path
    out: TextIO
    controller: Controller
    ovs_: PrivateOvs | None = None
    fleet_: Fleet | None = None
    context_: Context | None = None
    servers: dict[tuple[str, str], Server] = field(default_factory=dict)
    held: dict[str, HeldConnection] = field(default_factory=dict)
    migrated: list[tuple[str, str, int]] = field(default_factory=list)  # (vm, old hypervisor, old ofport)

    @property
    def ovs(self) -> PrivateOvs:
        assert self.ovs_ is not None, "the simulation's OVS is not running"
        return self.ovs_

    @property
    def fleet(self) -> Fleet:
        assert self.fleet_ is not None, "the fleet is not running"
        return self.fleet_

    @property
    def context(self) -> Context:
        assert self.context_ is not None, "relays and agents are not running"
        return self.context_

    def spawn(self, vm: str) -> Callable[..., subprocess.Popen[bytes]]:
        return self.fleet.host(vm).popen  # type: ignore[no-any-return]

    def address(self, vm: str) -> str:
        return self.fleet.plan.vm(vm).address

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)


def initial_users(sim: Simulation) -> dict[str, list[str]]:
    """Who is logged in at the start: the world's guest-reported users."""
    return {vm.name: sorted(f.value for f in vm.values(Attr.USER) if f.provenance == Provenance.GUEST)
            for vm in sim.world.inventory.vms.values()}


@contextlib.contextmanager
def started(sim: Simulation, out: TextIO, controller: Controller | None = None,
            run_dir: Path | None = None, prefix: str | None = None) -> Iterator[Running]:
    """The fleet, the controller (unless given), servers, relays and agents; all stopped after,
    and the run directory removed unless it was given."""
    # /tmp, short: OVS's unix socket paths must stay under 108 bytes.
    base = run_dir or Path(tempfile.mkdtemp(prefix="glsim-", dir="/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    run = Running(sim, base, out, controller or Controller.local(base))
    saved_env, saved_term = dict(os.environ), _exit_on_sigterm()
    try:
        _bring_up(run, prefix)
        yield run
    finally:
        _close(run)
        os.environ.clear()
        os.environ.update(saved_env)
        if saved_term is not None:
            signal.signal(signal.SIGTERM, saved_term)
        if run_dir is None:
            shutil.rmtree(base, ignore_errors=True)


def _bring_up(run: Running, prefix: str | None) -> None:
    from mininet.log import setLogLevel

    from fleet.context import Context
    from fleet.net import Fleet, new_prefix, plan_fleet
    from fleet.ovs import PrivateOvs

    setLogLevel("warning")
    sim, base, controller = run.sim, run.run_dir, run.controller
    controller.run_dir = base
    if controller.managed:
        controller.database.unlink(missing_ok=True)  # a kept run dir: seed afresh
    (base / "ovs").mkdir(exist_ok=True)
    run.ovs_ = ovs = PrivateOvs(base / "ovs")
    ovs.start()
    os.environ.update(ovs.env())  # Mininet's ovs-vsctl calls reach this OVS, nothing else
    plan = plan_fleet(sim.world.inventory, prefix or new_prefix())
    controller.write_config(sim.world_file or _write_world(sim, base),
                            {hv.name: HypervisorLink(f"unix:{ovs.db_sock}", hv.switch, hv.uplink)
                             for hv in plan.hypervisors})
    controller.start()
    if not controller.managed:
        run.say(f"waiting for the controller at {':'.join(map(str, controller.openflow))} to manage "
                f"this fleet (a config for it: {base / 'goldilocks.yaml'})")
    run.fleet_ = fleet = Fleet.start(plan, ovs, controller.openflow, base / "vms")
    hvs = [hv.name for hv in plan.hypervisors]
    wait_for("every bridge in sync", lambda: controller.in_sync(hvs), timeout=60 if controller.managed else 300)
    for vm, process, ports in sim.servers:
        run.servers[(vm, process)] = Server.start(run.spawn(vm), vm, process, ports)
    run.context_ = Context(controller, base / "vms", fleet.where, sim.apps)
    run.context.start(initial_users(sim), run.spawn, hvs)
    _wait_agents_heard(run)


def _exit_on_sigterm() -> object:
    """SIGTERM (a `timeout`, a service manager) unwinds like Ctrl-C, so that the cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, stop)


def _write_world(sim: Simulation, base: Path) -> Path:
    path = base / "world.yaml"
    path.write_text(yaml.safe_dump(dict(sim.world_data or {}), sort_keys=False))
    return path


def _wait_agents_heard(run: Running) -> None:
    def heard(vm: str) -> bool:
        records = run.controller.call("GET", f"/vms/{vm}/context")
        records = records.get("records", records) if isinstance(records, dict) else records
        return any(r.get("provenance") == "guest" and str(r.get("reported_by", "")).startswith("relay-")
                   for r in records)

    for vm in run.fleet.where:
        wait_for(f"{vm}'s agent heard at the controller", lambda vm=vm: heard(vm), timeout=30, every=0.3)


def _close(run: Running) -> None:
    for item in [*run.held.values(), *run.servers.values()]:
        with contextlib.suppress(Exception):
            item.stop() if isinstance(item, Server) else item.close()
    steps: list[Callable[[], None]] = [
        lambda: run.context_.stop() if run.context_ else None,
        lambda: run.fleet_.stop() if run.fleet_ else None,
        run.controller.stop,
        lambda: run.ovs_.stop() if run.ovs_ else None,
    ]
    for step in steps:  # each one even if an earlier one failed: nothing may be left behind
        try:
            step()
        except Exception as exc:  # noqa: BLE001
            print(f"cleanup: {exc}", file=sys.stderr)


# --------------------------------------------------------------------------- events


def apply(run: Running, event: Event) -> None:
    kind, vm, api = event.kind, event.text("vm"), run.controller.call
    if kind == "login":
        run.context.login(vm, event.text("user"))
    elif kind == "logout":
        run.context.logout(vm, event.text("user"))
    elif kind == "tags":
        api("PUT", f"/vms/{vm}/tags", {"tags": event.get("tags")})
    elif kind == "start":
        process = event.text("process")
        run.servers[(vm, process)] = Server.start(run.spawn(vm), vm, process, event.ports())
    elif kind == "stop":
        run.servers.pop((vm, event.text("process"))).stop()
    elif kind == "quarantine":
        api("POST", f"/vms/{vm}/quarantine", {"reason": event.text("reason") or "simulation"})
    elif kind == "release":
        api("POST", f"/vms/{vm}/release")
    elif kind == "edr":
        api("POST", f"/vms/{vm}/context/authoritative", {"verdict": event.text("verdict")})
    elif kind == "migrate":
        _migrate(run, vm, event.text("to"))
    elif kind == "restart":
        _restart(run, event.text("what"))
    elif kind == "uplink":
        run.fleet.set_uplink(event.text("hypervisor"), event.text("state") == "up")
    elif kind == "flap":
        run.fleet.set_uplink(event.text("hypervisor"), False)
        time.sleep(event.number("seconds", 1.0))
        run.fleet.set_uplink(event.text("hypervisor"), True)
    elif kind == "hold":
        name = event.text("name")
        run.held[name] = HeldConnection.open(run.spawn(event.text("from")), name, run.address(event.text("to")),
                                             int(event.number("port")))
    elif kind == "wait":
        time.sleep(event.number("seconds"))


def _migrate(run: Running, vm: str, to: str) -> None:
    old, old_port = run.fleet.where[vm], run.fleet.ofports[vm]
    run.fleet.migrate(vm, to)
    run.migrated.append((vm, old, old_port))
    run.context.rehome([old, to])


def _restart(run: Running, what: str) -> None:
    hvs = list(run.sim.world.inventory.hypervisors)
    if what == "controller":
        run.controller.restart(signal.SIGKILL)  # the harsh case: no goodbye to the switches
    else:
        run.ovs.stop_vswitchd()
        run.ovs.start_vswitchd()
    wait_for("every bridge in sync again", lambda: run.controller.in_sync(hvs), timeout=60)


# --------------------------------------------------------------------------- checks


def check_matrix(run: Running, grid: Grid, allowed: frozenset[Cell]) -> bool:
    expected = expected_matrix(grid, allowed)
    began = time.monotonic()
    observed = run_probes(expected, run.spawn, run.address)
    deadline = time.monotonic() + run.sim.settle
    while (wrong := mismatches(expected, observed)) and time.monotonic() < deadline:
        time.sleep(0.3)
        observed.update(run_probes(wrong, run.spawn, run.address))
    run.say("\n".join("    " + line for line in render(grid, expected, observed).splitlines()))
    ok = not mismatches(expected, observed)
    run.say(f"    {'as expected' if ok else 'NOT as expected'} ({len(expected)} probes, "
            f"{'settled' if ok else 'gave up'} after {time.monotonic() - began:.1f} s)")
    return ok


def check_connection(run: Running, name: str, want_open: bool) -> bool:
    conn = run.held[name]
    deadline = time.monotonic() + run.sim.settle
    while (alive := conn.alive(timeout=0.5)) != want_open and time.monotonic() < deadline:
        time.sleep(0.2)
    want, got = ("open" if want_open else "cut"), ("open" if alive else "cut")
    ok = alive == want_open
    run.say(f"    connection {name}: {got}" + ("" if ok else f"  ! expected {want}"))
    return ok


def check_left_behind(run: Running, vm: str, hypervisor: str, ofport: int) -> bool:
    """After a migration the old hypervisor's bridge must hold none of the VM's local flows."""
    left: list[str] = []
    deadline = time.monotonic() + run.sim.settle
    while (left := run.fleet.local_flows(hypervisor, vm, ofport)) and time.monotonic() < deadline:
        time.sleep(0.3)
    run.say(f"    flows for {vm} left on {hypervisor}: {len(left)}" + ("" if not left else "  ! expected none"))
    for flow in left[:5]:
        run.say(f"      {flow}")
    return not left


def play_step(run: Running, index: int, step: Step, grid: Grid, tally: Tally) -> Tally:
    run.say(f"\n== step {index}: {step.title}")
    for event in step.events:
        run.say(f"  - {event.describe()}")
        apply(run, event)
    if step.expect is not None:
        tally = tally.add(check_matrix(run, grid, step.expect))
    for name, want in step.connections:
        tally = tally.add(check_connection(run, name, want))
    while run.migrated:
        tally = tally.add(check_left_behind(run, *run.migrated.pop(0)))
    return tally


def play(run: Running) -> Tally:
    sim = run.sim
    grid = Grid.of(sim.sources, sim.targets)
    run.say(f"# {sim.title} ({sim.source})")
    tally = Tally()
    for index, step in enumerate(sim.steps, start=1):
        tally = play_step(run, index, step, grid, tally)
    run.say(f"\n{tally.summary()}")
    return tally


def run_file(path: str, out: TextIO, controller: Controller | None = None,
             run_dir: Path | None = None, prefix: str | None = None) -> Tally:
    sim = load_simulation(path)
    with started(sim, out, controller, run_dir, prefix) as run:
        return play(run)


# --------------------------------------------------------------------------- CLI


def build_parser(prog: str = "run.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Run Goldilocks simulations on a Mininet fleet (docs/simulation.md).")
    p.add_argument("scenario", nargs="+", help="simulation files (mininet/scenarios/*.yaml)")
    add_controller_options(p)
    return p


def given_controller(args: argparse.Namespace) -> Controller | None:
    if not args.controller:
        return None
    host = args.controller.rpartition(":")[0] or "127.0.0.1"
    return Controller.remote(args.controller, args.api or f"http://{host}:8080",
                             args.token or os.environ.get("GOLDILOCKS_TOKEN", ""), Path("."))


def main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = build_parser().parse_args(argv)
    return run_many(args, out)


def run_many(args: argparse.Namespace, out: TextIO) -> int:
    from fleet.ovs import unavailable_reason

    reason = unavailable_reason()
    if reason:
        print(f"cannot simulate here: {reason}", file=sys.stderr)
        return 2
    total = Tally()
    for path in args.scenario:
        try:
            tally = run_file(path, out, given_controller(args), args.run_dir, args.prefix)
        except SimulationError as exc:
            print(str(exc), file=sys.stderr)
            return 2
        total = Tally(total.passed + tally.passed, total.failed + tally.failed)
    if len(args.scenario) > 1:
        print(f"\nall scenarios: {total.summary()}", file=out)
    return 0 if total.failed == 0 else 1
