"""The OVSDB inventory model: rows -> ObservedBridge, and the problems it reports (no OVSDB)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from controller.events import BoundPort, PortsObserved
from topology.inventory import ObservedBridge, ObservedPort, bridge_problems, from_rows

MAC1, MAC2 = "02:00:00:00:00:01", "02:00:00:00:00:02"
VM1 = "6f1c1a32-9c1e-4d54-8f7e-6f0b2b8f0a01"
VM2 = "0b6a7d55-3d39-4f7a-9d4e-2b4a1c9e0a02"


def iface(name: str, ofport: Any = None, **ids: str) -> dict[str, Any]:
    """An Interface row as python-ovs gives it: optional columns are [] or [value]."""
    return {"name": name, "ofport": [] if ofport is None else [ofport],
            "external_ids": {k.replace("_", "-"): v for k, v in ids.items()}}


def observe(*interfaces: Mapping[str, Any], bridge_row: Mapping[str, Any] | None = None,
            uplinks: tuple[str, ...] = ()) -> ObservedBridge:
    """One port per interface (port name = interface name), plus the bridge's own port."""
    rows = [iface("br0", 65534), *interfaces]
    ports = [{"name": row["name"], "interfaces": [row["name"]]} for row in rows]
    bridge = {"name": "br0", "datapath_id": ["00000000000000a1"], "fail_mode": ["secure"],
              "datapath_type": "netdev", **(bridge_row or {})}
    return from_rows("hv1", "br0", bridge, ports, rows, uplinks)


def vm_port(name: str, ofport: int, mac: str, vm: str, **extra: str) -> dict[str, Any]:
    return iface(name, ofport, iface_id=f"{name}-iface", attached_mac=mac, vm_id=vm, **extra)


# --------------------------------------------------------------------------- conversion


def test_a_libvirt_port_becomes_a_bound_vnic() -> None:
    b = observe(vm_port("vnet0", 5, "02:00:00:00:00:01", VM1))
    assert b.ports == (ObservedPort("vnet0", 5, MAC1, "vnet0-iface", VM1, uplink=False),)
    assert (b.dpid, b.fail_mode, b.datapath_type) == (0xA1, "secure", "netdev")
    assert bridge_problems(b) == []


def test_nova_vm_uuid_is_read_and_lower_cased() -> None:
    b = observe(iface("tap1", 7, attached_mac=MAC2.upper(), vm_uuid=VM2.upper()))
    assert b.ports[0].vm_uuid == VM2
    assert b.ports[0].mac == MAC2


def test_vm_id_wins_over_a_disagreeing_vm_uuid_and_the_conflict_is_reported() -> None:
    b = observe(vm_port("vnet0", 5, MAC1, VM1, vm_uuid=VM2))
    assert b.ports[0].vm_uuid == VM1
    assert any("names two VMs" in p and VM2 in p for p in bridge_problems(b))


def test_the_bridge_internal_port_is_not_a_vnic() -> None:
    assert [p.name for p in observe().ports] == []


def test_ports_are_sorted_by_name_whatever_the_row_order() -> None:
    b = observe(vm_port("vnet9", 9, MAC2, VM2), vm_port("vnet1", 1, MAC1, VM1))
    assert [p.name for p in b.ports] == ["vnet1", "vnet9"]


def test_a_port_without_external_ids_has_no_binding() -> None:
    b = observe(iface("eth7", 3))
    assert b.ports == (ObservedPort("eth7", 3, None, None, None, uplink=False),)
    assert bridge_problems(b) == []  # not a VM port: nothing claims it should be bound


@pytest.mark.parametrize("ofport", [None, -1, 0])
def test_unassigned_or_failed_ofport_is_none_and_reported(ofport: int | None) -> None:
    b = observe(vm_port("vnet0", ofport, MAC1, VM1))  # type: ignore[arg-type]
    assert b.ports[0].ofport is None
    assert any("vnet0" in p and "no OpenFlow port number" in p for p in bridge_problems(b))


def test_a_failed_interface_says_so() -> None:
    b = observe(vm_port("vnet0", -1, MAC1, VM1))
    assert any("failed to attach (ofport -1)" in p for p in bridge_problems(b))


def test_plain_values_are_accepted_as_well_as_ovsdb_optional_lists() -> None:
    row = {"name": "vnet0", "ofport": 4, "external_ids": {"attached-mac": MAC1, "vm-id": VM1}}
    b = observe(row, bridge_row={"datapath_id": "00000000000000ff", "fail_mode": None})
    assert (b.ports[0].ofport, b.dpid, b.fail_mode) == (4, 0xFF, None)


