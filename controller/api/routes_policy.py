"""Policy: the active revision, the draft, validate/what-if/publish, revert and history; groups."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from controller.api import convert
from controller.api import schemas as s
from controller.api.auth import READ, WRITE, allow
from controller.api.deps import Services, Svc
from controller.api.errors import rejected
from controller.api.routes_inventory import find_vm
from controller.events import PolicyChanged
from controller.identity.groups import GroupDef
from controller.policy.schema import Policy
from controller.policy.validate import Problem
from controller.store import NotFound
from controller.store.records import PolicyRevision, Principal, RevisionState

router = APIRouter(tags=["policy"])
Reader = Annotated[Principal, Depends(allow(*READ))]
Writer = Annotated[Principal, Depends(allow(*WRITE))]
PUBLISHED = (RevisionState.ACTIVE, RevisionState.ARCHIVED)


def _draft(svc: Services) -> PolicyRevision:
    draft = svc.store.draft()
    if draft is None:
        raise NotFound("draft: there is no draft policy (PUT /api/v1/policy/draft starts one)")
    return draft


class _Checked:
    """The check a publish or revert runs inside its write transaction, keeping what it parsed:
    the engine gets the very policy that was checked, without parsing the document again."""

    def __init__(self) -> None:
        self.parsed: tuple[Policy, dict[str, GroupDef]] | None = None

    def __call__(self, document: Mapping[str, Any]) -> list[Problem]:
        policy, groups, problems = convert.parse_document(document)
        self.parsed = (policy, groups) if policy is not None else None
        return problems


def _activated(svc: Services, revision: PolicyRevision, checked: _Checked) -> s.RevisionOut:
    policy, groups = checked.parsed if checked.parsed is not None else convert.active_policy(revision)
    svc.controller.submit(PolicyChanged(policy, groups))
    return convert.revision_out(revision)


@router.get("/policy", response_model=s.RevisionOut, summary="The active policy revision")
def get_policy(who: Reader, svc: Svc) -> s.RevisionOut:
    active = svc.store.active_revision()
    if active is None:
        raise NotFound("policy: no revision has been published")
    return convert.revision_out(active)


@router.get("/policy/draft", response_model=s.RevisionOut, summary="The draft policy")
def get_draft(who: Reader, svc: Svc) -> s.RevisionOut:
    return convert.revision_out(_draft(svc))


@router.put("/policy/draft", response_model=s.RevisionOut,
            summary="Create or replace the draft (nothing reaches a switch until publish)")
def put_draft(body: s.DraftIn, who: Writer, svc: Svc) -> s.RevisionOut:
    document = {"groups": dict(body.document.groups), "rules": list(body.document.rules)}
    return convert.revision_out(svc.store.save_draft(document, actor=who.name, comment=body.comment))


@router.delete("/policy/draft", response_model=s.RevisionOut, summary="Discard the draft")
def delete_draft(who: Writer, svc: Svc) -> s.RevisionOut:
    return convert.revision_out(svc.store.discard_draft(actor=who.name))


@router.post("/policy/draft/validate", response_model=s.ValidationOut,
             summary="Check the draft: every problem, with its location")
def validate_draft(who: Reader, svc: Svc) -> s.ValidationOut:
    problems = convert.check_document(_draft(svc).document)
    return s.ValidationOut(valid=not problems, problems=convert.problems_out(problems))


@router.post("/policy/draft/whatif", response_model=s.WhatIfOut,
             summary="What the draft would change: newly allowed/denied pairs, flow counts")
def whatif_draft(who: Reader, svc: Svc) -> s.WhatIfOut | JSONResponse:
    draft = _draft(svc)
    policy, groups, problems = convert.parse_document(draft.document)
    if policy is None:
        return rejected(problems, f"draft {draft.number} does not validate")
    result = svc.controller.whatif(policy, groups)
    pairs = lambda items: [s.PairChangeOut(src=c.src, dst=c.dst, service=c.service, before=c.before,
                                           after=c.after) for c in items]
    return s.WhatIfOut(
        newly_allowed=pairs(result.newly_allowed), newly_denied=pairs(result.newly_denied),
        flows=[s.FlowCountOut(hypervisor=f.hypervisor, before=f.before, after=f.after, change=f.after - f.before)
               for f in result.flows],
        pairs_checked=result.pairs_checked, truncated=result.truncated)


@router.post("/policy/draft/publish", response_model=s.RevisionOut,
             summary="Validate and activate the draft; the switches follow")
def publish_draft(who: Writer, svc: Svc) -> s.RevisionOut:
    checked = _Checked()
    return _activated(svc, svc.store.publish_draft(actor=who.name, check=checked), checked)


@router.post("/policy/revert", response_model=s.RevisionOut,
             summary="Activate a copy of an earlier revision (as a new revision)")
def revert(body: s.RevertIn, who: Writer, svc: Svc) -> s.RevisionOut:
    checked = _Checked()
    return _activated(svc, svc.store.revert_to(body.revision, actor=who.name, check=checked), checked)


@router.get("/policy/history", response_model=list[s.HistoryEntry],
            summary="Published revisions, newest first, each with its diff against the one before")
def history(who: Reader, svc: Svc) -> list[s.HistoryEntry]:
    published = [r for r in svc.store.history() if r.state in PUBLISHED]
    published.sort(key=lambda r: r.number, reverse=True)
    out = []
    for i, rev in enumerate(published):
        older = published[i + 1] if i + 1 < len(published) else None
        out.append(s.HistoryEntry(**convert.revision_out(rev).model_dump(), diff=convert.revision_diff(rev, older)))
    return out


@router.get("/policy/revisions/{number}", response_model=s.RevisionOut, summary="One revision, any state")
def get_revision(number: int, who: Reader, svc: Svc) -> s.RevisionOut:
    rev = svc.store.revision(number) if 0 < number <= 1 << 62 else None
    if rev is None:
        raise NotFound(f"revision {number}: no such policy revision")
    return convert.revision_out(rev)


# ---- groups ---------------------------------------------------------------------------------


@router.get("/groups", response_model=list[s.GroupOut], tags=["groups"], summary="Groups of the active policy")
def list_groups(who: Reader, svc: Svc) -> list[s.GroupOut]:
    active = svc.store.active_revision()
    groups = (active.document.get("groups") or {}) if active is not None else {}
    return [s.GroupOut(name=n, selector=str(t)) for n, t in sorted(groups.items())]


def _selector(svc: Services, name: str) -> str:
    active = svc.store.active_revision()
    groups = (active.document.get("groups") or {}) if active is not None else {}
    if name not in groups:
        raise NotFound(f"group {name}: not in the active policy")
    return str(groups[name])


@router.get("/groups/{name}", response_model=s.GroupDetail, tags=["groups"],
            summary="A group's definition and its live members")
def get_group(name: str, who: Reader, svc: Svc) -> s.GroupDetail:
    selector = _selector(svc, name)
    members = svc.controller.group_members(name)
    if members is None:
        raise NotFound(f"group {name}: not known to the engine")
    return s.GroupDetail(name=name, selector=selector,
                         members=[s.MemberOut(uuid=v.uuid, name=v.name, hypervisor=v.hypervisor) for v in members])


@router.get("/groups/{name}/members/{vm}", response_model=s.MembershipOut, tags=["groups"],
            summary="Why a VM is or is not in a group: each test, with the facts that decided it")
def get_membership(name: str, vm: str, who: Reader, svc: Svc) -> s.MembershipOut:
    _selector(svc, name)
    stored = find_vm(svc, vm)
    why = svc.controller.membership(name, stored.uuid)
    if why is None:
        raise NotFound(f"vm {vm}: not known to the engine")
    return convert.membership_out(why)
