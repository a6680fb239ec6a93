"""Wire schemas: what the REST API accepts and returns.

Request bodies forbid unknown fields and coerce nothing (`strict=True`): a string where a
number belongs, or a misspelt key, is a 422 naming the field, never a guess.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from controller.identity.selector import Term
from controller.model import Attr, normalize_ipv4, normalize_mac, parse_port

MAX_OFPORT = 4294967040
MAX_DPID = (1 << 64) - 1
MAX_TTL = 10 * 365 * 24 * 3600


class Body(BaseModel):
    """Base of every request body."""

    model_config = ConfigDict(extra="forbid", strict=True)


# ---- field types --------------------------------------------------------------------------


def _mac(text: str) -> str:
    return normalize_mac(text)


def _ipv4(text: str) -> str:
    return normalize_ipv4(text)


def _uuid(text: str) -> str:
    try:
        return str(uuidlib.UUID(text))
    except ValueError as exc:
        raise ValueError(f"not a UUID: {text!r}") from exc


def _key(attr: Attr) -> Any:
    def check(text: str) -> str:
        Term(attr, text)  # ValueError naming the bad key
        return text
    return check


def _app_port(text: str) -> str:
    port = parse_port(text)
    if port.protocol not in ("tcp", "udp"):
        raise ValueError(f"an app listens on tcp or udp ports, not {port}")
    return str(port)


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@\-]*$"
_NAME_RE = re.compile(NAME_PATTERN[1:-1])


def _name(text: str) -> str:
    if not _NAME_RE.fullmatch(text):
        raise ValueError(f"not a valid name {text!r} (letters, digits, '_', '.', ':', '@', '-'; "
                         "starting with a letter or digit)")
    return text


Name = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_name)]
Text = Annotated[str, Field(max_length=1024)]
Mac = Annotated[str, Field(max_length=32, examples=["02:00:00:00:01:01"]), AfterValidator(_mac)]
IPv4 = Annotated[str, Field(max_length=32, examples=["10.0.0.11"]), AfterValidator(_ipv4)]
Uuid = Annotated[str, Field(max_length=64), AfterValidator(_uuid)]
TagKey = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_key(Attr.TAG))]
CheckName = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_key(Attr.POSTURE))]
AppPort = Annotated[str, Field(max_length=32, examples=["tcp/5432"]), AfterValidator(_app_port)]
OfPort = Annotated[int, Field(ge=1, le=MAX_OFPORT)]
Timestamp = Annotated[float, Field(ge=0, le=1e11, allow_inf_nan=False)]
Ttl = Annotated[int, Field(ge=1, le=MAX_TTL)]


# ---- errors -------------------------------------------------------------------------------


class ErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ProblemOut(BaseModel):
    location: str
    message: str


class ErrorOut(BaseModel):
    detail: str


class ValidationErrorOut(BaseModel):
    detail: list[ErrorItem]
    message: str
    problems: list[ProblemOut] = []


# ---- inventory ----------------------------------------------------------------------------


class HypervisorIn(Body):
    uplink_ofport: OfPort | None = None
    dpid: Annotated[int, Field(ge=0, le=MAX_DPID)] | None = None


class HypervisorOut(BaseModel):
    name: str
    uplink_ofport: int | None
    dpid: int | None


class GatewayIn(Body):
    ip: IPv4
    mac: Mac


class GatewayOut(BaseModel):
    ip: str
    mac: str


class VnicIn(Body):
    mac: Mac
    ips: Annotated[list[IPv4], Field(max_length=64)] = []
    name: Annotated[str, Field(max_length=64)] = ""
    ofport: OfPort | None = Field(None, description="normally learnt from OVSDB; set it for static setups")


class VnicOut(BaseModel):
    mac: str
    ips: list[str]
    name: str
    ofport: int | None


Tags = Annotated[dict[TagKey, Annotated[str, Field(max_length=256)]], Field(max_length=256)]


class VmReplace(Body):
    name: Name
    hypervisor: Name
    vnics: Annotated[list[VnicIn], Field(max_length=64)] = []
    tags: Tags = {}


class VmCreate(VmReplace):
    uuid: Uuid | None = Field(None, description="default: uuid5(NAMESPACE_URL, 'goldilocks:vm:' + name)")


class TagsIn(Body):
    tags: Tags


class FactOut(BaseModel):
    attr: str
    key: str
    value: str
    provenance: str
    observed_at: float


class VmOut(BaseModel):
    uuid: str
    name: str
    hypervisor: str
    vnics: list[VnicOut]
    tags: dict[str, str]


class EngineVmOut(BaseModel):
    hypervisor: str
    vnics: list[VnicOut]
    facts: list[FactOut]


class VmDetail(VmOut):
    engine: EngineVmOut | None = Field(description="the VM as the engine sees it: effective facts, where it is plugged")


# ---- context and directory ----------------------------------------------------------------


class GuestRejectionIn(Body):
    """What a relay refused to forward from a VM's channel (so the controller's audit log has it)."""

    reason: Literal["malformed", "named_vm", "replayed", "rate_limited"]
    count: Annotated[int, Field(ge=1, le=1_000_000)] = 1
    detail: Annotated[str, Field(max_length=500)] = ""


class GuestContextIn(Body):
    users: Annotated[list[Name], Field(max_length=256)] = []
    apps: Annotated[dict[Name, Annotated[list[AppPort], Field(max_length=64)]], Field(max_length=256)] = {}
    os: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    labels: Annotated[list[Name], Field(max_length=256)] = []
    posture: Annotated[dict[CheckName, Literal["pass", "fail"]], Field(max_length=64)] = {}
    observed_at: Timestamp | None = Field(None, description="epoch seconds; default: when the controller received it")
    ttl_seconds: Ttl | None = Field(None, description="the record expires this long after observed_at; default: never")


Verdict = Literal["clean", "suspicious", "malicious", "unknown"]


class AuthoritativeContextIn(Body):
    users: Annotated[list[Name], Field(max_length=256)] | None = Field(
        None, description="who the identity provider says is logged in; [] = nobody; omitted = unchanged")
    verdict: Verdict | None = Field(
        None, description="EDR verdict: clean -> posture.edr=pass; suspicious|malicious -> fail; "
                          "unknown -> no posture fact; omitted = unchanged")
    observed_at: Timestamp | None = None
    ttl_seconds: Ttl | None = None


class ContextRecordOut(BaseModel):
    provenance: str
    reported_by: str
    observed_at: float
    expires_at: float | None
    expired: bool
    facts: list[FactOut]


class VmContextOut(BaseModel):
    uuid: str
    vm: str
    records: list[ContextRecordOut]


class QuarantineIn(Body):
    reason: Annotated[str, Field(min_length=1, max_length=1024, description="why, for the audit log and explain")]


class QuarantineOut(BaseModel):
    uuid: str
    vm: str | None = Field(description="the VM's name; null if its record was deleted while quarantined")
    quarantined: bool
    reasons: list[str] = Field(description="why, in the order the triggers fired; empty once released")


class DirectoryIn(Body):
    groups: Annotated[list[Name], Field(max_length=256)]


class DirectoryUserOut(BaseModel):
    user: str
    groups: list[str]


# ---- groups -------------------------------------------------------------------------------


class GroupOut(BaseModel):
    name: str
    selector: str


class MemberOut(BaseModel):
    uuid: str
    name: str
    hypervisor: str


class GroupDetail(GroupOut):
    members: list[MemberOut]


class EvidenceOut(BaseModel):
    term: str
    satisfied: bool
    facts: list[FactOut]


class MembershipOut(BaseModel):
    group: str
    vm: str
    member: bool
    selector: str
    tests: list[EvidenceOut]


# ---- policy -------------------------------------------------------------------------------


class PolicyDocument(Body):
    groups: Annotated[dict[Annotated[str, Field(min_length=1, max_length=128)], Annotated[str, Field(max_length=4096)]],
                      Field(max_length=1000)] = {}
    rules: Annotated[list[dict[str, Any]], Field(max_length=5000)] = Field(
        [], description="rules in the format of docs/policy.md; checked on validate and publish")


class DraftIn(Body):
    document: PolicyDocument
    comment: Annotated[str, Field(max_length=1024)] = ""


class RevisionOut(BaseModel):
    number: int
    state: str
    document: dict[str, Any]
    author: str
    created_at: float
    published_at: float | None
    published_by: str | None
    comment: str
    based_on: int | None


class ChangeSet(BaseModel):
    added: list[str]
    removed: list[str]
    changed: list[str]


class RevisionDiff(BaseModel):
    against: int | None
    rules: ChangeSet
    groups: ChangeSet


class HistoryEntry(RevisionOut):
    diff: RevisionDiff


class ValidationOut(BaseModel):
    valid: bool
    problems: list[ProblemOut]


class RevertIn(Body):
    revision: Annotated[int, Field(ge=1, le=(1 << 62))]


class PairChangeOut(BaseModel):
    src: str
    dst: str
    service: str
    before: str
    after: str


class FlowCountOut(BaseModel):
    hypervisor: str
    before: int
    after: int
    change: int


class WhatIfOut(BaseModel):
    newly_allowed: list[PairChangeOut]
    newly_denied: list[PairChangeOut]
    flows: list[FlowCountOut]
    pairs_checked: int
    truncated: bool


# ---- explain, status, hits ----------------------------------------------------------------


Protocol = Literal["tcp", "udp", "icmp"]


class ExplainIn(Body):
    src: Annotated[str, Field(min_length=1, max_length=128, description="source VM name or uuid")]
    dst: Annotated[str, Field(min_length=1, max_length=128, description="destination VM name or IPv4 address")]
    protocol: Protocol
    port: Annotated[int, Field(ge=0, le=65535, description="1-65535 for tcp/udp; ignored for icmp")] = 0


class RuleRef(BaseModel):
    id: str
    tier: str
    position: int


class MembershipEvidence(BaseModel):
    group: str
    vm: str
    member: bool
    selector: str
    evidence: list[EvidenceOut]


class ExplanationOut(BaseModel):
    src: str
    dst: str
    protocol: str
    port: int
    verdict: str
    rule: RuleRef | None
    reason: str
    enforced_at: list[str]
    monitored: list[str]
    memberships: list[MembershipEvidence]


class BridgeStatusOut(BaseModel):
    hypervisor: str
    dpid: int | None
    connected: bool
    state: str
    desired_flows: int
    installed_flows: int | None
    last_error: str | None
    failures: int


class StatusOut(BaseModel):
    healthy: bool
    hypervisors: list[BridgeStatusOut]


class HealthOut(BaseModel):
    status: Literal["ok", "unavailable"]


class RuleHitsOut(BaseModel):
    rule_id: str
    packets: int
    bytes: int
    last_hit: float | None


# ---- tokens and audit ---------------------------------------------------------------------


class TokenIn(Body):
    name: Name
    role: Literal["admin", "operator", "auditor", "relay"]
    hypervisor: Name | None = Field(None, description="relays only: the hypervisor whose VMs it speaks for")


class PrincipalOut(BaseModel):
    name: str
    role: str
    hypervisor: str | None
    created_at: float
    revoked: bool


class TokenOut(PrincipalOut):
    token: str = Field(description="shown once; store it now")


class AuditOut(BaseModel):
    id: int
    at: float
    actor: str
    action: str
    target: str
    before: Any = None
    after: Any = None
    outcome: str
    details: dict[str, Any]
