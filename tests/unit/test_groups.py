"""Incremental group membership agrees with a full recompute."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.identity import groups as groups_module
from controller.identity.graph import effective_vm
from controller.identity.groups import GroupDef, GroupIndex, compute_members
from controller.identity.selector import parse_selector
from controller.model import VM, Attr, Fact, Provenance, VNic

G, P = Provenance.GUEST, Provenance.PLATFORM


def group(name: str, text: str) -> GroupDef:
    return GroupDef(name, parse_selector(text), text)


GROUPS = {
    "finance": group("finance", "tag.dept == 'finance'"),
    "fin-users": group("fin-users", "tag.role == 'desktop' && usergroup == 'finance'"),
    "bob": group("bob", "user == 'bob'"),
    "web": group("web", "name glob 'web-*'"),
    "everyone": group("everyone", "all()"),
    "on-hv2": group("on-hv2", "hypervisor == 'hv2'"),
}


def make_vm(uuid: str, name: str, *facts: Fact) -> VM:
    return VM(uuid, name, "hv1", facts=frozenset(facts))


def test_update_and_remove_report_changed_groups() -> None:
    idx = GroupIndex(GROUPS)
    desk = make_vm(
        "u1", "desk", Fact(Attr.TAG, "dept", "finance", P), Fact(Attr.TAG, "role", "desktop", P)
    )
    assert idx.update_vm(desk) == {"finance", "everyone"}
    assert idx.update_vm(desk) == frozenset()  # idempotent
    login = replace(desk, facts=desk.facts | {Fact(Attr.USER, "", "bob", G, 1.0)})
    assert idx.update_vm(effective_vm(login, {"bob": frozenset({"finance"})})) == {
        "bob",
        "fin-users",
    }
    assert idx.members("fin-users") == {"u1"}
    assert idx.groups_of("u1") == {"finance", "fin-users", "bob", "everyone"}
    assert idx.remove_vm("u1") == {"finance", "fin-users", "bob", "everyone"}
    assert idx.groups_of("u1") == frozenset()
    assert idx.members("finance") == frozenset()
    assert idx.remove_vm("u1") == frozenset()
    assert idx.members("no-such-group") == frozenset()


def test_set_groups_reevaluates_only_changed_selectors() -> None:
    vms = [make_vm("u1", "web-1"), make_vm("u2", "db-1", Fact(Attr.USER, "", "bob", G))]
    idx = GroupIndex(GROUPS)
    for vm in vms:
        idx.update_vm(vm)
    new = dict(GROUPS)
    new["web"] = group("web", "name glob 'db-*'")  # changed selector
    new["bob"] = group("bob", "user=='bob'")  # same selector, new text
    del new["finance"]  # removed (empty)
    new["all-web"] = group("all-web", "name glob '*-1'")  # added
    changed = idx.set_groups(new, vms)
    assert changed == {"web", "finance", "all-web"}
    assert idx.members("web") == {"u2"}
    assert idx.members("all-web") == {"u1", "u2"}
    assert idx.groups_of("u1") == {"everyone", "all-web"}
    assert {name: idx.members(name) for name in new} == compute_members(new, vms)


def test_a_vm_only_plugged_elsewhere_is_not_tested_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # An OVSDB snapshot re-binds every VM after a restart: selectors read facts, name and
    # hypervisor, never vNICs, so the index must not test every group against each VM again.
    groups = GROUPS
    idx = GroupIndex(groups)
    vm = make_vm("u1", "web-1", Fact(Attr.TAG, "dept", "finance", P))
    assert idx.update_vm(vm) == {"finance", "web", "everyone"}
    tested: list[str] = []
    real = groups_module.matches
    monkeypatch.setattr(groups_module, "matches", lambda expr, v: tested.append(v.uuid) or real(expr, v))
    plugged = replace(vm, vnics=(VNic("02:00:00:00:00:01", ("10.0.0.1",), 7),))
    assert idx.update_vm(plugged) == frozenset() and tested == []
    moved = replace(plugged, hypervisor="hv2")  # a selector can see this
    assert idx.update_vm(moved) == {"on-hv2"} and tested
    tested.clear()
    retagged = replace(moved, facts=frozenset({Fact(Attr.TAG, "dept", "hr", P)}))
    assert idx.update_vm(retagged) == {"finance"} and tested
    idx.set_groups({**groups, "finance": group("finance", "tag.dept == 'hr'")}, [retagged])
    tested.clear()
    assert idx.update_vm(retagged) == frozenset() and tested  # evaluated afresh after a redefinition
    assert idx.groups_of("u1") == {"finance", "web", "everyone", "on-hv2"}


def test_compute_members_includes_empty_groups() -> None:
    assert compute_members(GROUPS, []) == {name: frozenset() for name in GROUPS}


# --- property: any sequence of operations equals a full recompute -----------------------------

_UUIDS = ["u1", "u2", "u3", "u4"]
_facts = st.sampled_from(
    [
        Fact(Attr.TAG, "dept", "finance", P),
        Fact(Attr.TAG, "dept", "hr", P),
        Fact(Attr.TAG, "role", "desktop", P),
        Fact(Attr.USER, "", "bob", G),
        Fact(Attr.USER, "", "alice", G),
        Fact(Attr.USERGROUP, "", "finance", G),
    ]
)
_vms = st.builds(
    make_vm,
    st.sampled_from(_UUIDS),
    st.sampled_from(["web-1", "desk", "web-2"]),
)
_vms = st.builds(
    lambda vm, facts, hv, ofport: replace(vm, facts=frozenset(facts), hypervisor=hv,
                                          vnics=(VNic("02:00:00:00:00:01", ("10.0.0.1",), ofport),)),
    _vms, st.lists(_facts, max_size=4), st.sampled_from(["hv1", "hv2"]), st.sampled_from([None, 1, 2]),
)
_group_sets = st.dictionaries(
    st.sampled_from(list(GROUPS)), st.sampled_from(list(GROUPS.values())), max_size=5
).map(lambda d: {name: replace(g, name=name) for name, g in d.items()})
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("update"), _vms),
        st.tuples(st.just("remove"), st.sampled_from(_UUIDS)),
        st.tuples(st.just("groups"), _group_sets),
    ),
    max_size=30,
)


@settings(max_examples=200)
@given(_ops)
def test_index_equals_full_recompute(ops: list[tuple[str, object]]) -> None:
    groups = dict(GROUPS)
    idx = GroupIndex(groups)
    live: dict[str, VM] = {}
    for kind, arg in ops:
        before = {name: idx.members(name) for name in groups}
        if kind == "update":
            assert isinstance(arg, VM)
            live[arg.uuid] = arg
            changed = idx.update_vm(arg)
        elif kind == "remove":
            assert isinstance(arg, str)
            live.pop(arg, None)
            changed = idx.remove_vm(arg)
        else:
            assert isinstance(arg, dict)
            old_names = set(groups)
            groups = arg
            changed = idx.set_groups(groups, live.values())
            assert old_names ^ set(groups) <= changed
        expected = compute_members(groups, live.values())
        assert {name: idx.members(name) for name in groups} == expected
        for uuid in _UUIDS:
            assert idx.groups_of(uuid) == {n for n, m in expected.items() if uuid in m}
        # Exactly the groups whose membership moved are reported (plus added/removed ones).
        moved = {
            n
            for n in set(groups) | set(before)
            if before.get(n, frozenset()) != expected.get(n, frozenset())
        }
        assert moved <= changed
        assert changed <= moved | (set(before) ^ set(groups))
