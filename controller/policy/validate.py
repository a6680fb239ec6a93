"""Semantic checks on policy: everything a well-typed policy can still get wrong.

Checks run over `RuleDraft`s, rules whose fields may be missing because they failed to parse,
so that a file with a typo in one field still has its other faults reported in the same pass.
`validate_policy` is the entry point for policies built in code (the API); the loader uses
`validate_drafts` with the locations of the rules in the user's file.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from controller.flows.pipeline import MAX_POSITION, TIER_ORDER, rule_number
from controller.identity.groups import GroupDef
from controller.identity.selector import attrs_used, platform_constrained
from controller.model import PLATFORM_ATTRS, Port, parse_port
from controller.policy.schema import (
    Action,
    AppService,
    CidrEndpoint,
    Endpoint,
    GroupEndpoint,
    Policy,
    Rule,
    Service,
)
from controller.problems import Problem

__all__ = ["Problem", "RuleDraft", "draft_of", "trusts_group", "validate_drafts", "validate_policy"]


@dataclass(frozen=True)
class RuleDraft:
    """A rule as far as it parsed; None marks a field whose fault is already reported."""

    location: str
    id: str | None = None
    tier: str | None = None
    position: int | None = None
    source: Endpoint | None = None
    destination: Endpoint | None = None
    services: tuple[Service | None, ...] | None = None
    action: Action | None = None


def draft_of(rule: Rule, location: str) -> RuleDraft:
    return RuleDraft(
        location, rule.id, rule.tier, rule.position, rule.source, rule.destination,
        tuple(rule.services), rule.action,
    )


def validate_policy(policy: Policy, groups: Mapping[str, GroupDef], where: str = "policy") -> list[Problem]:
    """All semantic problems of `policy`, in rule order, then cross-rule problems."""
    drafts = [draft_of(rule, f"{where}.rules[{i}]") for i, rule in enumerate(policy.rules)]
    return validate_drafts(drafts, groups)


def validate_drafts(
    drafts: Sequence[RuleDraft],
    groups: Mapping[str, GroupDef],
    broken_groups: frozenset[str] = frozenset(),
) -> list[Problem]:
    """`broken_groups` exist but failed to parse: references to them are not reported again."""
    problems: list[Problem] = []
    for draft in drafts:
        problems.extend(_check_rule(draft, groups, broken_groups))
    problems.extend(_duplicate_ids(drafts))
    problems.extend(_duplicate_positions(drafts))
    problems.extend(_number_collisions(drafts))
    return problems


def trusts_group(group: GroupDef) -> bool:
    """DESIGN §5: guest context may narrow an allow but never be its only gate. A selector
    that uses no guest context at all (all(), name != 'x') does not rest on the guest."""
    uses_guest_context = bool(attrs_used(group.selector) - PLATFORM_ATTRS)
    return not uses_guest_context or platform_constrained(group.selector)


# ---- one rule ------------------------------------------------------------------------------


def _check_rule(draft: RuleDraft, groups: Mapping[str, GroupDef], broken: frozenset[str]) -> list[Problem]:
    loc = draft.location
    problems: list[Problem] = []
    if draft.id is not None and not draft.id.strip():
        problems.append(Problem(f"{loc}.id", "rule id must not be empty"))
    if draft.tier is not None and draft.tier not in TIER_ORDER:
        problems.append(Problem(f"{loc}.tier", f"unknown tier {draft.tier!r} (expected one of {', '.join(TIER_ORDER)})"))
    if draft.position is not None and not 1 <= draft.position <= MAX_POSITION:
        problems.append(Problem(f"{loc}.position", f"position {draft.position} out of range 1-{MAX_POSITION}"))
    for side in ("source", "destination"):
        endpoint = getattr(draft, side)
        problems.extend(_check_endpoint(f"{loc}.{side}", endpoint, groups, broken))
        problems.extend(_check_trust(f"{loc}.{side}", draft, endpoint, groups))
    if isinstance(draft.source, CidrEndpoint) and isinstance(draft.destination, CidrEndpoint):
        problems.append(Problem(loc, "source and destination are both CIDRs, so no VM is at either end "
                                     "and the rule could never match; use a group or any on one side"))
    problems.extend(_check_services(loc, draft))
    return problems


def _check_endpoint(
    loc: str, endpoint: Endpoint | None, groups: Mapping[str, GroupDef], broken: frozenset[str]
) -> list[Problem]:
    if isinstance(endpoint, GroupEndpoint):
        if endpoint.group not in groups and endpoint.group not in broken:
            known = ", ".join(sorted(groups)) or "none defined"
            return [Problem(f"{loc}.group", f"unknown group {endpoint.group!r} (known groups: {known})")]
    elif isinstance(endpoint, CidrEndpoint):
        return [Problem(f"{loc}.cidr", msg) for msg in _cidr_fault(endpoint.cidr)]
    return []


def _cidr_fault(cidr: str) -> list[str]:
    # The loader normalizes CIDRs; a policy built in code may not have been.
    try:
        network = ipaddress.IPv4Network(cidr, strict=False)
    except ValueError as exc:
        return [f"not an IPv4 CIDR: {exc}"]
    if str(network) != cidr:
        return [f"CIDR {cidr!r} is not in normal form (expected {str(network)!r})"]
    return []


def _check_trust(
    loc: str, draft: RuleDraft, endpoint: Endpoint | None, groups: Mapping[str, GroupDef]
) -> list[Problem]:
    if draft.action is not Action.ALLOW or not isinstance(endpoint, GroupEndpoint):
        return []
    group = groups.get(endpoint.group)
    if group is None or trusts_group(group):
        return []
    return [Problem(loc, (
        f"allow rule {draft.id!r} rests only on guest-reported context in group {group.name!r} "
        f"(selector: {group.text}); add a platform attribute such as tag.* or name to the selector"
    ))]


def _check_services(loc: str, draft: RuleDraft) -> list[Problem]:
    problems: list[Problem] = []
    for i, service in enumerate(draft.services or ()):
        where = f"{loc}.services[{i}]"
        if isinstance(service, AppService):
            problems.extend(_check_app_service(where, service, draft.destination))
        elif isinstance(service, Port):
            problems.extend(_check_port(where, service))
    return problems


def _check_app_service(loc: str, service: AppService, destination: Endpoint | None) -> list[Problem]:
    if not service.app.strip():
        return [Problem(loc, "app service needs a name, e.g. app:postgres")]
    if isinstance(destination, CidrEndpoint):
        return [Problem(loc, (
            f"{service} needs the destination's agent to report the app's ports, but destination "
            f"cidr:{destination.cidr} is an external host with no agent; list its ports instead, e.g. tcp/5432"
        ))]
    return []


def _check_port(loc: str, port: Port) -> list[Problem]:
    # Round-tripping through the parser applies exactly the rules the file format applies.
    try:
        parsed = parse_port(str(port))
    except ValueError as exc:
        return [Problem(loc, str(exc))]
    if parsed != port:
        return [Problem(loc, f"malformed service {port!r} (did you mean {parsed}?)")]
    return []


# ---- across rules --------------------------------------------------------------------------


def _duplicate_ids(drafts: Iterable[RuleDraft]) -> list[Problem]:
    first: dict[str, str] = {}
    problems: list[Problem] = []
    for draft in drafts:
        if draft.id is None:
            continue
        if draft.id in first:
            problems.append(Problem(f"{draft.location}.id", f"duplicate rule id {draft.id!r} (first used at {first[draft.id]})"))
        else:
            first[draft.id] = draft.location
    return problems


def _duplicate_positions(drafts: Iterable[RuleDraft]) -> list[Problem]:
    # Equal priorities make OpenFlow's choice between two overlapping rules undefined.
    first: dict[tuple[str, int], RuleDraft] = {}
    problems: list[Problem] = []
    for draft in drafts:
        if draft.tier is None or draft.position is None:
            continue
        key = (draft.tier, draft.position)
        other = first.setdefault(key, draft)
        if other is not draft:
            problems.append(Problem(f"{draft.location}.position", (
                f"rules {other.id!r} and {draft.id!r} both sit at position {draft.position} of tier "
                f"{draft.tier!r}; positions must be unique within a tier"
            )))
    return problems


def _number_collisions(drafts: Iterable[RuleDraft]) -> list[Problem]:
    # Cookies and conjunction ids derive from rule_number; a collision would merge two rules'
    # flows and counters in the datapath.
    first: dict[int, str] = {}
    problems: list[Problem] = []
    for draft in drafts:
        if draft.id is None:
            continue
        number = rule_number(draft.id)
        other = first.setdefault(number, draft.id)
        if other != draft.id:
            problems.append(Problem(f"{draft.location}.id", (
                f"rule ids {other!r} and {draft.id!r} hash to the same rule number {number:#010x} "
                f"(their flow cookies would collide); rename one of them"
            )))
    return problems
