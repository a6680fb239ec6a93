"""The simulation file format and the matrix logic: pure, no Mininet, no root."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controller.model import VM, Hypervisor, Inventory, VNic
from fleet.matrix import Grid, Tally, expected_matrix, mismatches, render
from fleet.net import plan_fleet
from fleet.spec import SimulationError, load_simulation, parse_simulation

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = sorted((ROOT / "mininet" / "scenarios").glob("*.yaml"))

WORLD = {
    "hypervisors": [{"name": "hv1", "uplink": 100}, {"name": "hv2", "uplink": 100}],
    "vms": [
        {"name": "a", "hypervisor": "hv1", "vnics": [{"mac": "02:00:00:00:00:01", "ips": ["10.0.0.1"]}],
         "context": {"users": ["alice"]}},
        {"name": "b", "hypervisor": "hv2", "vnics": [{"mac": "02:00:00:00:00:02", "ips": ["10.0.0.2"]}]},
    ],
}


def sim(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "world": WORLD,
        "servers": {"b": {"postgres": [5432]}},
        "matrix": {"targets": {"b": ["ping", "tcp/5432"]}},
        "steps": [{"title": "start", "expect": {"a": {"b": ["ping"]}}}],
    }
    data.update(overrides)
    return data


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(SimulationError) as caught:
        parse_simulation(data, "t.yaml")
    return [str(p) for p in caught.value.problems]


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_shipped_scenarios_load(path: Path) -> None:
    loaded = load_simulation(path)
    assert loaded.steps and loaded.targets
    assert all(step.expect is not None or step.connections for step in loaded.steps)


def test_the_four_stories_ship() -> None:
    assert {p.stem for p in SCENARIOS} >= {"three-tier", "finance-identity", "quarantine", "migration"}


def test_a_valid_simulation_parses_to_values() -> None:
    parsed = parse_simulation(sim(steps=[
        {"title": "start", "expect": {"a": {"b": ["ping", "tcp/5432"]}}},
        {"title": "bob", "do": [{"login": {"vm": "a", "user": "bob"}}, {"restart": "controller"}, {"wait": 1}],
         "expect": "same"},
        {"title": "hold", "do": [{"hold": {"name": "c", "from": "a", "to": "b", "port": 5432}}],
         "connections": {"c": "open"}},
    ]))
    assert parsed.sources == ("a", "b")  # default: every VM
    assert parsed.apps == ("postgres",)  # default: the servers' process names
    assert parsed.servers == (("b", "postgres", (5432,)),)
    first, second, third = parsed.steps
    assert first.expect == {("a", "b", "ping"), ("a", "b", "tcp/5432")}
    assert second.expect == first.expect
    assert [e.kind for e in second.events] == ["login", "restart", "wait"]
    assert second.events[1].get("what") == "controller"
    assert third.connections == (("c", True),)
    assert second.events[0].describe() == "bob logs in on a"


@pytest.mark.parametrize(("change", "expected"), [
    ({"steps": [{"title": "x", "do": [{"login": {"vm": "zz", "user": "bob"}}]}]},
     "steps[0].do[0].login.vm: unknown VM 'zz' (VMs: a, b)"),
    ({"steps": [{"title": "x", "do": [{"lgin": {"vm": "a"}}]}]},
     "steps[0].do[0]: unknown event 'lgin'"),
    ({"steps": [{"title": "x", "do": [{"migrate": {"vm": "a", "to": "hv9"}}]}]},
     "steps[0].do[0].migrate.to: unknown hypervisor 'hv9'"),
    ({"steps": [{"title": "x", "do": [{"restart": "database"}]}]},
     "steps[0].do[0].restart.what: can restart controller or ovs, not 'database'"),
    ({"steps": [{"title": "x", "do": [{"uplink": {"hypervisor": "hv1", "state": "sideways"}}]}]},
     "steps[0].do[0].uplink.state: expected up or down"),
    ({"steps": [{"title": "x", "expect": {"a": {"b": ["tcp/22"]}}}]},
     "steps[0].expect.a.b[0]: b tcp/22 is not a column of the matrix"),
    ({"steps": [{"title": "x", "expect": "same"}]}, "steps[0].expect: 'same' but no earlier step"),
    ({"steps": [{"title": "x", "connections": {"c": "open"}}]},
     "steps[0].connections.c: no connection 'c' is held"),
    ({"steps": [{"do": []}]}, "steps[0]: missing required key 'title'"),
    ({"steps": []}, "steps: expected a non-empty list of steps"),
    ({"matrix": {"targets": {"b": ["pong"]}}}, "matrix.targets.b[0]: probe 'pong': expected ping or tcp/PORT"),
    ({"matrix": {"targets": {"b": ["tcp/70000"]}}}, "matrix.targets.b[0]: probe 'tcp/70000'"),
    ({"servers": {"b": {"a-very-long-process-name": [1]}}}, "servers.b.a-very-long-process-name: process name"),
    ({"servers": {"b": {"postgres": [0]}}}, "servers.b.postgres[0]: expected a port number 1-65535"),
    ({"setle": 3}, ("setle: unknown key 'setle' (expected one of apps, matrix, servers, settle, steps, title, "
                    "world); did you mean 'settle'?")),
    ({"world": "no-such-world.yaml"}, "world (no-such-world.yaml)"),
    ({"world": {**WORLD, "vms": [{"name": "a"}]}}, "world: vms[0]: missing required key 'hypervisor'"),
])
def test_a_bad_simulation_names_the_field(change: dict[str, Any], expected: str) -> None:
    found = problems(sim(**change))
    assert any(p.startswith(expected) for p in found), found


def test_every_problem_is_reported_at_once() -> None:
    found = problems(sim(settle=-1, steps=[{"title": "x", "do": [{"login": {"vm": "zz", "user": "u"}},
                                                                 {"wait": "long"}]}]))
    assert len(found) == 3, found
    assert str(SimulationError([], "t.yaml")).startswith("t.yaml: 0 problems")


def test_a_file_with_a_yaml_error_is_located(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("world: x\nsteps: [\n")
    with pytest.raises(SimulationError) as caught:
        load_simulation(bad)
    assert f"{bad}:" in str(caught.value) and "YAML syntax error" in str(caught.value)


# ---- matrices


GRID = Grid.of(["a", "b"], [("b", ["ping", "tcp/5432"]), ("a", ["ping"])])


def test_grid_cells_skip_a_vm_probing_itself() -> None:
    assert GRID.cells() == (("a", "b", "ping"), ("a", "b", "tcp/5432"), ("b", "a", "ping"))


def test_mismatches_and_a_missing_observation() -> None:
    expected = expected_matrix(GRID, frozenset({("a", "b", "ping")}))
    assert expected == {("a", "b", "ping"): True, ("a", "b", "tcp/5432"): False, ("b", "a", "ping"): False}
    observed = {("a", "b", "ping"): True, ("a", "b", "tcp/5432"): True}
    assert mismatches(expected, observed) == (("a", "b", "tcp/5432"), ("b", "a", "ping"))
    assert mismatches(expected, {**observed, ("a", "b", "tcp/5432"): False, ("b", "a", "ping"): False}) == ()


def test_render_marks_mismatches_and_lists_them() -> None:
    expected = expected_matrix(GRID, frozenset({("a", "b", "ping")}))
    observed = {("a", "b", "ping"): True, ("a", "b", "tcp/5432"): True, ("b", "a", "ping"): False}
    lines = render(GRID, expected, observed).splitlines()
    assert lines[0].split() == ["from", "\\", "to", "b", "b", "a"]
    assert lines[1].split() == ["ping", "tcp/5432", "ping"]
    assert lines[3].split() == ["a", "allow", "ALLOW", "!", "-"]
    assert lines[4].split() == ["b", "-", "-", "deny"]
    assert lines[5] == "! a -> b tcp/5432: expected deny, got allow"
    assert len(lines) == 6


def test_tally() -> None:
    assert Tally().add(True).add(False).add(True).summary() == "2 passed, 1 failed"


# ---- the fleet plan


def test_plan_names_fit_interfaces_and_ports_do_not_clash() -> None:
    nic = lambda n, port=None: (VNic(mac=f"02:00:00:00:00:0{n}", ips=(f"10.0.0.{n}",), ofport=port),)
    vms = {str(n): VM(str(n), f"vm{n}", "hv1" if n < 4 else "hv2", nic(n, 100 if n == 1 else None))
           for n in range(1, 7)}
    inv = Inventory({h: Hypervisor(h, uplink_ofport=100) for h in ("hv1", "hv2")}, vms, None)
    plan = plan_fleet(inv, "g1a2")
    names = [hv.switch for hv in plan.hypervisors] + [hv.uplink for hv in plan.hypervisors] + [vm.port for vm in plan.vms]
    assert all(len(n) <= 15 for n in names) and len(set(names)) == len(names)
    for hv in plan.hypervisors:
        ports = [vm.ofport for vm in plan.vms if vm.hypervisor == hv.name] + [hv.uplink_ofport]
        assert len(set(ports)) == len(ports), ports  # vm1 asked for the uplink's port 100
    assert plan.vm("vm1").external_ids() == {"iface-id": "1-02:00:00:00:00:01", "attached-mac": "02:00:00:00:00:01",
                                             "vm-id": "1"}


# ---- what runs in the VMs


def test_probe_commands() -> None:
    from fleet.traffic import probe_command

    assert probe_command("ping", "10.0.0.1", 1.0) == ["ping", "-n", "-q", "-c", "1", "-W", "1", "10.0.0.1"]
    assert probe_command("tcp/5432", "10.0.0.1", 0.5) == ["timeout", "0.5", "bash", "-c", "exec 3<>/dev/tcp/10.0.0.1/5432"]


def test_utmp_records_for_logins_and_logouts() -> None:
    from agent import utmp
    from fleet.context import utmp_entries

    entries = utmp_entries(["alice"], ["bob"], 1700000000)
    assert [(e.type, e.user) for e in entries] == [(utmp.BOOT_TIME, "reboot"), (utmp.USER_PROCESS, "alice"),
                                                  (utmp.DEAD_PROCESS, "bob")]


def test_demo_and_sim_say_why_they_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    import fleet.ovs
    from controller.cli import main

    monkeypatch.setattr(fleet.ovs.os, "geteuid", lambda: 1000)
    err = io.StringIO()
    assert main(["demo"], io.StringIO(), err) == 2
    assert "need root" in err.getvalue() and "--compile-only" in err.getvalue()
    assert main(["sim", str(SCENARIOS[0])], io.StringIO(), io.StringIO()) == 2


def test_a_grid_world_of_n_hypervisors_with_m_vms_each() -> None:
    parsed = parse_simulation(sim(world={"grid": {"hypervisors": 3, "vms_per_hypervisor": 4},
                                         "groups": {"all": "tag.index != ''"},
                                         "policy": {"rules": [{"id": "ping", "tier": "application", "position": 1,
                                                               "source": {"group": "all"}, "destination": {"group": "all"},
                                                               "services": ["icmp"], "action": "allow"}]}},
                                  servers={}, matrix={"targets": {"hv3-vm4": ["ping"]}},
                                  steps=[{"title": "x", "expect": {"hv1-vm1": {"hv3-vm4": ["ping"]}}}]))
    inventory = parsed.world.inventory
    assert sorted(inventory.hypervisors) == ["hv1", "hv2", "hv3"]
    assert sorted(vm.name for vm in inventory.vms.values() if vm.hypervisor == "hv2") == [f"hv2-vm{v}" for v in range(1, 5)]
    assert len({vm.ips[0] for vm in inventory.vms.values()}) == 12
    plan = plan_fleet(inventory, "gabcd")
    assert len(plan.vms) == 12 and all(len(vm.port) <= 15 for vm in plan.vms)


def test_a_bad_grid_is_named() -> None:
    assert any(p.startswith("world.grid: need 1 or more") for p in problems(sim(world={"grid": {"hypervisors": 0, "vms_per_hypervisor": 2}})))
    assert any("give them or the grid" in p for p in problems(sim(world={**WORLD, "grid": {"hypervisors": 1, "vms_per_hypervisor": 1}})))
