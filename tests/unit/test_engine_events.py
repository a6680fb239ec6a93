"""Inventory edits next to OVSDB truth: an edit does not unplug a VM, removal stops management."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from controller.boot import unbound
from controller.engine import Engine
from controller.events import (
    BoundPort,
    HypervisorRemoved,
    HypervisorUpserted,
    PortsObserved,
    VmUpserted,
)
from controller.flows.compile import compile_bridge
from controller.model import Attr, Fact, Hypervisor, Provenance
from controller.runtime import Runtime
from controller.scenario import load_scenario

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finance-identity.yaml"


def live_engine() -> Engine:
    sc = load_scenario(EXAMPLE)
    engine = Engine(unbound(sc.inventory), sc.directory, sc.policy, sc.groups)
    desk = sc.inventory.vm_by_name("fin-desk1")
    engine.handle(PortsObserved("hv1", 1, 100, (BoundPort(5, desk.vnics[0].mac, desk.uuid),)))
    return engine


def test_an_inventory_edit_keeps_the_vm_where_ovsdb_plugged_it() -> None:
    engine = live_engine()
    desk = engine.world().inventory.vm_by_name("fin-desk1")
    assert desk.vnics[0].ofport == 5
    record = replace(desk, hypervisor="hv2", vnics=tuple(replace(n, ofport=None) for n in desk.vnics),
                     facts=frozenset({Fact(Attr.TAG, "role", "desktop", Provenance.PLATFORM)}))
    engine.handle(VmUpserted(record))
    after = engine.world().inventory.vm_by_name("fin-desk1")
    assert after.hypervisor == "hv1" and after.vnics[0].ofport == 5
    assert engine.desired("hv1") == compile_bridge(engine.world(), "hv1")


def test_a_hypervisor_edit_keeps_the_dpid_and_uplink_ovsdb_reported() -> None:
    engine = live_engine()
    engine.handle(HypervisorUpserted(Hypervisor("hv1")))
    assert engine.hypervisor_records()["hv1"] == Hypervisor("hv1", 100, 1)


def test_a_removed_hypervisor_is_no_longer_managed() -> None:
    engine = live_engine()
    rt = Runtime(engine)
    rt.handle(HypervisorRemoved("hv2"), 0)
    assert engine.hypervisors() == ("hv1",)
    assert [b.hypervisor for b in rt.bridges()] == ["hv1"]
    assert engine.desired("hv1") == compile_bridge(engine.world(), "hv1")
