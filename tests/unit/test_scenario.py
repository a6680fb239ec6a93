"""Scenario files: the examples load, facts carry provenance, every fault is located."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from controller.model import Attr, Fact, Gateway, Hypervisor, Port, Provenance, VNic
from controller.scenario import ScenarioError, default_vm_uuid, load_scenario, parse_scenario

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NOW = 1700000000.0


def minimal(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "now": NOW,
        "hypervisors": [{"name": "hv1", "uplink": 100, "dpid": 1}],
        "vms": [{"name": "vm1", "hypervisor": "hv1", "vnics": [{"mac": "02:00:00:00:00:01", "ips": ["10.0.0.1"], "ofport": 1}]}],
    }
    data.update(overrides)
    return data


def vm(name: str = "vm2", **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"name": name, "hypervisor": "hv1"}
    data.update(overrides)
    return data


def problems_of(data: object) -> dict[str, str]:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data)
    return {p.location: p.message for p in info.value.problems}


# ---- the examples ----------------------------------------------------------------------------


def test_three_tier_example() -> None:
    s = load_scenario(EXAMPLES / "three-tier.yaml")
    inv = s.inventory
    assert s.now == NOW
    assert inv.gateway == Gateway("10.0.0.254", "02:00:00:00:00:fe")
    assert inv.hypervisors == {"hv1": Hypervisor("hv1", 100, 1), "hv2": Hypervisor("hv2", 100, 2)}
    placement = {v.name: v.hypervisor for v in inv.vms.values()}
    assert placement == {"web1": "hv1", "app1": "hv1", "admin1": "hv1", "web2": "hv2", "app2": "hv2", "db1": "hv2"}
    for name in placement:
        one = inv.vm_by_name(name)
        assert one is not None and one.uuid == default_vm_uuid(name)
    db1 = inv.vm_by_name("db1")
    assert db1 is not None
    assert db1.app_ports("postgres") == (Port("tcp", 5432, 5432),)
    assert db1.values(Attr.TAG, "tier") == (Fact(Attr.TAG, "tier", "db", Provenance.PLATFORM, NOW),)
    assert db1.values(Attr.APP, "postgres")[0].provenance is Provenance.GUEST
    rules = {r.id: r for r in s.policy.rules}
    assert [r.tier for r in s.policy.rules] == ["emergency", "infrastructure"] + ["application"] * 4
    assert not rules["lockdown-db"].enabled
    assert rules["watch-web-to-db"].monitor and not rules["watch-web-to-db"].enforced
    assert set(s.groups) == {"web", "app", "db", "admin"}


def test_finance_identity_example() -> None:
    s = load_scenario(EXAMPLES / "finance-identity.yaml")
    assert s.directory == {"alice": frozenset({"finance"}), "bob": frozenset({"engineering"}),
                           "carol": frozenset({"engineering"})}
    users = {v.name: {f.value for f in v.values(Attr.USER)} for v in s.inventory.vms.values()}
    assert users == {"fin-desk1": {"alice"}, "fin-desk2": {"bob"}, "eng-desk1": {"carol"}, "ledger-db": set()}
    desk = s.inventory.vm_by_name("fin-desk1")
    assert desk is not None
    assert Fact(Attr.USER, "", "alice", Provenance.GUEST, NOW) in desk.facts
    assert Fact(Attr.TAG, "role", "desktop", Provenance.PLATFORM, NOW) in desk.facts
    assert {r.id for r in s.policy.rules} == {"quarantine-out", "quarantine-in", "finance-to-ledger", "desktops-ping-ledger"}
    assert s.policy.groups["finance-desktops"] == "tag.role == 'desktop' && usergroup == 'finance'"


# ---- building the inventory ------------------------------------------------------------------


def test_facts_from_every_section_with_provenance() -> None:
    s = parse_scenario(minimal(vms=[vm(
        "vm1",
        uuid="8D5E0000-0000-4000-8000-000000000001",
        tags={"role": "desktop"},
        vnics=[{"mac": "02-00-00-00-00-AA", "ips": ["10.0.0.5"], "ofport": 7, "name": "tap1"}],
        context={"observed_at": 1600000000, "users": ["alice"], "apps": {"nginx": ["tcp/443", "tcp/80"]},
                 "os": "linux", "labels": ["pci"], "posture": {"disk_encrypted": "pass", "av_running": "fail"}},
        authoritative={"users": ["alice"], "posture": {"edr": "pass"}},
    )]))
    (one,) = s.inventory.vms.values()
    assert one.uuid == "8d5e0000-0000-4000-8000-000000000001"
    assert one.vnics == (VNic("02:00:00:00:00:aa", ("10.0.0.5",), 7, "tap1"),)
    guest, auth, platform = Provenance.GUEST, Provenance.AUTHORITATIVE, Provenance.PLATFORM
    t = 1600000000.0
    assert one.facts == frozenset({
        Fact(Attr.TAG, "role", "desktop", platform, NOW),
        Fact(Attr.USER, "", "alice", guest, t),
        Fact(Attr.APP, "nginx", "tcp/80,tcp/443", guest, t),
        Fact(Attr.OS, "", "linux", guest, t),
        Fact(Attr.LABEL, "", "pci", guest, t),
        Fact(Attr.POSTURE, "disk_encrypted", "pass", guest, t),
        Fact(Attr.POSTURE, "av_running", "fail", guest, t),
        Fact(Attr.USER, "", "alice", auth, NOW),
        Fact(Attr.POSTURE, "edr", "pass", auth, NOW),
    })


def test_defaults() -> None:
    s = parse_scenario({"hypervisors": [{"name": "hv1"}], "vms": [{"name": "a", "hypervisor": "hv1"}]})
    assert s.now == 0.0 and s.inventory.gateway is None and s.directory == {}
    assert s.policy.rules == () and dict(s.groups) == {}
    (one,) = s.inventory.vms.values()
    assert one.uuid == str(uuid.uuid5(uuid.NAMESPACE_URL, "goldilocks:vm:a"))
    assert one.vnics == () and one.facts == frozenset()
    assert s.inventory.hypervisors["hv1"] == Hypervisor("hv1")


def test_unbound_vnic_has_no_ofport() -> None:
    s = parse_scenario(minimal(vms=[vm("a", vnics=[{"mac": "02:00:00:00:00:09"}])]))
    (one,) = s.inventory.vms.values()
    assert one.vnics == (VNic("02:00:00:00:00:09", (), None, ""),)


# ---- problems --------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "location", "fragment"), [
    (minimal(hypervisor=[]), "hypervisor", "did you mean 'hypervisors'"),
    (minimal(now="noon"), "now", "epoch seconds"),
    (minimal(gateway={"ip": "10.0.0.254"}), "gateway", "missing required key 'mac'"),
    (minimal(gateway={"ip": "10.0.0.1", "mac": "02:00:00:00:00:fe"}), "vms[0].vnics[0].ips[0]", "duplicate IP address"),
    (minimal(hypervisors=[{"name": "hv1"}, {"name": "hv1"}]), "hypervisors[1].name", "duplicate hypervisor name"),
    (minimal(hypervisors=[{"name": "hv1", "dpid": 1}, {"name": "hv2", "dpid": 1}]), "hypervisors[1].dpid", "duplicate datapath id"),
    (minimal(hypervisors=[{"name": "hv1", "uplink": 0}]), "hypervisors[0].uplink", "out of range"),
    (minimal(hypervisors=[{"name": "hv1", "uplink": 1}]), "vms[0].vnics[0].ofport", "uplink"),
    (minimal(directory={"alice": "finance"}), "directory.alice", "expected a list"),
    (minimal(vms=[vm("a", hypervisor="hv9")]), "vms[0].hypervisor", "unknown hypervisor 'hv9'"),
    (minimal(vms=[{"hypervisor": "hv1"}]), "vms[0]", "missing required key 'name'"),
    (minimal(vms=[vm("a", uuid="nope")]), "vms[0].uuid", "not a UUID"),
    (minimal(vms=[vm("a", tag={})]), "vms[0].tag", "did you mean 'tags'"),
    (minimal(vms=[vm("a", tags={"quarantine": True})]), "vms[0].tags.quarantine", "quote it"),
    (minimal(vms=[vm("a", tags={"bad key": "x"})]), "vms[0].tags.bad key", "bad key"),
    (minimal(vms=[vm("a", vnics=[{"mac": "02:00:00:00:00"}])]), "vms[0].vnics[0].mac", "not a MAC address"),
    (minimal(vms=[vm("a", vnics=[{"mac": 7776000001}])]), "vms[0].vnics[0].mac", "quote it"),
    (minimal(vms=[vm("a", vnics=[{"mac": "02:00:00:00:00:02", "ips": ["10.0.0.256"]}])]), "vms[0].vnics[0].ips[0]", "not an IPv4 address"),
    (minimal(vms=[vm("a", vnics=[{"mac": "02:00:00:00:00:02", "ofport": "1"}])]), "vms[0].vnics[0].ofport", "whole number"),
    (minimal(vms=[vm("a", vnics=[{"ip": []}])]), "vms[0].vnics[0].ip", "unknown key 'ip'"),
    (minimal(vms=[vm("a", context={"user": ["x"]})]), "vms[0].context.user", "did you mean 'users'"),
    (minimal(vms=[vm("a", context={"apps": {"pg": ["tcp/99999"]}})]), "vms[0].context.apps.pg[0]", "out of range"),
    (minimal(vms=[vm("a", context={"apps": {"pg": ["any"]}})]), "vms[0].context.apps.pg[0]", "tcp or udp"),
    (minimal(vms=[vm("a", context={"posture": {"edr": "ok"}})]), "vms[0].context.posture.edr", "pass or fail"),
    (minimal(vms=[vm("a", authoritative={"observed_at": -1})]), "vms[0].authoritative.observed_at", "negative"),
    (minimal(groups={"g": "tag.x =="}), "groups.g", "column"),
    (minimal(policy={"rules": [{"id": "r"}]}), "policy.rules[0]", "missing required key"),
    ([], "<top>", "expected a mapping"),
])
def test_problem_locations(data: object, location: str, fragment: str) -> None:
    found = problems_of(data)
    assert location in found, found
    assert fragment in found[location], found


def test_duplicates_across_vms() -> None:
    nic = {"mac": "02:00:00:00:00:01", "ips": ["10.0.0.1"], "ofport": 1}
    found = problems_of(minimal(vms=[
        vm("a", vnics=[nic]),
        vm("a", vnics=[dict(nic, mac="02:00:00:00:00:01".upper())]),
    ]))
    assert "duplicate VM name 'a' (already used at vms[0].name)" == found["vms[1].name"]
    assert "duplicate VM uuid" in found["vms[1].uuid"]
    assert "duplicate MAC address '02:00:00:00:00:01'" in found["vms[1].vnics[0].mac"]
    assert "duplicate IP address '10.0.0.1'" in found["vms[1].vnics[0].ips[0]"]
    assert "ofport 1 on hypervisor 'hv1' is already used by vNIC vms[0].vnics[0]" in found["vms[1].vnics[0].ofport"]


def test_same_ofport_on_different_hypervisors_is_fine() -> None:
    s = parse_scenario(minimal(
        hypervisors=[{"name": "hv1"}, {"name": "hv2"}],
        vms=[vm("a", vnics=[{"mac": "02:00:00:00:00:01", "ofport": 1}]),
             vm("b", hypervisor="hv2", vnics=[{"mac": "02:00:00:00:00:02", "ofport": 1}])],
    ))
    assert len(s.inventory.vms) == 2


def test_every_problem_in_one_error() -> None:
    data = minimal(
        vms=[vm("a", hypervisor="hv9"), vm("b", tags={"t": 1})],
        groups={"g": "usergroup == 'x'", "h": "tag.("},
        policy={"rules": [
            {"id": "r", "tier": "application", "position": 1, "source": {"group": "g"}, "destinaton": "any", "action": "allow"},
        ]},
    )
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data, source="world.yaml")
    locations = [p.location for p in info.value.problems]
    assert set(locations) >= {"vms[0].hypervisor", "vms[1].tags.t", "groups.h", "policy.rules[0].destinaton",
                              "policy.rules[0]", "policy.rules[0].source"}
    lines = str(info.value).splitlines()
    assert lines[0] == f"world.yaml: {len(locations)} problems"
    assert [line.strip() for line in lines[1:]] == [str(p) for p in info.value.problems]


# ---- files -----------------------------------------------------------------------------------


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ScenarioError) as info:
        load_scenario(missing)
    (problem,) = info.value.problems
    assert problem.location == str(missing) and "cannot read" in problem.message


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("now: 1\nvms: [\n  {name: a\n")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    (problem,) = info.value.problems
    assert problem.location.startswith(f"{path}:") and "YAML syntax error" in problem.message


def test_duplicate_yaml_key_is_an_error_not_an_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("hypervisors:\n  - name: hv1\n    name: hv2\n")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    (problem,) = info.value.problems
    assert problem.location == f"{path}:3:5" and "duplicate key 'name'" in problem.message


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ScenarioError, match="empty"):
        load_scenario(path)


def test_unquoted_mac_that_yaml_reads_as_a_number(tmp_path: Path) -> None:
    path = tmp_path / "mac.yaml"
    path.write_text("hypervisors: [{name: hv1}]\nvms:\n  - {name: a, hypervisor: hv1, vnics: [{mac: 10:00:00:00:00:01}]}\n")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    (problem,) = info.value.problems
    assert problem.location == "vms[0].vnics[0].mac" and "quote it" in problem.message