def test_an_invalid_mac_is_dropped_and_reported() -> None:
    b = observe(vm_port("vnet0", 5, "02:00:00:zz:00:01", VM1))
    assert b.ports[0].mac is None
    problems = bridge_problems(b)
    assert any("invalid external_ids:attached-mac '02:00:00:zz:00:01'" in p for p in problems)
    assert b.bound_ports() == ()


def test_missing_datapath_id_is_none_until_vswitchd_sets_it() -> None:
    assert observe(bridge_row={"datapath_id": []}).dpid is None


def test_uplink_by_config_by_port_name() -> None:
    b = observe(iface("eth1", 1), vm_port("vnet0", 5, MAC1, VM1), uplinks=("eth1",))
    assert [p.name for p in b.ports if p.uplink] == ["eth1"]
    assert b.uplink_ofport == 1


def test_uplink_by_external_ids() -> None:
    b = observe(iface("patch-fabric", 2, goldilocks_uplink="True"))
    assert b.ports[0].uplink and b.uplink_ofport == 2


def test_no_uplink_means_no_uplink_ofport() -> None:
    assert observe(iface("eth1", 1, goldilocks_uplink="false")).uplink_ofport is None


def test_only_the_bridge_ports_listed_in_the_bridge_row_count() -> None:
    rows = [vm_port("vnet0", 5, MAC1, VM1), vm_port("vnet1", 6, MAC2, VM2)]
    ports = [{"name": r["name"], "interfaces": [r["name"]]} for r in rows]
    bridge = {"name": "br0", "datapath_id": [], "fail_mode": ["secure"],
              "datapath_type": "", "ports": ["vnet1"]}
    b = from_rows("hv1", "br0", bridge, ports, rows, ())
    assert [p.name for p in b.ports] == ["vnet1"]


def test_snapshot_becomes_the_engine_event() -> None:
    b = observe(iface("eth1", 1), vm_port("vnet0", 5, MAC1, VM1), iface("vnet1", 6),
                uplinks=("eth1",))
    assert b.to_event() == PortsObserved("hv1", 0xA1, 1, (BoundPort(5, MAC1, VM1),))


def test_equal_rows_give_equal_snapshots() -> None:
    # The monitor relies on this to stay silent when a reconnect reloads the same data.
    assert observe(vm_port("vnet0", 5, MAC1, VM1)) == observe(vm_port("vnet0", 5, MAC1, VM1))


# --------------------------------------------------------------------------- problems


@pytest.mark.parametrize("fail_mode", [["standalone"], []])
def test_a_bridge_that_is_not_secure_is_reported_loudly(fail_mode: list[str]) -> None:
    problems = bridge_problems(observe(bridge_row={"fail_mode": fail_mode}))
    assert len(problems) == 1
    assert "not secure" in problems[0]
    assert "a controller outage would make it a learning switch that forwards everything" \
        in problems[0]


def test_two_ports_claiming_one_mac_are_reported() -> None:
    b = observe(vm_port("vnet0", 5, MAC1, VM1), vm_port("vnet1", 6, MAC1.upper(), VM2))
    assert bridge_problems(b) == [
        (f"ports vnet0, vnet1 on hv1/br0 all claim attached-mac {MAC1}; "
         "anti-spoofing cannot tell them apart")]


def test_a_vm_port_without_attached_mac_is_reported() -> None:
    b = observe(iface("vnet0", 5, vm_id=VM1, iface_id="i-1"))
    [problem] = bridge_problems(b)
    assert "VM port vnet0" in problem and VM1 in problem and "attached-mac" in problem


def test_more_than_one_uplink_is_reported() -> None:
    b = observe(iface("eth1", 1), iface("eth2", 2, goldilocks_uplink="true"), uplinks=("eth1",))
    assert b.uplink_ofport == 1
    assert bridge_problems(b) == [
        "bridge hv1/br0 has 2 uplinks (eth1, eth2); only the first, eth1, is used"]


def test_the_inventory_model_stays_pure() -> None:
    # DESIGN.md §2: the core never imports ovs; only topology.ovsdb (the shell) may.
    code = ("import sys, topology.inventory; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('ovs', 'os_ken', 'sqlalchemy', 'fastapi')); print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == ""
