"""apps/snapshots.py with a real store (SQLite file) and a real runtime: a bridge in sync is
stored as exactly the flow mods of its installed table, stamped with the store's generation and
first context expiry; nothing is rewritten while nothing moved; a write to the store or a new
table makes a new snapshot; a bridge not in sync, a switch gone, or a context that has just
expired makes none."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from apps.ofwire import flow_mod_body
from apps.snapshots import EXPIRY_GRACE_S, SnapshotWriter
from controller.flows.reconcile import OpKind
from controller.flowsnap import flow_mod_message, load_snapshots
from controller.model import Attr, Fact, Hypervisor, Provenance
from controller.runtime import (
    BundleCommitted,
    Runtime,
    SendBundle,
    SwitchCommand,
    SwitchDisconnected,
)
from controller.store import Store
from tests.store.test_inventory import vm
from tests.unit.test_runtime import connect_in_sync, logout_alice, runtime

PORTS = frozenset({(1, "fin-desk1"), (2, "ledger-db")})


class Switches:
    """The os-ken app's answer for connected switches (apps/goldilocks_app.switch_ports)."""

    def __init__(self) -> None:
        self.connected: dict[int, tuple[int, frozenset[tuple[int, str]]]] = {}

    def switch_ports(self, dpid: int) -> tuple[int, frozenset[tuple[int, str]]] | None:
        return self.connected.get(dpid)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Lab:
    path: Path
    store: Store
    rt: Runtime
    dpid: int  # hv1's
    switches: Switches
    clock: Clock
    writer: SnapshotWriter


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    path = tmp_path / "g.db"
    store = Store(f"sqlite:///{path}")
    rt, dpids = runtime()
    switches, clock = Switches(), Clock()
    yield Lab(path, store, rt, dpids["hv1"], switches, clock,
              SnapshotWriter(store, lambda fn: fn(rt), switches, "digest", clock=clock))
    store.close()


def stored_flows(rt: Runtime, hv: str) -> tuple[bytes, ...]:
    installed = rt.bridge(hv).installed
    assert installed is not None
    return tuple(sorted(flow_mod_message(flow_mod_body(OpKind.ADD, f)) for f in installed.values()))


def committed(cmd: SwitchCommand) -> BundleCommitted:
    assert isinstance(cmd, SendBundle)
    return BundleCommitted(cmd.dpid, cmd.bundle)


def test_a_bridge_in_sync_is_stored_as_its_installed_table_and_stamped(lab: Lab) -> None:
    connect_in_sync(lab.rt, lab.dpid, "hv1")
    lab.switches.connected[lab.dpid] = (5, PORTS)
    lab.writer.store_snapshot("hv1")
    stored = load_snapshots(lab.path)
    snap = stored.by_dpid[lab.dpid]
    assert (snap.generation, snap.config_digest, snap.ports, snap.valid_until, snap.taken_at) == (
        stored.generation, "digest", PORTS, None, 1000.0)
    assert tuple(sorted(snap.flow_mods)) == stored_flows(lab.rt, "hv1")
    assert len(snap.flow_mods) == len(lab.rt.engine.desired("hv1"))


def test_nothing_moved_nothing_rewritten_and_a_store_write_or_a_new_table_makes_a_new_one(lab: Lab) -> None:
    connect_in_sync(lab.rt, lab.dpid, "hv1")
    lab.switches.connected[lab.dpid] = (5, PORTS)
    lab.writer.store_snapshot("hv1")
    lab.clock.now = 1010.0
    lab.writer.store_snapshot("hv1")
    assert load_snapshots(lab.path).by_dpid[lab.dpid].taken_at == 1000.0
    lab.store.upsert_hypervisor(Hypervisor("hv9", None, 99), actor="ops")
    lab.writer.store_snapshot("hv1")
    after_write = load_snapshots(lab.path)
    assert after_write.by_dpid[lab.dpid].taken_at == 1010.0
    assert after_write.by_dpid[lab.dpid].generation == after_write.generation
    before = stored_flows(lab.rt, "hv1")
    for cmd in logout_alice(lab.rt):  # the bridge's table changes: a bundle, then its commit
        lab.rt.handle(committed(cmd), 2)
    assert stored_flows(lab.rt, "hv1") != before
    lab.clock.now = 1020.0
    lab.writer.store_snapshot("hv1")
    assert tuple(sorted(load_snapshots(lab.path).by_dpid[lab.dpid].flow_mods)) == stored_flows(lab.rt, "hv1")


def test_no_snapshot_out_of_sync_without_the_switch_or_just_after_an_expiry(lab: Lab) -> None:
    connect_in_sync(lab.rt, lab.dpid, "hv1")
    lab.writer.store_snapshot("hv1")  # the app has no such switch (gone, or not yet told)
    lab.switches.connected[lab.dpid] = (4, PORTS)
    lab.writer.store_snapshot("hv1")  # OpenFlow 1.3: the restorer would not serve it
    assert load_snapshots(lab.path).by_dpid == {}
    lab.switches.connected[lab.dpid] = (5, PORTS)
    lab.store.upsert_hypervisor(Hypervisor("hv1", 100, lab.dpid), actor="ops")
    web = lab.store.create_vm(vm("web", 1), actor="ops")
    login = frozenset({Fact(Attr.USER, "name", "alice", Provenance.GUEST, 900.0)})
    lab.store.put_context(web.uuid, Provenance.GUEST, login, actor="agent", observed_at=900.0, expires_at=999.0)
    lab.writer.store_snapshot("hv1")  # expired 1 s ago: the engine may not have applied it yet
    assert load_snapshots(lab.path).by_dpid == {}
    lab.clock.now = 999.0 + EXPIRY_GRACE_S + 1
    lab.writer.store_snapshot("hv1")
    assert lab.dpid in load_snapshots(lab.path).by_dpid
    lab.rt.handle(SwitchDisconnected(lab.dpid), 3)
    lab.clock.now += 100
    lab.store.upsert_hypervisor(Hypervisor("hv9", None, 99), actor="ops")
    lab.writer.store_snapshot("hv1")  # disconnected: not in sync, the old snapshot stays as it was
    assert load_snapshots(lab.path).by_dpid[lab.dpid].taken_at == 999.0 + EXPIRY_GRACE_S + 1

