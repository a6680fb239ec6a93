"""Explain, status, health, rule hit counters, tokens and the audit log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from controller.api import convert
from controller.api import schemas as s
from controller.api.auth import ADMIN, AUDIT, READ, allow
from controller.api.deps import Services, Svc
from controller.api.errors import Unprocessable
from controller.cli_commands import explanation_json
from controller.model import normalize_ipv4
from controller.store import NotFound
from controller.store.records import Principal, Role

router = APIRouter()
Reader = Annotated[Principal, Depends(allow(*READ))]
Admin = Annotated[Principal, Depends(allow(*ADMIN))]
Auditor = Annotated[Principal, Depends(allow(*AUDIT))]


# ---- explain --------------------------------------------------------------------------------


def _explain(svc: Services, q: s.ExplainIn, where: str) -> s.ExplanationOut:
    if q.protocol in ("tcp", "udp") and not 1 <= q.port <= 65535:
        raise Unprocessable([where, "port"], f"port {q.port} out of range (1-65535) for {q.protocol}")
    if svc.controller.vm(q.src) is None:
        raise NotFound(f"src: no VM named {q.src!r}")
    if svc.controller.vm(q.dst) is None:
        try:
            normalize_ipv4(q.dst)
        except ValueError:
            raise NotFound(f"dst: {q.dst!r} is neither a VM name nor an IPv4 address") from None
    try:
        result = svc.controller.explain(q.src, q.dst, q.protocol, q.port)
    except LookupError as exc:
        raise NotFound(f"src: {exc}") from None
    return s.ExplanationOut.model_validate(explanation_json(result))


@router.get("/explain", response_model=s.ExplanationOut, tags=["explain"],
            summary="Verdict for a new connection, the deciding rule, and why")
def explain_get(
    who: Reader, svc: Svc,
    src: Annotated[str, Query(min_length=1, max_length=128, description="source VM name or uuid")],
    dst: Annotated[str, Query(min_length=1, max_length=128, description="destination VM or IPv4 address")],
    protocol: Annotated[s.Protocol, Query()],
    port: Annotated[int, Query(ge=0, le=65535)] = 0,
) -> s.ExplanationOut:
    return _explain(svc, s.ExplainIn(src=src, dst=dst, protocol=protocol, port=port), "query")


@router.post("/explain", response_model=s.ExplanationOut, tags=["explain"],
             summary="Verdict for a new connection (same as GET, with a JSON body)")
def explain_post(body: s.ExplainIn, who: Reader, svc: Svc) -> s.ExplanationOut:
    return _explain(svc, body, "body")


# ---- status, health, hits -------------------------------------------------------------------


@router.get("/status", response_model=s.StatusOut, tags=["status"], summary="Per-hypervisor bridge sync state")
def status(who: Reader, svc: Svc) -> s.StatusOut:
    bridges = [s.BridgeStatusOut(**vars(b)) for b in svc.controller.status()]
    return s.StatusOut(healthy=svc.controller.healthy(), hypervisors=bridges)


@router.get("/health", response_model=s.HealthOut, tags=["status"],
            summary="Liveness probe (no token needed)",
            responses={503: {"model": s.HealthOut, "description": "the engine is not answering"}})
def health(svc: Svc) -> s.HealthOut | JSONResponse:
    if svc.controller.healthy():
        return s.HealthOut(status="ok")
    return JSONResponse({"status": "unavailable"}, status_code=503)


@router.get("/rules/hits", response_model=list[s.RuleHitsOut], tags=["status"],
            summary="Packets and bytes per rule of the active policy")
def rule_hits(who: Reader, svc: Svc) -> list[s.RuleHitsOut]:
    hits = svc.controller.rule_hits()
    return [s.RuleHitsOut(rule_id=h.rule_id, packets=h.packets, bytes=h.bytes, last_hit=h.last_hit)
            for _, h in sorted(hits.items())]


# ---- tokens ---------------------------------------------------------------------------------


@router.post("/tokens", response_model=s.TokenOut, status_code=201, tags=["tokens"],
             summary="Create a principal and its token (the token is shown once)")
def create_token(body: s.TokenIn, who: Admin, svc: Svc) -> s.TokenOut:
    role = Role(body.role)
    if role is Role.RELAY:
        if body.hypervisor is None:
            raise Unprocessable(["body", "hypervisor"], "a relay needs the hypervisor it speaks for")
        if body.hypervisor not in {hv.name for hv in svc.store.list_hypervisors()}:
            raise Unprocessable(["body", "hypervisor"], f"unknown hypervisor {body.hypervisor!r}")
    elif body.hypervisor is not None:
        raise Unprocessable(["body", "hypervisor"], f"only relay principals have a hypervisor, not {role}")
    principal, token = svc.store.create_principal(body.name, role, body.hypervisor, actor=who.name)
    return s.TokenOut(**convert.principal_out(principal).model_dump(), token=token)


@router.get("/tokens", response_model=list[s.PrincipalOut], tags=["tokens"], summary="Principals (no secrets)")
def list_tokens(who: Admin, svc: Svc) -> list[s.PrincipalOut]:
    return [convert.principal_out(p) for p in svc.store.list_principals()]


@router.delete("/tokens/{name}", response_model=s.PrincipalOut, tags=["tokens"], summary="Revoke a principal's token")
def revoke_token(name: str, who: Admin, svc: Svc) -> s.PrincipalOut:
    return convert.principal_out(svc.store.revoke_principal(name, actor=who.name))


# ---- audit ----------------------------------------------------------------------------------


@router.get("/audit", response_model=list[s.AuditOut], tags=["audit"], summary="The audit log, newest first")
def audit(
    who: Auditor, svc: Svc,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=1 << 31)] = 0,
    actor: Annotated[str | None, Query(max_length=128)] = None,
    action: Annotated[str | None, Query(max_length=128, description="prefix, e.g. policy. or vm.create")] = None,
    target: Annotated[str | None, Query(max_length=256, description="e.g. vm:<uuid>, policy:3")] = None,
) -> list[s.AuditOut]:
    entries = svc.store.audit_log(limit=limit, offset=offset, actor=actor, action_prefix=action, target=target)
    return [convert.audit_out(e) for e in entries]
