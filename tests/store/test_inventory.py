"""Hypervisors, gateway, VMs, tags, context and the directory: CRUD, and conflicts that name
the field that clashes."""

from __future__ import annotations

import pytest

from controller.model import VM, Attr, Fact, Gateway, Hypervisor, Provenance, VNic
from controller.store import Conflict, NotFound, Store
from controller.store.records import ContextRecord

P, G, A = Provenance.PLATFORM, Provenance.GUEST, Provenance.AUTHORITATIVE


def tag(key: str, value: str, at: float = 10.0) -> Fact:
    return Fact(Attr.TAG, key, value, P, at)


def vm(name: str, n: int, hypervisor: str = "hv1", **tags: str) -> VM:
    nic = VNic(f"02:00:00:00:00:{n:02x}", (f"10.0.0.{n}",), n, f"tap-{name}")
    return VM(f"00000000-0000-4000-8000-{n:012x}", name, hypervisor, (nic,),
              frozenset(tag(k, v) for k, v in tags.items()))


@pytest.fixture
def hvs(store: Store) -> Store:
    store.upsert_hypervisor(Hypervisor("hv1", 100, 1), actor="ops")
    store.upsert_hypervisor(Hypervisor("hv2", 100, 2), actor="ops")
    return store


def test_hypervisor_upsert_and_delete(store: Store) -> None:
    store.upsert_hypervisor(Hypervisor("hv1", 100, 1), actor="ops")
    assert store.upsert_hypervisor(Hypervisor("hv1", 200, 7), actor="ops") == Hypervisor("hv1", 200, 7)
    assert store.list_hypervisors() == [Hypervisor("hv1", 200, 7)]
    with pytest.raises(Conflict, match="dpid 7: already used by hypervisor hv1"):
        store.upsert_hypervisor(Hypervisor("hv2", None, 7), actor="ops")
    store.create_vm(vm("web1", 1), actor="ops")
    with pytest.raises(Conflict, match="hypervisor hv1: still hosts vm web1"):
        store.delete_hypervisor("hv1", actor="ops")
    with pytest.raises(Conflict, match="uplink_ofport 1: already used on hypervisor hv1 by vm web1"):
        store.upsert_hypervisor(Hypervisor("hv1", 1, 7), actor="ops")
    store.delete_vm(vm("web1", 1).uuid, actor="ops")
    assert store.delete_hypervisor("hv1", actor="ops") == Hypervisor("hv1", 200, 7)
    assert store.list_hypervisors() == []
    with pytest.raises(NotFound):
        store.delete_hypervisor("hv1", actor="ops")


def test_gateway(hvs: Store) -> None:
    assert hvs.gateway() is None
    hvs.set_gateway(Gateway("10.0.0.254", "02:00:00:00:00:FE"), actor="ops")
    assert hvs.gateway() == Gateway("10.0.0.254", "02:00:00:00:00:fe")  # normalized
    with pytest.raises(Conflict, match="ip 10.0.0.254: already used by the gateway"):
        hvs.create_vm(VM("u9", "x", "hv1", (VNic("02:00:00:00:09:09", ("10.0.0.254",), None),)), actor="ops")
    hvs.create_vm(vm("web1", 1), actor="ops")
    with pytest.raises(Conflict, match="mac 02:00:00:00:00:01: already used by vm web1"):
        hvs.set_gateway(Gateway("10.0.0.253", "02:00:00:00:00:01"), actor="ops")
    hvs.set_gateway(None, actor="ops")
    assert hvs.gateway() is None


def test_vm_create_get_update_delete(hvs: Store) -> None:
    web = vm("web1", 1, tier="web")
    assert hvs.create_vm(web, actor="ops") == web
    assert hvs.get_vm(web.uuid) == web
    assert hvs.get_vm("web1") == web
    assert hvs.get_vm("nope") is None

    # Same uuid, new name, host, tags; the vNIC keeps its MAC and gains an address.
    moved = VM(web.uuid, "web-1", "hv2",
               (VNic("02:00:00:00:00:01", ("10.0.0.1", "10.0.1.1"), 5, "tap"), VNic("02:00:00:00:00:99", (), None)),
               frozenset({tag("tier", "web"), tag("env", "prod", 20.0)}))
    assert hvs.update_vm(moved, actor="ops") == moved
    assert hvs.get_vm("web-1") == moved and hvs.get_vm("web1") is None

    assert hvs.delete_vm(web.uuid, actor="ops") == moved
    assert hvs.list_vms() == []
    with pytest.raises(NotFound):
        hvs.delete_vm(web.uuid, actor="ops")
    with pytest.raises(NotFound):
        hvs.update_vm(moved, actor="ops")


