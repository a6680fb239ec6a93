"""Policy values: tiers of ordered rules between groups, `any` and external CIDRs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Union

from controller.flows.pipeline import TIER_ORDER
from controller.model import Port


class Action(str, Enum):
    ALLOW = "allow"
    DENY = "deny"
    REJECT = "reject"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, order=True)
class AnyEndpoint:
    def __str__(self) -> str:
        return "any"


@dataclass(frozen=True, order=True)
class GroupEndpoint:
    group: str

    def __str__(self) -> str:
        return f"group:{self.group}"


@dataclass(frozen=True, order=True)
class CidrEndpoint:
    cidr: str  # normalized, e.g. "203.0.113.0/24"

    def __str__(self) -> str:
        return f"cidr:{self.cidr}"


Endpoint = Union[AnyEndpoint, GroupEndpoint, CidrEndpoint]


@dataclass(frozen=True, order=True)
class AppService:
    """The ports the named app listens on at the destination VM, as its agent reports them."""

    app: str

    def __str__(self) -> str:
        return f"app:{self.app}"


Service = Union[Port, AppService]


@dataclass(frozen=True)
class Rule:
    id: str
    tier: str  # one of TIER_ORDER
    position: int  # order within the tier, lower first
    source: Endpoint
    destination: Endpoint
    services: tuple[Service, ...]  # empty = any service
    action: Action
    enabled: bool = True
    monitor: bool = False  # count what it would do; enforce nothing
    description: str = ""

    @property
    def order_key(self) -> tuple[int, int]:
        return (TIER_ORDER.index(self.tier), self.position)

    @property
    def enforced(self) -> bool:
        return self.enabled and not self.monitor


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...] = ()  # kept sorted by (tier, position)
    groups: Mapping[str, str] = field(default_factory=dict)  # name -> selector text

    def ordered(self) -> tuple[Rule, ...]:
        return tuple(sorted(self.rules, key=lambda r: r.order_key))

    def rule(self, rule_id: str) -> Rule | None:
        return next((r for r in self.rules if r.id == rule_id), None)
