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
    VmTagsReplaced,
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


def test_replaced_tags_keep_the_vms_context_and_binding() -> None:
    engine = live_engine()
    desk = engine.world().inventory.vm_by_name("fin-desk1")
    assert desk.uuid in engine.world().members["finance-desktops"]
    context = {f for f in desk.facts if f.provenance != Provenance.PLATFORM}
    assert context, "the example logs a user in on fin-desk1"
    server = frozenset({Fact(Attr.TAG, "role", "server", Provenance.PLATFORM, 7.0)})
    engine.handle(VmTagsReplaced(desk.uuid, server))
    after = engine.world().inventory.vm_by_name("fin-desk1")
    assert after.facts == frozenset(context) | server
    assert after.vnics[0].ofport == 5
    assert desk.uuid not in engine.world().members["finance-desktops"]
    assert engine.desired("hv1") == compile_bridge(engine.world(), "hv1")


def test_tags_of_an_unknown_vm_change_nothing() -> None:
    engine = live_engine()
    before = engine.desired("hv1")
    assert engine.handle(VmTagsReplaced("no-such-uuid", frozenset())) == []
    assert engine.desired("hv1") == before


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


def test_a_live_migration_keeps_the_vm_on_the_source_until_its_port_goes_there() -> None:
    """Both hypervisors have the VM's port during a live migration. Whatever order their
    snapshots come in, and whatever else changes on the source meanwhile, the VM stays on the
    source (the guest still runs there) and moves when the source port is deleted. Before,
    the latest snapshot won: a change on the source pulled it back, and the source port's
    removal then left it with no port and no flows anywhere."""
    engine = live_engine()
    desk = engine.world().inventory.vm_by_name("fin-desk1")
    mac = desk.vnics[0].mac
    here = BoundPort(5, mac, desk.uuid)
    newcomer = BoundPort(9, "02:00:00:00:09:09", "00000000-0000-4000-8000-000000000999")

    def where() -> tuple[str, int | None]:
        vm = engine.world().inventory.vms[desk.uuid]
        return vm.hypervisor, vm.vnics[0].ofport

    engine.handle(PortsObserved("hv2", 2, 100, (BoundPort(3, mac, desk.uuid),)))  # the destination's port
    assert where() == ("hv1", 5)
    engine.handle(PortsObserved("hv1", 1, 100, (here, newcomer)))  # something else starts on the source
    engine.handle(PortsObserved("hv1", 1, 100, (here,)))
    assert where() == ("hv1", 5)
    engine.handle(PortsObserved("hv1", 1, 100, ()))  # switchover: the source port is deleted
    assert where() == ("hv2", 3)
    for hv in engine.hypervisors():
        assert engine.desired(hv) == compile_bridge(engine.world(), hv)
    assert not any(f.match.get("eth_src") is not None and f.match.get("eth_src").value == int(mac.replace(":", ""), 16)
                   for f in engine.desired("hv1")), "the source bridge still holds the VM's port flows"