@pytest.mark.parametrize("clash, message", [
    (lambda v: v, "uuid 00000000-0000-4000-8000-000000000001: already used by vm web1"),
    (lambda v: VM("u2", "web1", "hv1"), "name web1: already used by vm 00000000-0000-4000-8000-000000000001"),
    (lambda v: VM("u2", "x", "hv1", (VNic("02:00:00:00:00:01", (), None),)), "mac 02:00:00:00:00:01: already used by vm web1"),
    (lambda v: VM("u2", "x", "hv1", (VNic("02:00:00:00:00:02", ("10.0.0.1",), None),)), "ip 10.0.0.1: already used by vm web1"),
    (lambda v: VM("u2", "x", "hv1", (VNic("02:00:00:00:00:02", (), 1),)), "ofport 1: already used on hypervisor hv1 by vm web1"),
    (lambda v: VM("u2", "x", "hv1", (VNic("02:00:00:00:00:02", (), 100),)), "ofport 100: already used by the uplink of hypervisor hv1"),
    (lambda v: VM("u2", "x", "hv9"), "hypervisor hv9: unknown hypervisor"),
    (lambda v: VM("u2", "x", "hv1", (VNic("02:00:00:00:00:02", (), None), VNic("02:00:00:00:00:02", (), None))),
     "mac 02:00:00:00:00:02: used twice by vm x"),
])
def test_vm_conflicts_name_the_field(hvs: Store, clash: object, message: str) -> None:
    web = hvs.create_vm(vm("web1", 1), actor="ops")
    before = len(hvs.audit_log())
    with pytest.raises(Conflict) as caught:
        hvs.create_vm(clash(web), actor="ops")  # type: ignore[operator]
    assert str(caught.value) == message
    assert hvs.list_vms() == [web]
    assert len(hvs.audit_log()) == before  # nothing written


def test_same_ofport_on_another_hypervisor_is_fine(hvs: Store) -> None:
    hvs.create_vm(vm("web1", 1), actor="ops")
    other = VM("u2", "x", "hv2", (VNic("02:00:00:00:00:02", (), 1),))
    assert hvs.create_vm(other, actor="ops") == other


def test_vm_input_is_normalized_or_refused(hvs: Store) -> None:
    stored = hvs.create_vm(VM("u1", "a", "hv1", (VNic("02-00-00-00-00-AA", (" 10.0.0.7 ",), None),)), actor="ops")
    assert stored.vnics[0] == VNic("02:00:00:00:00:aa", ("10.0.0.7",), None)
    with pytest.raises(ValueError, match="not a MAC"):
        hvs.create_vm(VM("u2", "b", "hv1", (VNic("zz", (), None),)), actor="ops")
    with pytest.raises(ValueError, match="context"):
        hvs.create_vm(VM("u3", "c", "hv1", facts=frozenset({Fact(Attr.USER, "", "alice", G)})), actor="ops")
    with pytest.raises(ValueError, match="bad key"):
        hvs.create_vm(VM("u4", "d", "hv1", facts=frozenset({tag("no spaces", "x")})), actor="ops")


def test_list_filters(hvs: Store) -> None:
    web1 = hvs.create_vm(vm("web1", 1, tier="web"), actor="ops")
    web2 = hvs.create_vm(vm("web2", 2, "hv2", tier="web"), actor="ops")
    db1 = hvs.create_vm(vm("db1", 3, "hv2", tier="db"), actor="ops")
    assert hvs.list_vms() == [db1, web1, web2]  # by name
    assert hvs.list_vms(hypervisor="hv2") == [db1, web2]
    assert hvs.list_vms(tag=("tier", "web")) == [web1, web2]
    assert hvs.list_vms(tag=("tier", "db"), hypervisor="hv1") == []
    assert hvs.list_vms(name_glob="web*") == [web1, web2]
    assert hvs.list_vms(name_glob="*1", tag=("tier", "web")) == [web1]


def test_set_tags_keeps_unchanged_observation_times(hvs: Store, clock: object) -> None:
    web = hvs.create_vm(vm("web1", 1, tier="web", env="dev"), actor="ops")
    updated = hvs.set_tags(web.uuid, {"tier": "web", "env": "prod"}, actor="ops")
    facts = {f.key: f for f in updated.facts}
    assert facts["tier"] == tag("tier", "web", 10.0)  # unchanged
    assert facts["env"].value == "prod" and facts["env"].observed_at > 10.0
    assert hvs.set_tags(web.uuid, {}, actor="ops").facts == frozenset()
    with pytest.raises(NotFound):
        hvs.set_tags("nope", {}, actor="ops")


