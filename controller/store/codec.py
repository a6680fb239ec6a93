"""Rows to values (and a revision back to its row) and values to JSON: the only place that
knows both shapes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import Row

from controller.model import VM, Attr, Fact, Gateway, Hypervisor, Provenance, VNic
from controller.store.records import ContextRecord, PolicyRevision, Principal, RevisionState, Role
from controller.store.schema import (
    ContextRow,
    HypervisorRow,
    PrincipalRow,
    RevisionRow,
    VmRow,
)

Json = dict[str, Any]


# ---- rows -> values -------------------------------------------------------------------------


def hypervisor_of(row: HypervisorRow) -> Hypervisor:
    return Hypervisor(row.name, row.uplink_ofport, None if row.dpid is None else int(row.dpid))


def vm_from(uuid: str, name: str, hypervisor: str, nics: Iterable[Any], tags: Iterable[Any]) -> VM:
    """A VM from plain result rows: `nics` (id, mac, ofport, name, ip) one per address (ip None
    for a vNIC without one), in vNIC then address order; `tags` (key, value, observed_at)."""
    by_id: dict[int, tuple[Any, list[str]]] = {}
    for nic in nics:
        _, ips = by_id.setdefault(nic.id, (nic, []))
        if nic.ip is not None:
            ips.append(nic.ip)
    vnics = tuple(VNic(nic.mac, tuple(ips), nic.ofport, nic.name) for nic, ips in by_id.values())
    facts = frozenset(Fact(Attr.TAG, t.key, t.value, Provenance.PLATFORM, t.observed_at) for t in tags)
    return VM(uuid, name, hypervisor, vnics, facts)


def vm_of(row: VmRow) -> VM:
    vnics = tuple(
        VNic(nic.mac, tuple(ip.ip for ip in nic.ips), nic.ofport, nic.name) for nic in row.vnics
    )
    tags = frozenset(
        Fact(Attr.TAG, tag.key, tag.value, Provenance.PLATFORM, tag.observed_at) for tag in row.tags
    )
    return VM(row.uuid, row.name, row.hypervisor, vnics, tags)


def context_of(row: ContextRow) -> ContextRecord:
    provenance = Provenance(row.provenance)
    return ContextRecord(
        vm_uuid=row.vm_uuid,
        provenance=provenance,
        facts=facts_from_json(row.facts, provenance),
        reported_by=row.reported_by,
        observed_at=row.observed_at,
        expires_at=row.expires_at,
    )


def principal_of(row: PrincipalRow | Row[Any]) -> Principal:
    return Principal(row.name, Role(row.role), row.hypervisor, row.created_at, row.revoked_at is not None)


def revision_of(row: RevisionRow | Row[Any]) -> PolicyRevision:
    return PolicyRevision(
        number=row.number,
        state=RevisionState(row.state),
        document=row.document,
        author=row.author,
        created_at=row.created_at,
        published_at=row.published_at,
        published_by=row.published_by,
        comment=row.comment,
        based_on=row.based_on,
    )


def revision_row(rev: PolicyRevision) -> dict[str, Any]:
    """The policy_revisions columns of a revision (revision_of's inverse)."""
    return {"number": rev.number, "state": rev.state.value, "document": rev.document, "author": rev.author,
            "created_at": rev.created_at, "published_at": rev.published_at, "published_by": rev.published_by,
            "comment": rev.comment, "based_on": rev.based_on}


# ---- values -> JSON (context facts, audit snapshots) ---------------------------------------


def facts_to_json(facts: Iterable[Fact]) -> list[Json]:
    # Provenance lives on the record, not on each fact: one record holds one source's claims.
    return [
        {"attr": f.attr.value, "key": f.key, "value": f.value, "observed_at": f.observed_at}
        for f in sorted(facts)
    ]


def facts_from_json(items: Iterable[Mapping[str, Any]], provenance: Provenance) -> frozenset[Fact]:
    return frozenset(
        Fact(Attr(i["attr"]), i["key"], i["value"], provenance, float(i["observed_at"])) for i in items
    )


def hypervisor_json(hv: Hypervisor) -> Json:
    return {"name": hv.name, "uplink_ofport": hv.uplink_ofport, "dpid": hv.dpid}


def gateway_json(gw: Gateway | None) -> Json | None:
    return None if gw is None else {"ip": gw.ip, "mac": gw.mac}


def vm_json(vm: VM) -> Json:
    return {
        "uuid": vm.uuid,
        "name": vm.name,
        "hypervisor": vm.hypervisor,
        "vnics": [
            {"mac": n.mac, "ips": list(n.ips), "ofport": n.ofport, "name": n.name} for n in vm.vnics
        ],
        "tags": {f.key: f.value for f in sorted(vm.facts) if f.attr == Attr.TAG},
    }


def context_json(record: ContextRecord) -> Json:
    return {
        "vm": record.vm_uuid,
        "provenance": record.provenance.value,
        "facts": facts_to_json(record.facts),
        "reported_by": record.reported_by,
        "observed_at": record.observed_at,
        "expires_at": record.expires_at,
    }


def principal_json(p: Principal) -> Json:
    # Never the token, nor its hash: the audit log is readable by auditors.
    return {"name": p.name, "role": p.role.value, "hypervisor": p.hypervisor, "revoked": p.revoked}


def revision_json(rev: PolicyRevision) -> Json:
    return {
        "number": rev.number,
        "state": rev.state.value,
        "author": rev.author,
        "comment": rev.comment,
        "based_on": rev.based_on,
        "published_by": rev.published_by,
        "document": dict(rev.document),
    }
