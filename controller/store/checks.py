"""Checks a write must pass before it touches a row, so that a refusal names the field that
clashes ("mac 02:00:00:00:00:01: already used by vm web1") instead of surfacing a database
constraint error. The database constraints stay as the last line of defence."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.identity.selector import Term
from controller.model import (
    PLATFORM_ATTRS,
    VM,
    Attr,
    Fact,
    Gateway,
    Hypervisor,
    Provenance,
    VNic,
    normalize_ipv4,
    normalize_mac,
)
from controller.store.errors import Conflict, NotFound
from controller.store.schema import HypervisorRow, SettingRow, VmRow, VnicIpRow, VnicRow

GATEWAY_KEY = "gateway"


# ---- value normalization (ValueError: the caller sent nonsense, not a clash) ----------------


def normalized_vm(vm: VM) -> VM:
    """The VM with MACs and IPs in canonical form; only TAG facts of platform provenance."""
    if not vm.uuid.strip():
        raise ValueError("a VM needs a uuid")
    if not vm.name.strip():
        raise ValueError("a VM needs a name")
    for fact in vm.facts:
        tag_fact(fact)
    vnics = tuple(
        VNic(normalize_mac(n.mac), tuple(normalize_ipv4(ip) for ip in n.ips), n.ofport, n.name)
        for n in vm.vnics
    )
    return VM(vm.uuid, vm.name, vm.hypervisor, vnics, vm.facts)


def tag_fact(fact: Fact) -> None:
    # Context belongs in put_context: silently storing it on the VM would make a guest's claim
    # look hypervisor-verified.
    if fact.attr != Attr.TAG or fact.provenance != Provenance.PLATFORM:
        raise ValueError(
            f"a VM holds only platform tags; {fact.describe()} is context (use put_context)"
        )
    tag_key(fact.key)


def tag_key(key: str) -> None:
    Term(Attr.TAG, key)  # raises ValueError naming the bad key; keeps the tag selectable


def context_facts(facts: frozenset[Fact], provenance: Provenance) -> None:
    if provenance == Provenance.PLATFORM:
        raise ValueError("platform facts are set through inventory (tags), not as context")
    for fact in facts:
        if fact.attr in PLATFORM_ATTRS:
            raise ValueError(f"{fact.attr} is a platform attribute; context cannot claim it")
        if fact.provenance != provenance:
            raise ValueError(f"fact {fact.describe()} does not come from {provenance}")


def normalized_gateway(gw: Gateway) -> Gateway:
    return Gateway(normalize_ipv4(gw.ip), normalize_mac(gw.mac))


# ---- clashes with stored rows ----------------------------------------------------------------


def vm_fits(session: Session, vm: VM) -> None:
    """Raise Conflict if `vm` (new, or replacing the row with its uuid) clashes with another."""
    hv = session.get(HypervisorRow, vm.hypervisor)
    if hv is None:
        raise Conflict(f"hypervisor {vm.hypervisor}: unknown hypervisor")
    other = session.scalars(select(VmRow).where(VmRow.name == vm.name, VmRow.uuid != vm.uuid)).first()
    if other is not None:
        raise Conflict(f"name {vm.name}: already used by vm {other.uuid}")
    _own_duplicates(vm)
    for nic in vm.vnics:
        _mac_free(session, nic.mac, vm)
        for ip in nic.ips:
            _ip_free(session, ip, vm)
        if nic.ofport is not None:
            _ofport_free(session, hv, nic.ofport, vm)


def _own_duplicates(vm: VM) -> None:
    macs = [n.mac for n in vm.vnics]
    ips = [ip for n in vm.vnics for ip in n.ips]
    ofports = [n.ofport for n in vm.vnics if n.ofport is not None]
    for field, values in (("mac", macs), ("ip", ips), ("ofport", ofports)):
        seen: set[object] = set()
        for value in values:
            if value in seen:
                raise Conflict(f"{field} {value}: used twice by vm {vm.name}")
            seen.add(value)


def _mac_free(session: Session, mac: str, vm: VM) -> None:
    owner = session.scalars(
        select(VmRow.name).join(VnicRow).where(VnicRow.mac == mac, VmRow.uuid != vm.uuid)
    ).first()
    if owner is not None:
        raise Conflict(f"mac {mac}: already used by vm {owner}")
    gateway = stored_gateway(session)
    if gateway is not None and gateway.mac == mac:
        raise Conflict(f"mac {mac}: already used by the gateway")


def _ip_free(session: Session, ip: str, vm: VM) -> None:
    owner = session.scalars(
        select(VmRow.name).join(VnicRow).join(VnicIpRow)
        .where(VnicIpRow.ip == ip, VmRow.uuid != vm.uuid)
    ).first()
    if owner is not None:
        raise Conflict(f"ip {ip}: already used by vm {owner}")
    gateway = stored_gateway(session)
    if gateway is not None and gateway.ip == ip:
        raise Conflict(f"ip {ip}: already used by the gateway")


def _ofport_free(session: Session, hv: HypervisorRow, ofport: int, vm: VM) -> None:
    # One bridge per hypervisor: an OpenFlow port number names one interface on it.
    if hv.uplink_ofport == ofport:
        raise Conflict(f"ofport {ofport}: already used by the uplink of hypervisor {hv.name}")
    owner = session.scalars(
        select(VmRow.name).join(VnicRow)
        .where(VmRow.hypervisor == hv.name, VnicRow.ofport == ofport, VmRow.uuid != vm.uuid)
    ).first()
    if owner is not None:
        raise Conflict(f"ofport {ofport}: already used on hypervisor {hv.name} by vm {owner}")


def hypervisor_fits(session: Session, hv: Hypervisor) -> None:
    if not hv.name.strip():
        raise ValueError("a hypervisor needs a name")
    if hv.dpid is not None:
        if not 0 <= hv.dpid < 1 << 64:
            raise ValueError(f"dpid {hv.dpid} out of range (0 to 2^64-1)")
        other = session.scalars(
            select(HypervisorRow.name).where(HypervisorRow.dpid == str(hv.dpid), HypervisorRow.name != hv.name)
        ).first()
        if other is not None:
            raise Conflict(f"dpid {hv.dpid}: already used by hypervisor {other}")
    if hv.uplink_ofport is not None:
        owner = session.scalars(
            select(VmRow.name).join(VnicRow)
            .where(VmRow.hypervisor == hv.name, VnicRow.ofport == hv.uplink_ofport)
        ).first()
        if owner is not None:
            raise Conflict(f"uplink_ofport {hv.uplink_ofport}: already used on hypervisor {hv.name} by vm {owner}")


def gateway_fits(session: Session, gw: Gateway) -> None:
    owner = session.scalars(select(VmRow.name).join(VnicRow).where(VnicRow.mac == gw.mac)).first()
    if owner is not None:
        raise Conflict(f"mac {gw.mac}: already used by vm {owner}")
    owner = session.scalars(
        select(VmRow.name).join(VnicRow).join(VnicIpRow).where(VnicIpRow.ip == gw.ip)
    ).first()
    if owner is not None:
        raise Conflict(f"ip {gw.ip}: already used by vm {owner}")


def stored_gateway(session: Session) -> Gateway | None:
    row = session.get(SettingRow, GATEWAY_KEY)
    return None if row is None else Gateway(row.value["ip"], row.value["mac"])


def vm_row(session: Session, uuid: str) -> VmRow:
    row = session.get(VmRow, uuid)
    if row is None:
        raise NotFound(f"vm {uuid}: no such VM")
    return row
