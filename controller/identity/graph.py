"""The identity graph: who runs where, who is logged in, and what that makes them.

A networkx view of an Inventory plus the directory (user -> groups, from the identity
provider). It is derived, never edited: rebuild it from a new snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from controller.model import VM, Attr, Fact, Inventory, Provenance

if TYPE_CHECKING:
    # Imported where a graph is built: the engine needs only effective_vm, and networkx
    # takes a quarter of a second to import, on the way to `goldilocks run`'s first flows.
    import networkx

__all__ = [
    "Directory",
    "Node",
    "build_graph",
    "effective_vm",
    "users_on",
    "vms_of_user",
    "vms_on_hypervisor",
]

Directory = Mapping[str, frozenset[str]]  # user name -> directory groups (authoritative)
Node = tuple[str, str]  # (kind, name), e.g. ("vm", uuid), ("tag", "dept=finance")


def effective_vm(vm: VM, directory: Directory) -> VM:
    """`vm` with the USERGROUP facts its logins imply.

    Each derived fact carries the login's provenance and time: the membership is only as true
    as the claim that the user is logged in, so a guest-reported login yields a guest-grade
    group fact, and it ages with the login.
    """
    derived = {
        Fact(Attr.USERGROUP, "", group, login.provenance, login.observed_at)
        for login in vm.values(Attr.USER)
        for group in directory.get(login.value, frozenset())
    }
    if not derived:
        return vm
    return replace(vm, facts=vm.facts | derived)


# How each kind of fact hangs off its VM: fact attribute -> (node kind, edge relation).
_FACT_EDGES: dict[Attr, tuple[str, str]] = {
    Attr.USER: ("user", "logged_in"),
    Attr.APP: ("app", "runs"),
    Attr.LABEL: ("label", "holds"),
    Attr.TAG: ("tag", "tagged"),
    Attr.OS: ("os", "runs_os"),
    Attr.POSTURE: ("posture", "posture"),
    # Groups a VM reports directly (not derived from a login): no user to hang them on.
    Attr.USERGROUP: ("dirgroup", "group_reported"),
}


def build_graph(inventory: Inventory, directory: Directory) -> networkx.MultiDiGraph:
    """Nodes are (kind, name) tuples with a `kind` attribute; every edge has `relation`,
    `provenance` and `observed_at`. Only logged-in users get directory edges."""
    import networkx

    g = networkx.MultiDiGraph()
    for hv in inventory.hypervisors.values():
        g.add_node(("hypervisor", hv.name), kind="hypervisor")
    for vm in inventory.vms.values():
        _add_vm(g, vm)
    for node, data in list(g.nodes(data=True)):
        if data["kind"] == "user":
            for group in sorted(directory.get(node[1], frozenset())):
                _edge(g, node, ("dirgroup", group), "member_of", Provenance.AUTHORITATIVE, 0.0)
    return g


def _add_vm(g: networkx.MultiDiGraph, vm: VM) -> None:
    vm_node = ("vm", vm.uuid)
    g.add_node(vm_node, kind="vm", name=vm.name, hypervisor=vm.hypervisor)
    _edge(g, ("hypervisor", vm.hypervisor), vm_node, "hosts", Provenance.PLATFORM, 0.0)
    for nic in vm.vnics:
        g.add_node(("vnic", nic.mac), kind="vnic", ips=nic.ips, ofport=nic.ofport, name=nic.name)
        _edge(g, vm_node, ("vnic", nic.mac), "has_nic", Provenance.PLATFORM, 0.0)
    for fact in sorted(vm.facts):
        if fact.attr in _FACT_EDGES:
            kind, relation = _FACT_EDGES[fact.attr]
            _edge(
                g,
                vm_node,
                (kind, _fact_node_name(fact)),
                relation,
                fact.provenance,
                fact.observed_at,
            )


def _fact_node_name(fact: Fact) -> str:
    if fact.attr in (Attr.TAG, Attr.POSTURE):
        return f"{fact.key}={fact.value}"
    if fact.attr is Attr.APP:
        return fact.key  # the app name; its ports are the fact's value
    return fact.value


def _edge(
    g: networkx.MultiDiGraph,
    src: Node,
    dst: Node,
    relation: str,
    provenance: Provenance,
    observed_at: float,
) -> None:
    for node in (src, dst):
        if node not in g:
            g.add_node(node, kind=node[0])
    g.add_edge(src, dst, relation=relation, provenance=provenance, observed_at=observed_at)


def _neighbours(
    g: networkx.MultiDiGraph, node: Node, relation: str, *, outgoing: bool
) -> frozenset[str]:
    if node not in g:
        return frozenset()
    edges = g.out_edges(node, data="relation") if outgoing else g.in_edges(node, data="relation")
    return frozenset((dst if outgoing else src)[1] for src, dst, rel in edges if rel == relation)


def vms_of_user(g: networkx.MultiDiGraph, user: str) -> frozenset[str]:
    """UUIDs of the VMs `user` is logged in to."""
    return _neighbours(g, ("user", user), "logged_in", outgoing=False)


def vms_on_hypervisor(g: networkx.MultiDiGraph, name: str) -> frozenset[str]:
    return _neighbours(g, ("hypervisor", name), "hosts", outgoing=True)


def users_on(g: networkx.MultiDiGraph, uuid: str) -> frozenset[str]:
    """Names of the users logged in to VM `uuid`."""
    return _neighbours(g, ("vm", uuid), "logged_in", outgoing=True)
