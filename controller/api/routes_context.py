"""Context: what the engine knows about a VM beyond its inventory record, and who said it.

Guest context comes only from the relay of the VM's hypervisor (DESIGN.md §5); authoritative
context (identity provider logins, EDR verdicts) from operators' integrations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

from fastapi import APIRouter, Depends, Path

from controller.api import convert
from controller.api import schemas as s
from controller.api.auth import READ, RELAY, WRITE, allow, forbidden
from controller.api.deps import Services, Svc
from controller.api.errors import Unprocessable
from controller.api.routes_inventory import find_vm
from controller.events import (
    ContextReported,
    DirectoryChanged,
    QuarantineReleased,
    QuarantineRequested,
)
from controller.model import VM, Attr, Fact, Provenance, format_port_list, parse_port
from controller.policy.quarantine import EDR_CHECK
from controller.store import Conflict
from controller.store.records import ContextRecord, Principal

router = APIRouter(tags=["context"])
Reader = Annotated[Principal, Depends(allow(*READ))]
Writer = Annotated[Principal, Depends(allow(*WRITE))]
Relay = Annotated[Principal, Depends(allow(*RELAY))]

MAX_FUTURE = 300.0  # seconds of clock skew tolerated in observed_at
EDR_POSTURE = {"clean": "pass", "suspicious": "fail", "malicious": "fail"}  # unknown: no fact


@router.get("/vms/{vm}/context", response_model=s.VmContextOut, summary="A VM's context records, by source")
def get_context(vm: str, who: Reader, svc: Svc) -> s.VmContextOut:
    stored = find_vm(svc, vm)
    now = svc.clock()
    records = [convert.record_out(r, now) for r in svc.store.get_context(stored.uuid)]
    return s.VmContextOut(uuid=stored.uuid, vm=stored.name, records=records)


def _when(observed_at: float | None, ttl: int | None, now: float) -> tuple[float, float | None]:
    when = now if observed_at is None else observed_at
    if when > now + MAX_FUTURE:
        raise Unprocessable(["body", "observed_at"], f"{when} is more than {MAX_FUTURE:.0f} s in the future")
    return when, (None if ttl is None else when + ttl)


def _report(svc: Services, who: Principal, vm: VM, provenance: Provenance, facts: frozenset[Fact],
            when: float, expires: float | None) -> s.ContextRecordOut:
    record = svc.store.put_context(vm.uuid, provenance, facts, actor=who.name, observed_at=when, expires_at=expires)
    now = svc.clock()
    live = facts if expires is None or expires > now else frozenset()
    svc.controller.submit(ContextReported(vm.uuid, provenance, live, expires))
    return convert.record_out(record, now)


# ---- guest context (relays) ----------------------------------------------------------------


def guest_facts(body: s.GuestContextIn, when: float) -> frozenset[Fact]:
    g = Provenance.GUEST
    facts = {Fact(Attr.USER, "", u, g, when) for u in body.users}
    facts |= {Fact(Attr.LABEL, "", label, g, when) for label in body.labels}
    facts |= {Fact(Attr.APP, app, format_port_list(parse_port(p) for p in ports), g, when)
              for app, ports in body.apps.items()}
    facts |= {Fact(Attr.POSTURE, check, verdict, g, when) for check, verdict in body.posture.items()}
    if body.os is not None:
        facts.add(Fact(Attr.OS, "", body.os, g, when))
    return frozenset(facts)


def _relay_may_speak_for(svc: Services, relay: Principal, vm: VM) -> None:
    seen = svc.controller.vm(vm.uuid)
    where = seen.hypervisor if seen is not None else vm.hypervisor
    if relay.hypervisor == where:
        return
    why = f"relay for {relay.hypervisor} may not report context for VM {vm.name} on {where}"
    svc.store.record_rejection(actor=relay.name, action="context.guest", target=f"vm:{vm.uuid}", why=why)
    raise forbidden(why)


@router.post("/vms/{vm}/context/guest", response_model=s.ContextRecordOut,
             summary="Report a VM's guest context (relay of the VM's hypervisor only)")
def post_guest(vm: str, body: s.GuestContextIn, who: Relay, svc: Svc) -> s.ContextRecordOut:
    stored = find_vm(svc, vm)
    _relay_may_speak_for(svc, who, stored)
    when, expires = _when(body.observed_at, body.ttl_seconds, svc.clock())
    return _report(svc, who, stored, Provenance.GUEST, guest_facts(body, when), when, expires)


@router.post("/vms/{vm}/context/guest/rejected", status_code=204,
             summary="A relay reports guest messages it refused (audited; nothing else changes)")
def post_guest_rejected(vm: str, body: s.GuestRejectionIn, who: Relay, svc: Svc) -> None:
    stored = find_vm(svc, vm)
    _relay_may_speak_for(svc, who, stored)
    svc.store.record_rejection(actor=who.name, action="context.guest", target=f"vm:{stored.uuid}",
                               why=f"{body.reason} at the relay",
                               details={"reason": body.reason, "count": body.count, "detail": body.detail})


# ---- authoritative context (identity provider, EDR) -----------------------------------------


def _current(records: list[ContextRecord], now: float) -> frozenset[Fact]:
    live = [r for r in records if r.provenance is Provenance.AUTHORITATIVE
            and (r.expires_at is None or r.expires_at > now)]
    return live[0].facts if live else frozenset()


def authoritative_facts(body: s.AuthoritativeContextIn, old: frozenset[Fact], when: float) -> frozenset[Fact]:
    """Fields sent replace their part of the record; fields omitted keep what was there."""
    a = Provenance.AUTHORITATIVE
    facts = set(old)
    if body.users is not None:
        facts = {f for f in facts if f.attr is not Attr.USER} | {Fact(Attr.USER, "", u, a, when) for u in body.users}
    if body.verdict is not None:
        facts = {f for f in facts if not (f.attr is Attr.POSTURE and f.key == EDR_CHECK)}
        if body.verdict in EDR_POSTURE:
            facts.add(Fact(Attr.POSTURE, EDR_CHECK, EDR_POSTURE[body.verdict], a, when))
    return frozenset(facts)


@router.post("/vms/{vm}/context/authoritative", response_model=s.ContextRecordOut,
             summary="Report identity-provider logins and/or an EDR verdict for a VM")
def post_authoritative(vm: str, body: s.AuthoritativeContextIn, who: Writer, svc: Svc) -> s.ContextRecordOut:
    stored = find_vm(svc, vm)
    now = svc.clock()
    when, expires = _when(body.observed_at, body.ttl_seconds, now)
    old = _current(svc.store.get_context(stored.uuid), now)
    facts = authoritative_facts(body, old, when)
    return _report(svc, who, stored, Provenance.AUTHORITATIVE, facts, when, expires)


# ---- directory ------------------------------------------------------------------------------


@router.get("/directory", response_model=list[s.DirectoryUserOut], summary="The user directory")
def get_directory(who: Reader, svc: Svc) -> list[s.DirectoryUserOut]:
    return [s.DirectoryUserOut(user=u, groups=sorted(g)) for u, g in sorted(svc.store.directory().items())]


@router.put("/directory/{user}", response_model=s.DirectoryUserOut,
            summary="Set a user's directory groups ([] removes the user)")
def put_directory(user: Annotated[str, Path(min_length=1, max_length=128, pattern=s.NAME_PATTERN)],
                  body: s.DirectoryIn, who: Writer, svc: Svc) -> s.DirectoryUserOut:
    groups = frozenset(body.groups)
    svc.store.set_directory_user(user, groups, actor=who.name)
    svc.controller.submit(DirectoryChanged(user, groups))
    return s.DirectoryUserOut(user=user, groups=sorted(groups))


# ---- quarantine ----------------------------------------------------------------------------


def _quarantined(svc: Services) -> Mapping[str, tuple[str, ...]]:
    """uuid -> reasons, as the engine holds them."""
    read = getattr(svc.controller, "quarantined", None)
    if callable(read):
        return dict(read())
    # Until ControllerPort/EngineFacade grow quarantined(): read on the engine thread directly.
    call = svc.controller._call  # type: ignore[attr-defined]
    return dict(call(lambda rt: rt.engine.quarantined()))


def _quarantine_out(svc: Services, uuid: str, name: str | None) -> s.QuarantineOut:
    reasons = _quarantined(svc).get(uuid, ())
    return s.QuarantineOut(uuid=uuid, vm=name, quarantined=bool(reasons), reasons=list(reasons))


@router.get("/quarantine", response_model=list[s.QuarantineOut], summary="Quarantined VMs and why")
def get_quarantine(who: Reader, svc: Svc) -> list[s.QuarantineOut]:
    names = {vm.uuid: vm.name for vm in svc.store.list_vms()}
    held = _quarantined(svc)
    return sorted((s.QuarantineOut(uuid=u, vm=names.get(u), quarantined=True, reasons=list(r)) for u, r in held.items()),
                  key=lambda q: (q.vm or "", q.uuid))


@router.post("/vms/{vm}/quarantine", response_model=s.QuarantineOut,
             summary="Quarantine a VM by hand: only the remediation group stays reachable")
def post_quarantine(vm: str, body: s.QuarantineIn, who: Writer, svc: Svc) -> s.QuarantineOut:
    stored = find_vm(svc, vm)
    svc.store.record_event(actor=who.name, action="vm.quarantine", target=f"vm:{stored.uuid}",
                           details={"reason": body.reason})
    svc.controller.submit(QuarantineRequested(stored.uuid, body.reason, who.name))
    return _quarantine_out(svc, stored.uuid, stored.name)


@router.post("/vms/{vm}/release", response_model=s.QuarantineOut,
             summary="Release a quarantined VM (409 if it is not quarantined)")
def post_release(vm: str, who: Writer, svc: Svc) -> s.QuarantineOut:
    stored = find_vm(svc, vm)
    reasons = _quarantined(svc).get(stored.uuid)
    if not reasons:
        svc.store.record_rejection(actor=who.name, action="vm.release", target=f"vm:{stored.uuid}",
                                   why="not quarantined")
        raise Conflict(f"vm {stored.name}: not quarantined")
    svc.store.record_event(actor=who.name, action="vm.release", target=f"vm:{stored.uuid}",
                           details={"reasons": list(reasons)})
    svc.controller.submit(QuarantineReleased(stored.uuid, who.name))
    return _quarantine_out(svc, stored.uuid, stored.name)
