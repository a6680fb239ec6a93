"""Every write leaves one audit entry, written in the same transaction, naming who, what,
before and after; the log is read newest first and can be filtered."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from controller.model import VM, Attr, Fact, Gateway, Hypervisor, Provenance, VNic
from controller.store import Conflict, Store
from controller.store.records import Role
from tests.store.conftest import policy_check

UUID = "00000000-0000-4000-8000-000000000001"
WEB = VM(UUID, "web1", "hv1", (VNic("02:00:00:00:00:01", ("10.0.0.1",), 1),))
DOC: dict[str, Any] = {"groups": {}, "rules": []}

# (write, action, target, before is None, after is None)
WRITES: list[tuple[Callable[[Store], Any], str, str, bool, bool]] = [
    (lambda s: s.upsert_hypervisor(Hypervisor("hv1", 100, 1), actor="ops"), "hypervisor.upsert", "hypervisor:hv1", True, False),
    (lambda s: s.upsert_hypervisor(Hypervisor("hv1", 101, 1), actor="ops"), "hypervisor.upsert", "hypervisor:hv1", False, False),
    (lambda s: s.upsert_hypervisor(Hypervisor("hv2"), actor="ops"), "hypervisor.upsert", "hypervisor:hv2", True, False),
    (lambda s: s.delete_hypervisor("hv2", actor="ops"), "hypervisor.delete", "hypervisor:hv2", False, True),
    (lambda s: s.set_gateway(Gateway("10.0.0.254", "02:00:00:00:00:fe"), actor="ops"), "gateway.set", "gateway", True, False),
    (lambda s: s.create_vm(WEB, actor="ops"), "vm.create", f"vm:{UUID}", True, False),
    (lambda s: s.update_vm(VM(UUID, "web-1", "hv1"), actor="ops"), "vm.update", f"vm:{UUID}", False, False),
    (lambda s: s.set_tags(UUID, {"tier": "web"}, actor="ops"), "vm.tags", f"vm:{UUID}", False, False),
    (lambda s: s.put_context(UUID, Provenance.GUEST, frozenset({Fact(Attr.USER, "", "alice", Provenance.GUEST)}),
                             actor="relay-hv1", observed_at=5.0), "context.guest", f"vm:{UUID}", True, False),
    (lambda s: s.put_context(UUID, Provenance.AUTHORITATIVE, frozenset(), actor="idp", observed_at=5.0),
     "context.authoritative", f"vm:{UUID}", True, False),
    (lambda s: s.set_directory_user("alice", frozenset({"finance"}), actor="idp"), "directory.set", "user:alice", True, False),
    (lambda s: s.set_directory_user("alice", frozenset(), actor="idp"), "directory.set", "user:alice", False, True),
    (lambda s: s.save_draft(DOC, actor="ops"), "policy.draft", "policy:1", True, False),
    (lambda s: s.publish_draft(actor="ops", check=policy_check), "policy.publish", "policy:1", False, False),
    (lambda s: s.save_draft(DOC, actor="ops"), "policy.draft", "policy:2", True, False),
    (lambda s: s.discard_draft(actor="ops"), "policy.discard", "policy:2", False, False),
    (lambda s: s.revert_to(1, actor="ops", check=policy_check), "policy.revert", "policy:3", True, False),
    (lambda s: s.bootstrap_admin(), "token.bootstrap", "principal:admin", True, False),
    (lambda s: s.create_principal("ops", Role.OPERATOR, actor="admin"), "token.create", "principal:ops", True, False),
    (lambda s: s.revoke_principal("ops", actor="admin"), "token.revoke", "principal:ops", False, False),
    (lambda s: s.delete_vm(UUID, actor="ops"), "vm.delete", f"vm:{UUID}", False, True),
    (lambda s: s.set_gateway(None, actor="ops"), "gateway.set", "gateway", False, True),
]


def _actor(action: str) -> str:
    """Who performed each kind of write in WRITES."""
    special = {"context.guest": "relay-hv1", "context.authoritative": "idp", "directory.set": "idp",
               "token.bootstrap": "system", "token.create": "admin", "token.revoke": "admin"}
    return special.get(action, "ops")


def test_every_write_is_audited(store: Store) -> None:
    for write, action, target, no_before, no_after in WRITES:
        count = len(store.audit_log(limit=1000))
        write(store)
        entries = store.audit_log(limit=1000)
        assert len(entries) == count + 1, action
        entry = entries[0]
        assert (entry.action, entry.target, entry.outcome) == (action, target, "ok")
        assert entry.actor == _actor(action), action
        assert (entry.before is None, entry.after is None) == (no_before, no_after), action
    ids = [e.id for e in store.audit_log(limit=1000)]
    assert ids == sorted(ids, reverse=True)  # newest first
    times = [e.at for e in store.audit_log(limit=1000)]
    assert times == sorted(times, reverse=True)


def test_before_and_after_show_the_change(store: Store) -> None:
    store.upsert_hypervisor(Hypervisor("hv1", 100, 1), actor="ops")
    store.create_vm(WEB, actor="alice")
    store.set_tags(UUID, {"tier": "db"}, actor="bob")
    entry = store.audit_log(limit=1)[0]
    assert entry.actor == "bob"
    assert entry.before is not None and entry.before["tags"] == {}
    assert entry.after is not None and entry.after["tags"] == {"tier": "db"}
    assert entry.after["vnics"] == [{"mac": "02:00:00:00:00:01", "ips": ["10.0.0.1"], "ofport": 1, "name": ""}]


def test_deleting_a_vm_records_its_context(store: Store) -> None:
    store.upsert_hypervisor(Hypervisor("hv1"), actor="ops")
    store.create_vm(WEB, actor="ops")
    store.put_context(UUID, Provenance.GUEST, frozenset({Fact(Attr.USER, "", "alice", Provenance.GUEST, 3.0)}),
                      actor="relay", observed_at=3.0)
    store.delete_vm(UUID, actor="ops")
    before = store.audit_log(limit=1)[0].before
    assert before is not None
    assert before["contexts"][0]["facts"] == [{"attr": "user", "key": "", "value": "alice", "observed_at": 3.0}]


def test_refused_writes_leave_no_entry_unless_recorded(store: Store) -> None:
    store.upsert_hypervisor(Hypervisor("hv1"), actor="ops")
    store.create_vm(WEB, actor="ops")
    count = len(store.audit_log())
    with pytest.raises(Conflict):
        store.create_vm(WEB, actor="ops")
    assert len(store.audit_log()) == count  # the transaction rolled back, entry included
    store.record_rejection(actor="relay-hv2", action="context.guest", target=f"vm:{UUID}",
                           why="relay-hv2 may only report VMs on hv2", details={"hypervisor": "hv1"})
    entry = store.audit_log(limit=1)[0]
    assert (entry.actor, entry.action, entry.target) == ("relay-hv2", "context.guest", f"vm:{UUID}")
    assert entry.outcome == "rejected: relay-hv2 may only report VMs on hv2"
    assert entry.details == {"hypervisor": "hv1"} and entry.before is None and entry.after is None


def test_filters_and_paging(store: Store) -> None:
    for i in range(5):
        store.upsert_hypervisor(Hypervisor(f"hv{i}"), actor="alice" if i % 2 else "bob")
    store.set_directory_user("x_y", frozenset({"g"}), actor="alice")
    log = store.audit_log
    assert [e.target for e in log(actor="alice")] == ["user:x_y", "hypervisor:hv3", "hypervisor:hv1"]
    assert len(log(action_prefix="hypervisor.")) == 5
    assert log(action_prefix="hypervisor%") == []  # the prefix is literal, not a LIKE pattern
    assert [e.actor for e in log(target="hypervisor:hv2")] == ["bob"]
    assert [e.target for e in log(limit=2, offset=1)] == ["hypervisor:hv4", "hypervisor:hv3"]


def test_entries_of_one_transaction_keep_their_order(store: Store) -> None:
    """A transaction's entries are written together as it ends: in the order they were made."""
    with store._write() as session:
        for n in range(5):
            store._audit(session, "ops", "test.step", f"step:{n}")
    steps = [e.target for e in reversed(store.audit_log(action_prefix="test.step"))]
    assert steps == [f"step:{n}" for n in range(5)]


def test_an_entry_made_in_a_read_transaction_is_refused_not_lost(store: Store) -> None:
    with pytest.raises(RuntimeError, match="read transaction"), store._read() as session:
        store._audit(session, "ops", "test.step", "step:0")
    assert store.audit_log(action_prefix="test.step") == []
