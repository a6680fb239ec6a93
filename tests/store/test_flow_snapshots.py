"""Flow snapshots in the store: which writes move the state generation a snapshot is checked
against (every one that can change a flow; not principals, drafts, audit entries, context
heartbeats or snapshots), the stamp's context expiry, and a stored snapshot read back by the
standard-library reader the restorer uses before anything else is imported."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.flowsnap import FlowSnapshot, flow_mod_message, load_snapshots, refusal
from controller.model import Attr, Fact, Hypervisor, Provenance
from controller.store import Store
from tests.store.test_inventory import vm

GUEST = Provenance.GUEST


def generation(store: Store) -> int:
    stamp = store.snapshot_stamp(0.0, 0.0)
    assert stamp is not None
    return stamp[0]


def login(user: str, at: float) -> frozenset[Fact]:
    return frozenset({Fact(Attr.USER, "name", user, GUEST, at)})


@pytest.fixture
def hv(store: Store) -> Store:
    store.upsert_hypervisor(Hypervisor("hv1", 100, 1), actor="ops")
    return store


def test_every_write_that_can_change_flows_moves_the_generation(hv: Store) -> None:
    web = hv.create_vm(vm("web", 1), actor="ops")
    steps = [
        lambda: hv.set_tags(web.uuid, {"tier": "web"}, actor="ops"),
        lambda: hv.set_directory_user("alice", frozenset({"finance"}), actor="ops"),
        lambda: hv.put_context(web.uuid, GUEST, login("alice", 10.0), actor="agent", observed_at=10.0,
                               expires_at=1e12),
        lambda: hv.save_quarantine({web.uuid: ("edr",)}, {}, actor="engine"),
        lambda: hv.delete_vm(web.uuid, actor="ops"),
    ]
    for step in steps:
        before = generation(hv)
        step()
        assert generation(hv) == before + 1


def test_writes_that_cannot_change_flows_leave_it(hv: Store, check) -> None:  # type: ignore[no-untyped-def]
    web = hv.create_vm(vm("web", 1), actor="ops")
    hv.put_context(web.uuid, GUEST, login("alice", 10.0), actor="agent", observed_at=10.0, expires_at=1e12)
    before = generation(hv)
    hv.create_principal("bob", "operator", actor="ops")
    hv.save_draft({"rules": []}, actor="ops")
    hv.discard_draft(actor="ops")
    hv.record_event(actor="system", action="context.effect", target="vm:x", details={})
    # the same claims again: a heartbeat only moves the clock
    hv.put_context(web.uuid, GUEST, login("alice", 10.0), actor="agent", observed_at=20.0, expires_at=1e12)
    hv.store_flow_snapshot(FlowSnapshot(1, before, "d", frozenset(), None, 1.0, ()))
    assert generation(hv) == before
    hv.save_draft({"rules": []}, actor="ops")
    hv.publish_draft(actor="ops", check=check)
    assert generation(hv) == before + 1


def test_the_stamp_ends_at_the_first_live_expiry_and_waits_out_one_just_past(hv: Store) -> None:
    a = hv.create_vm(vm("a", 1), actor="ops")
    b = hv.create_vm(vm("b", 2), actor="ops")
    hv.put_context(a.uuid, GUEST, login("alice", 1.0), actor="agent", observed_at=1.0, expires_at=100.0)
    hv.put_context(b.uuid, GUEST, login("bob", 1.0), actor="agent", observed_at=1.0, expires_at=200.0)
    now_gen = generation(hv)
    assert hv.snapshot_stamp(50.0, 5.0) == (now_gen, 100.0)
    # a's context expired 2 s ago: the engine may still hold its flows, so no stamp yet
    assert hv.snapshot_stamp(102.0, 5.0) is None
    assert hv.snapshot_stamp(110.0, 5.0) == (now_gen, 200.0)


def test_a_stored_snapshot_reads_back_through_the_standard_library_reader(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    store = Store(f"sqlite:///{path}")
    try:
        store.upsert_hypervisor(Hypervisor("hv1", 100, 1), actor="ops")
        gen = generation(store)
        mods = (flow_mod_message(b"\x00" * 48), flow_mod_message(b"\x01" * 56))
        dpid = 0xFEDC_BA98_7654_3210  # above a signed 64-bit integer
        taken = FlowSnapshot(dpid, gen, "digest", frozenset({(1, "vnet0"), (2, "vnet1")}), 99.5, 42.0, mods)
        store.store_flow_snapshot(taken)
        store.store_flow_snapshot(taken)  # replaces, never duplicates
        stored = load_snapshots(path)
        assert stored.generation == gen
        assert stored.by_dpid == {dpid: taken}
        assert refusal(taken, version=5, ports=taken.ports, flow_count=0, generation=stored.generation,
                       digest="digest", now=50.0) is None
        store.set_directory_user("alice", frozenset({"finance"}), actor="ops")
        assert load_snapshots(path).generation == gen + 1
    finally:
        store.close()


def test_a_database_without_snapshots_reads_as_none(tmp_path: Path) -> None:
    assert load_snapshots(tmp_path / "missing.db").by_dpid == {}
    (tmp_path / "junk.db").write_bytes(b"not a database at all")
    assert load_snapshots(tmp_path / "junk.db").generation is None
