"""Values the store hands out and takes in. Pure: no SQLAlchemy here, so the API, the engine
shell and the tests can use them without a database session."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping

from controller.model import Fact, Provenance


class Role(str, Enum):
    ADMIN = "admin"  # everything, tokens included
    OPERATOR = "operator"  # inventory and policy
    AUDITOR = "auditor"  # read only
    RELAY = "relay"  # guest context, only for VMs on its own hypervisor

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role
    hypervisor: str | None = None  # relays only: the hypervisor whose VMs they may speak for
    created_at: float = 0.0
    revoked: bool = False


class RevisionState(str, Enum):
    DRAFT = "draft"
    ACTIVE = "active"
    ARCHIVED = "archived"  # was active once
    DISCARDED = "discarded"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class PolicyRevision:
    """One version of the policy document: `{"groups": {name: selector}, "rules": [rule, ...]}`,
    rules in the scenario file's format (docs/policy.md)."""

    number: int
    state: RevisionState
    document: Mapping[str, Any]
    author: str
    created_at: float
    published_at: float | None = None
    published_by: str | None = None
    comment: str = ""
    based_on: int | None = None  # the revision a draft or revert started from


@dataclass(frozen=True)
class ContextRecord:
    """The facts one source last reported for one VM."""

    vm_uuid: str
    provenance: Provenance
    facts: frozenset[Fact]
    reported_by: str
    observed_at: float
    expires_at: float | None = None  # None: until replaced


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: float
    actor: str  # principal name, or "system"
    action: str  # e.g. "vm.create", "policy.publish", "context.authoritative", "token.create"
    target: str  # what it acted on, e.g. "vm:<uuid>", "policy:7"
    before: Mapping[str, Any] | None = None
    after: Mapping[str, Any] | None = None
    outcome: str = "ok"  # "ok" | "rejected: <why>"
    details: Mapping[str, Any] = field(default_factory=dict)
