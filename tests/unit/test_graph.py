"""The identity graph and derived directory groups."""

from __future__ import annotations

from controller.identity.graph import (
    build_graph,
    effective_vm,
    users_on,
    vms_of_user,
    vms_on_hypervisor,
)
from controller.model import VM, Attr, Fact, Hypervisor, Inventory, Provenance, VNic

G, P, A = Provenance.GUEST, Provenance.PLATFORM, Provenance.AUTHORITATIVE
DIRECTORY = {"bob": frozenset({"finance", "staff"}), "carol": frozenset({"hr"})}


def test_effective_vm_derives_groups_with_the_login_provenance() -> None:
    vm = VM(
        "u1",
        "desk",
        "hv1",
        facts=frozenset(
            {
                Fact(Attr.USER, "", "bob", G, 5.0),
                Fact(Attr.USER, "", "carol", A, 7.0),
                Fact(Attr.USER, "", "nobody", G, 1.0),
                Fact(Attr.USERGROUP, "", "local-admins", G, 3.0),
            }
        ),
    )
    eff = effective_vm(vm, DIRECTORY)
    assert eff.values(Attr.USERGROUP) == tuple(
        sorted(
            {
                Fact(Attr.USERGROUP, "", "finance", G, 5.0),
                Fact(Attr.USERGROUP, "", "staff", G, 5.0),
                Fact(Attr.USERGROUP, "", "hr", A, 7.0),
                Fact(Attr.USERGROUP, "", "local-admins", G, 3.0),
            }
        )
    )
    assert vm.facts < eff.facts  # nothing lost, the original untouched
    assert (eff.uuid, eff.name, eff.hypervisor) == (vm.uuid, vm.name, vm.hypervisor)


def test_effective_vm_without_logins_is_unchanged() -> None:
    vm = VM("u1", "desk", "hv1")
    assert effective_vm(vm, DIRECTORY) == vm


def inventory() -> Inventory:
    desk = VM(
        "u1",
        "desk",
        "hv1",
        vnics=(VNic("52:54:00:00:00:01", ("10.0.0.1",), 3, "vnet0"),),
        facts=frozenset(
            {
                Fact(Attr.USER, "", "bob", G, 5.0),
                Fact(Attr.TAG, "dept", "finance", P),
                Fact(Attr.OS, "", "ubuntu", G, 4.0),
                Fact(Attr.APP, "postgres", "tcp/5432", G, 4.0),
                Fact(Attr.LABEL, "", "pci", G, 4.0),
                Fact(Attr.POSTURE, "edr", "pass", A, 6.0),
            }
        ),
    )
    db = VM("u2", "db", "hv2", facts=frozenset({Fact(Attr.USER, "", "bob", A, 8.0)}))
    return Inventory(
        hypervisors={"hv1": Hypervisor("hv1"), "hv2": Hypervisor("hv2"), "hv3": Hypervisor("hv3")},
        vms={"u1": desk, "u2": db},
    )


def edges(g, relation: str) -> set[tuple]:  # type: ignore[no-untyped-def]
    return {
        (s, d, data["provenance"], data["observed_at"])
        for s, d, data in g.edges(data=True)
        if data["relation"] == relation
    }


def test_graph_nodes_have_kinds() -> None:
    g = build_graph(inventory(), DIRECTORY)
    expected = {
        ("hypervisor", "hv1"),
        ("hypervisor", "hv2"),
        ("hypervisor", "hv3"),
        ("vm", "u1"),
        ("vm", "u2"),
        ("vnic", "52:54:00:00:00:01"),
        ("user", "bob"),
        ("dirgroup", "finance"),
        ("dirgroup", "staff"),
        ("app", "postgres"),
        ("label", "pci"),
        ("tag", "dept=finance"),
        ("os", "ubuntu"),
        ("posture", "edr=pass"),
    }
    assert set(g.nodes) == expected
    assert all(g.nodes[n]["kind"] == n[0] for n in g.nodes)
    assert g.nodes[("vm", "u1")]["name"] == "desk"
    assert g.nodes[("vnic", "52:54:00:00:00:01")]["ofport"] == 3


def test_graph_edges_carry_relation_provenance_and_time() -> None:
    g = build_graph(inventory(), DIRECTORY)
    vm1, vm2 = ("vm", "u1"), ("vm", "u2")
    assert edges(g, "hosts") == {
        (("hypervisor", "hv1"), vm1, P, 0.0),
        (("hypervisor", "hv2"), vm2, P, 0.0),
    }
    assert edges(g, "has_nic") == {(vm1, ("vnic", "52:54:00:00:00:01"), P, 0.0)}
    assert edges(g, "logged_in") == {(vm1, ("user", "bob"), G, 5.0), (vm2, ("user", "bob"), A, 8.0)}
    assert edges(g, "member_of") == {
        (("user", "bob"), ("dirgroup", "finance"), A, 0.0),
        (("user", "bob"), ("dirgroup", "staff"), A, 0.0),
    }
    assert edges(g, "runs") == {(vm1, ("app", "postgres"), G, 4.0)}
    assert edges(g, "holds") == {(vm1, ("label", "pci"), G, 4.0)}
    assert edges(g, "tagged") == {(vm1, ("tag", "dept=finance"), P, 0.0)}
    assert edges(g, "runs_os") == {(vm1, ("os", "ubuntu"), G, 4.0)}
    assert edges(g, "posture") == {(vm1, ("posture", "edr=pass"), A, 6.0)}


def test_queries() -> None:
    g = build_graph(inventory(), DIRECTORY)
    assert vms_of_user(g, "bob") == frozenset({"u1", "u2"})
    assert vms_of_user(g, "carol") == frozenset()
    assert vms_on_hypervisor(g, "hv1") == frozenset({"u1"})
    assert vms_on_hypervisor(g, "hv3") == frozenset()
    assert vms_on_hypervisor(g, "nope") == frozenset()
    assert users_on(g, "u1") == frozenset({"bob"})
    assert users_on(g, "u9") == frozenset()


def test_vm_on_unlisted_hypervisor_still_gets_a_hypervisor_node() -> None:
    inv = Inventory(vms={"u1": VM("u1", "x", "hv9")})
    g = build_graph(inv, {})
    assert g.nodes[("hypervisor", "hv9")]["kind"] == "hypervisor"
    assert vms_on_hypervisor(g, "hv9") == frozenset({"u1"})
