"""Values <-> wire shapes, policy documents -> Policy, and the engine's raw VM from the store."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from controller.api import schemas as s
from controller.api.port import ControllerPort
from controller.boot import check_document, engine_vm, parse_document
from controller.identity.groups import GroupDef
from controller.identity.selector import Evidence
from controller.model import VM, Attr, Fact, Provenance, VNic
from controller.policy.explain import Membership
from controller.policy.schema import Policy
from controller.policy.validate import Problem
from controller.store import Store
from controller.store.records import AuditEntry, ContextRecord, PolicyRevision, Principal

__all__ = ["check_document", "parse_document", "engine_vm"]

def active_policy(revision: PolicyRevision | None) -> tuple[Policy, dict[str, GroupDef]]:
    if revision is None:
        return Policy(), {}
    policy, groups, problems = parse_document(revision.document)
    if policy is None:
        raise ValueError(f"active revision {revision.number} does not parse: {problems}")
    return policy, groups


def engine_vm_of(store_vm: VM, store: Store, controller: ControllerPort, now: float) -> VM:
    """The engine's record of a VM the store just returned: with its live context, and bound
    where the engine saw it plugged."""
    return engine_vm(store_vm, store.get_context(store_vm.uuid), now, controller.vm(store_vm.uuid))


# ---- wire shapes ----------------------------------------------------------------------------


def fact_out(f: Fact) -> s.FactOut:
    return s.FactOut(attr=str(f.attr), key=f.key, value=f.value, provenance=str(f.provenance),
                     observed_at=f.observed_at)


def vnic_out(n: VNic) -> s.VnicOut:
    return s.VnicOut(mac=n.mac, ips=list(n.ips), name=n.name, ofport=n.ofport)


def vm_out(vm: VM) -> s.VmOut:
    tags = {f.key: f.value for f in sorted(vm.facts) if f.attr is Attr.TAG}
    return s.VmOut(uuid=vm.uuid, name=vm.name, hypervisor=vm.hypervisor,
                   vnics=[vnic_out(n) for n in vm.vnics], tags=tags)


def vm_detail(vm: VM, seen: VM | None) -> s.VmDetail:
    engine = None if seen is None else s.EngineVmOut(
        hypervisor=seen.hypervisor, vnics=[vnic_out(n) for n in seen.vnics],
        facts=[fact_out(f) for f in sorted(seen.all_facts())])
    return s.VmDetail(**vm_out(vm).model_dump(), engine=engine)


def vm_in(body: s.VmReplace, uuid: str, now: float, old: VM | None = None) -> VM:
    """A store VM from a request body; unchanged tags keep the time they were first seen."""
    kept = {(f.key, f.value): f.observed_at for f in (old.facts if old else ()) if f.attr is Attr.TAG}
    tags = frozenset(Fact(Attr.TAG, k, v, Provenance.PLATFORM, kept.get((k, v), now)) for k, v in body.tags.items())
    vnics = tuple(VNic(n.mac, tuple(n.ips), n.ofport, n.name) for n in body.vnics)
    return VM(uuid, body.name, body.hypervisor, vnics, tags)


def record_out(r: ContextRecord, now: float) -> s.ContextRecordOut:
    return s.ContextRecordOut(
        provenance=str(r.provenance), reported_by=r.reported_by, observed_at=r.observed_at,
        expires_at=r.expires_at, expired=r.expires_at is not None and r.expires_at <= now,
        facts=[fact_out(f) for f in sorted(r.facts)])


def evidence_out(ev: Evidence) -> s.EvidenceOut:
    return s.EvidenceOut(term=ev.term, satisfied=ev.satisfied, facts=[fact_out(f) for f in ev.facts])


def membership_out(m: Membership) -> s.MembershipOut:
    return s.MembershipOut(group=m.group, vm=m.vm, member=m.member, selector=m.selector,
                           tests=[evidence_out(ev) for ev in m.evidence])


def revision_out(rev: PolicyRevision) -> s.RevisionOut:
    return s.RevisionOut(
        number=rev.number, state=str(rev.state), document=dict(rev.document), author=rev.author,
        created_at=rev.created_at, published_at=rev.published_at, published_by=rev.published_by,
        comment=rev.comment, based_on=rev.based_on)


def principal_out(p: Principal) -> s.PrincipalOut:
    return s.PrincipalOut(name=p.name, role=str(p.role), hypervisor=p.hypervisor,
                          created_at=p.created_at, revoked=p.revoked)


def audit_out(e: AuditEntry) -> s.AuditOut:
    return s.AuditOut(id=e.id, at=e.at, actor=e.actor, action=e.action, target=e.target,
                      before=e.before, after=e.after, outcome=e.outcome, details=dict(e.details))


def problems_out(problems: Iterable[Problem]) -> list[s.ProblemOut]:
    return [s.ProblemOut(location=p.location, message=p.message) for p in problems]


# ---- revision diffs -------------------------------------------------------------------------


def _by_id(rules: object) -> dict[str, Any]:
    if not isinstance(rules, list):
        return {}
    return {str(r.get("id")): r for r in rules if isinstance(r, Mapping)}


def _changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> s.ChangeSet:
    return s.ChangeSet(
        added=sorted(set(new) - set(old)),
        removed=sorted(set(old) - set(new)),
        changed=sorted(k for k in set(old) & set(new) if old[k] != new[k]))


def revision_diff(new: PolicyRevision, old: PolicyRevision | None) -> s.RevisionDiff:
    before = old.document if old is not None else {}
    groups_old = before.get("groups") or {}
    groups_new = new.document.get("groups") or {}
    return s.RevisionDiff(
        against=None if old is None else old.number,
        rules=_changes(_by_id(before.get("rules")), _by_id(new.document.get("rules"))),
        groups=_changes(groups_old if isinstance(groups_old, Mapping) else {},
                        groups_new if isinstance(groups_new, Mapping) else {}))
