"""Policy and groups from plain data (parsed YAML or JSON), reporting every problem at once.

Each field is parsed on its own, so one typo never hides the next fault. The structural
helpers here (`mapping_fields`, `str_field`, ...) are shared with the scenario loader.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import TypeVar

from controller.identity.groups import GroupDef
from controller.identity.selector import SelectorError, parse_selector
from controller.model import parse_port
from controller.policy.schema import (
    Action,
    AnyEndpoint,
    AppService,
    CidrEndpoint,
    Endpoint,
    GroupEndpoint,
    Policy,
    Rule,
    Service,
)
from controller.policy.validate import Problem, RuleDraft, validate_drafts

__all__ = [
    "at", "bool_field", "index", "int_field", "list_field", "mapping_fields", "parse_cidr",
    "parse_policy", "str_field",
]

T = TypeVar("T")

_POLICY_KEYS = ("rules",)
_RULE_REQUIRED = ("id", "tier", "position", "source", "destination", "action")
_RULE_OPTIONAL = ("services", "enabled", "monitor", "description")


# ---- structural helpers (shared with controller.scenario) -----------------------------------


def at(loc: str, key: str) -> str:
    return f"{loc}.{key}" if loc else key


def index(loc: str, i: int) -> str:
    return f"{loc}[{i}]"


def type_name(value: object) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "a mapping", type(None): "empty"}.get(type(value), type(value).__name__)


def mapping_fields(
    data: object, loc: str, required: tuple[str, ...], optional: tuple[str, ...], problems: list[Problem]
) -> Mapping[str, object] | None:
    """`data` as a mapping, after reporting unknown and missing keys; None if not a mapping."""
    if not isinstance(data, Mapping):
        keys = ", ".join(required + optional)
        problems.append(Problem(loc or "<top>", f"expected a mapping (with keys {keys}), got {type_name(data)}"))
        return None
    allowed = required + optional
    for key in data:
        if key not in allowed:
            problems.append(Problem(at(loc, str(key)), _unknown_key(key, allowed)))
    for key in required:
        if key not in data:
            problems.append(Problem(loc or "<top>", f"missing required key {key!r}"))
    return data


def _unknown_key(key: object, allowed: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(key), allowed, n=1) if isinstance(key, str) else []
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key {key!r} (expected one of {', '.join(sorted(allowed))}){hint}"


def str_field(value: object, loc: str, problems: list[Problem], nonempty: bool = True) -> str | None:
    if not isinstance(value, str):
        problems.append(Problem(loc, f"expected a string, got {type_name(value)} {value!r}; quote it in YAML"))
        return None
    if nonempty and not value.strip():
        problems.append(Problem(loc, "must not be empty"))
        return None
    return value


def int_field(value: object, loc: str, problems: list[Problem], low: int, high: int) -> int | None:
    # bool is an int subclass; `position: yes` must not become 1.
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(Problem(loc, f"expected a whole number, got {type_name(value)} {value!r}"))
        return None
    if not low <= value <= high:
        problems.append(Problem(loc, f"{value} out of range {low}-{high}"))
        return None
    return value


def bool_field(value: object, loc: str, problems: list[Problem]) -> bool | None:
    if not isinstance(value, bool):
        problems.append(Problem(loc, f"expected true or false, got {type_name(value)} {value!r}"))
        return None
    return value


def list_field(
    value: object, loc: str, problems: list[Problem], item: Callable[[object, str], T | None]
) -> tuple[T | None, ...] | None:
    """Parse each element with `item(element, location)`; a failed element is None."""
    if not isinstance(value, list):
        problems.append(Problem(loc, f"expected a list, got {type_name(value)} {value!r}"))
        return None
    return tuple(item(element, index(loc, i)) for i, element in enumerate(value))


def parse_cidr(value: object, loc: str, problems: list[Problem]) -> str | None:
    text = str_field(value, loc, problems)
    if text is None:
        return None
    try:
        network = ipaddress.IPv4Network(text.strip(), strict=False)
    except ValueError as exc:
        problems.append(Problem(loc, f"not an IPv4 CIDR {text!r}: {exc}"))
        return None
    try:
        ipaddress.IPv4Network(text.strip())
    except ValueError:
        # strict=False alone would silently widen a typo such as 10.0.0.1/8 into a whole /8.
        problems.append(Problem(loc, f"{text.strip()} has host bits set; did you mean {network}?"))
        return None
    return str(network)


# ---- policy ---------------------------------------------------------------------------------


def parse_policy(
    data: object, groups_data: object, where: str = "policy"
) -> tuple[Policy | None, dict[str, GroupDef], list[Problem]]:
    """Parse groups and policy; Policy is None if anything at all is wrong."""
    problems: list[Problem] = []
    groups, broken = _parse_groups(groups_data, problems)
    drafts = _parse_rules(data, where, problems)
    problems.extend(validate_drafts([d for d, _ in drafts], groups, broken))
    if problems:
        return None, groups, sorted(problems, key=_natural)
    rules = tuple(rule for _, rule in drafts if rule is not None)
    policy = Policy(
        rules=tuple(sorted(rules, key=lambda r: r.order_key)),
        groups={name: g.text for name, g in groups.items()},
    )
    return policy, groups, problems


def _natural(problem: Problem) -> tuple[object, ...]:
    # Group each rule's problems together, with rules[10] after rules[9]; sorted() is stable,
    # so within one location the discovery order (structure, then meaning) stays.
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", problem.location))


def _parse_groups(data: object, problems: list[Problem]) -> tuple[dict[str, GroupDef], frozenset[str]]:
    if data is None:
        return {}, frozenset()
    if not isinstance(data, Mapping):
        problems.append(Problem("groups", f"expected a mapping of group name to selector, got {type_name(data)}"))
        return {}, frozenset()
    groups: dict[str, GroupDef] = {}
    broken: set[str] = set()
    for name, text in data.items():
        loc = at("groups", str(name))
        if str_field(name, loc, problems) is None:
            continue
        group = _parse_group(str(name), text, loc, problems)
        if group is None:
            broken.add(str(name))
        else:
            groups[group.name] = group
    return groups, frozenset(broken)


def _parse_group(name: str, text: object, loc: str, problems: list[Problem]) -> GroupDef | None:
    if not isinstance(text, str):
        problems.append(Problem(loc, f"expected a selector string such as \"tag.tier == 'web'\", got {type_name(text)}"))
        return None
    try:
        return GroupDef(name, parse_selector(text), text)
    except SelectorError as exc:
        problems.append(Problem(loc, f"bad selector {text!r}: {exc}"))
        return None


def _parse_rules(data: object, where: str, problems: list[Problem]) -> list[tuple[RuleDraft, Rule | None]]:
    if data is None:
        return []
    fields = mapping_fields(data, where, (), _POLICY_KEYS, problems)
    if fields is None or "rules" not in fields or fields["rules"] is None:
        return []
    rules = fields["rules"]
    loc = at(where, "rules")
    if not isinstance(rules, list):
        problems.append(Problem(loc, f"expected a list of rules, got {type_name(rules)}"))
        return []
    return [_parse_rule(rule, index(loc, i), problems) for i, rule in enumerate(rules)]


def _parse_rule(data: object, loc: str, problems: list[Problem]) -> tuple[RuleDraft, Rule | None]:
    fields = mapping_fields(data, loc, _RULE_REQUIRED, _RULE_OPTIONAL, problems)
    if fields is None:
        return RuleDraft(loc), None
    before = len(problems)
    get = fields.get
    draft = RuleDraft(
        location=loc,
        id=str_field(get("id"), at(loc, "id"), problems, nonempty=False) if "id" in fields else None,
        tier=str_field(get("tier"), at(loc, "tier"), problems) if "tier" in fields else None,
        position=_parse_position(get("position"), at(loc, "position"), problems) if "position" in fields else None,
        source=_parse_endpoint(get("source"), at(loc, "source"), problems) if "source" in fields else None,
        destination=_parse_endpoint(get("destination"), at(loc, "destination"), problems) if "destination" in fields else None,
        services=_parse_services(get("services"), at(loc, "services"), problems),
        action=_parse_action(get("action"), at(loc, "action"), problems) if "action" in fields else None,
    )
    enabled = bool_field(get("enabled", True), at(loc, "enabled"), problems)
    monitor = bool_field(get("monitor", False), at(loc, "monitor"), problems)
    description = str_field(get("description", ""), at(loc, "description"), problems, nonempty=False)
    if len(problems) > before or not _complete(draft) or enabled is None or monitor is None or description is None:
        return draft, None
    rule = Rule(
        id=draft.id, tier=draft.tier, position=draft.position,  # type: ignore[arg-type]
        source=draft.source, destination=draft.destination,  # type: ignore[arg-type]
        services=tuple(s for s in draft.services or () if s is not None),
        action=draft.action, enabled=enabled, monitor=monitor, description=description,  # type: ignore[arg-type]
    )
    return draft, rule


def _complete(draft: RuleDraft) -> bool:
    required = (draft.id, draft.tier, draft.position, draft.source, draft.destination, draft.action)
    return all(v is not None for v in required) and None not in (draft.services or ())


def _parse_position(value: object, loc: str, problems: list[Problem]) -> int | None:
    # Range is a semantic check (validate), so a policy built in code gets the same message.
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(Problem(loc, f"expected a whole number, got {type_name(value)} {value!r}"))
        return None
    return value


def _parse_action(value: object, loc: str, problems: list[Problem]) -> Action | None:
    text = str_field(value, loc, problems)
    if text is None:
        return None
    try:
        return Action(text)
    except ValueError:
        problems.append(Problem(loc, f"unknown action {text!r} (expected one of {', '.join(a.value for a in Action)})"))
        return None


def _parse_endpoint(value: object, loc: str, problems: list[Problem]) -> Endpoint | None:
    if value == "any":
        return AnyEndpoint()
    if not isinstance(value, Mapping):
        problems.append(Problem(loc, f"expected any, {{group: NAME}} or {{cidr: A.B.C.D/N}}, got {type_name(value)} {value!r}"))
        return None
    fields = mapping_fields(value, loc, (), ("group", "cidr"), problems)
    if fields is None:
        return None
    kinds = [k for k in ("group", "cidr") if k in fields]
    if len(kinds) != 1:
        problems.append(Problem(loc, "give exactly one of group or cidr (or write any)"))
        return None
    if kinds == ["group"]:
        name = str_field(fields["group"], at(loc, "group"), problems)
        return None if name is None else GroupEndpoint(name)
    cidr = parse_cidr(fields["cidr"], at(loc, "cidr"), problems)
    return None if cidr is None else CidrEndpoint(cidr)


def _parse_services(value: object, loc: str, problems: list[Problem]) -> tuple[Service | None, ...] | None:
    if value is None:
        return ()
    return list_field(value, loc, problems, lambda item, where: _parse_service(item, where, problems))


def _parse_service(value: object, loc: str, problems: list[Problem]) -> Service | None:
    if not isinstance(value, str):
        problems.append(Problem(loc, f"expected a service string such as tcp/443, icmp, any or app:NAME, got {type_name(value)} {value!r}"))
        return None
    text = value.strip()
    if text.lower().startswith("app:"):
        name = text[4:].strip()
        if not name:
            problems.append(Problem(loc, "app service needs a name, e.g. app:postgres"))
            return None
        return AppService(name)
    try:
        return parse_port(text)
    except ValueError as exc:
        problems.append(Problem(loc, str(exc)))
        return None