def test_context_replaces_per_provenance_and_expires(hvs: Store) -> None:
    web = hvs.create_vm(vm("web1", 1), actor="ops")
    alice = frozenset({Fact(Attr.USER, "", "alice", G, 100.0), Fact(Attr.OS, "", "linux", G, 100.0)})
    bob = frozenset({Fact(Attr.USER, "", "bob", G, 200.0)})
    verdict = frozenset({Fact(Attr.POSTURE, "edr", "pass", A, 150.0)})

    hvs.put_context(web.uuid, G, alice, actor="relay-hv1", observed_at=100.0, expires_at=400.0)
    hvs.put_context(web.uuid, A, verdict, actor="idp", observed_at=150.0)
    guest = hvs.put_context(web.uuid, G, bob, actor="relay-hv1", observed_at=200.0, expires_at=500.0)
    assert guest == ContextRecord(web.uuid, G, bob, "relay-hv1", 200.0, 500.0)
    assert hvs.get_context(web.uuid) == [
        ContextRecord(web.uuid, A, verdict, "idp", 150.0, None),
        guest,  # replaced alice's record
    ]
    assert set(hvs.load_state(now=499.0).contexts) == {guest, ContextRecord(web.uuid, A, verdict, "idp", 150.0, None)}
    assert hvs.load_state(now=500.0).contexts == (ContextRecord(web.uuid, A, verdict, "idp", 150.0, None),)
    assert len(hvs.get_context(web.uuid)) == 2  # expired records stay until replaced

    hvs.delete_vm(web.uuid, actor="ops")
    assert hvs.get_context(web.uuid) == []
    assert hvs.load_state(now=0.0).contexts == ()


def test_context_refuses_platform_claims(hvs: Store) -> None:
    web = hvs.create_vm(vm("web1", 1), actor="ops")
    with pytest.raises(ValueError, match="platform"):
        hvs.put_context(web.uuid, P, frozenset(), actor="x", observed_at=1.0)
    with pytest.raises(ValueError, match="platform attribute"):
        hvs.put_context(web.uuid, G, frozenset({Fact(Attr.TAG, "tier", "db", G)}), actor="x", observed_at=1.0)
    with pytest.raises(ValueError, match="does not come from guest"):
        hvs.put_context(web.uuid, G, frozenset({Fact(Attr.USER, "", "a", A)}), actor="x", observed_at=1.0)
    with pytest.raises(NotFound):
        hvs.put_context("nope", G, frozenset(), actor="x", observed_at=1.0)


def test_directory(store: Store) -> None:
    store.set_directory_user("alice", frozenset({"finance", "staff"}), actor="idp")
    store.set_directory_user("bob", frozenset({"eng"}), actor="idp")
    store.set_directory_user("bob", frozenset({"eng", "oncall"}), actor="idp")
    assert store.directory() == {"alice": frozenset({"finance", "staff"}), "bob": frozenset({"eng", "oncall"})}
    store.set_directory_user("alice", frozenset(), actor="idp")  # removes her
    assert store.directory() == {"bob": frozenset({"eng", "oncall"})}


def test_a_heartbeat_refreshes_context_without_an_audit_entry(hvs: Store) -> None:
    """Agents re-send unchanged context every few seconds: the TTL moves, the audit log does not."""
    desk = hvs.create_vm(vm("desk", 1), actor="admin")
    alice = frozenset({Fact(Attr.USER, "", "alice", Provenance.GUEST, 100.0)})
    hvs.put_context(desk.uuid, Provenance.GUEST, alice, actor="relay-hv1", observed_at=100.0, expires_at=115.0)
    entries = len(hvs.audit_log(limit=1000))
    later = frozenset({Fact(Attr.USER, "", "alice", Provenance.GUEST, 105.0)})
    hvs.put_context(desk.uuid, Provenance.GUEST, later, actor="relay-hv1", observed_at=105.0, expires_at=120.0)
    assert len(hvs.audit_log(limit=1000)) == entries
    (record,) = [r for r in hvs.get_context(desk.uuid) if r.provenance is Provenance.GUEST]
    assert record.expires_at == 120.0
    hvs.put_context(desk.uuid, Provenance.GUEST, frozenset(), actor="relay-hv1", observed_at=106.0, expires_at=121.0)
    assert len(hvs.audit_log(limit=1000)) == entries + 1, "a logout is a change: audited"


def test_quarantine_state_survives_reopening_and_changes_are_audited(url: str) -> None:
    store = Store(url)
    assert store.quarantine_state() == ({}, {})
    store.save_quarantine({"u1": ("edr verdict",)}, {"u2": ("agent silent",)}, actor="engine")
    entries = len(store.audit_log(limit=1000))
    store.save_quarantine({"u1": ["edr verdict"]}, {"u2": ["agent silent"]}, actor="engine")  # unchanged
    assert len(store.audit_log(limit=1000)) == entries
    store.close()
    again = Store(url)
    assert again.quarantine_state() == ({"u1": ("edr verdict",)}, {"u2": ("agent silent",)})
    assert again.audit_log(limit=1)[0].action == "quarantine.state"
    again.close()
