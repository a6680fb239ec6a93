"""Policy loading and validation: every fault reported, each at its location."""

from __future__ import annotations

import zlib
from dataclasses import replace

import pytest

from controller.flows.pipeline import rule_number
from controller.identity.groups import GroupDef
from controller.identity.selector import parse_selector
from controller.model import Port
from controller.policy.load import parse_policy
from controller.policy.schema import (
    Action,
    AnyEndpoint,
    AppService,
    CidrEndpoint,
    GroupEndpoint,
    Policy,
    Rule,
)
from controller.policy.validate import Problem, validate_policy

GROUPS = {
    "web": "tag.tier == 'web'",
    "db": "tag.tier == 'db'",
    "finance-users": "usergroup == 'finance'",
    "finance-desktops": "tag.role == 'desktop' && usergroup == 'finance'",
    "everything": "all()",
}

# Two ids whose CRC32 (rule_number) collides; found by search, checked below.
COLLIDING_IDS = ("zutdocbjiv", "xvmxlgbdlh")


def rule(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": "r1", "tier": "application", "position": 10,
        "source": {"group": "web"}, "destination": {"group": "db"},
        "services": ["tcp/5432"], "action": "allow",
    }
    base.update(overrides)
    return base


def load(*rules: dict[str, object], groups: dict[str, object] | None = None):
    return parse_policy({"rules": list(rules)}, GROUPS if groups is None else groups)


def problems_at(*rules: dict[str, object], groups: dict[str, object] | None = None) -> dict[str, str]:
    policy, _, problems = load(*rules, groups=groups)
    assert policy is None
    return {p.location: p.message for p in problems}


# ---- a good policy ---------------------------------------------------------------------------


def test_good_policy_parses_to_values() -> None:
    policy, groups, problems = load(
        rule(services=["tcp/5432", "tcp/8000-8080", "udp/53", "icmp", "any", "app:postgres"]),
        rule(id="r0", tier="emergency", position=1, source="any", destination={"cidr": "203.0.113.0/24"},
             services=[], action="deny", enabled=False, monitor=True, description="why"),
    )
    assert problems == []
    assert policy is not None
    # Kept sorted by (tier, position): emergency before application.
    assert [r.id for r in policy.rules] == ["r0", "r1"]
    r0, r1 = policy.rules
    assert r1.services == (Port("tcp", 5432, 5432), Port("tcp", 8000, 8080), Port("udp", 53, 53),
                           Port("icmp"), Port("any"), AppService("postgres"))
    assert (r1.source, r1.destination, r1.action) == (GroupEndpoint("web"), GroupEndpoint("db"), Action.ALLOW)
    assert (r1.enabled, r1.monitor) == (True, False)
    assert r0 == Rule("r0", "emergency", 1, AnyEndpoint(), CidrEndpoint("203.0.113.0/24"), (), Action.DENY,
                      enabled=False, monitor=True, description="why")
    assert policy.groups == GROUPS
    assert set(groups) == set(GROUPS) and groups["web"].text == GROUPS["web"]


def test_omitted_services_mean_any() -> None:
    data = rule()
    del data["services"]
    policy, _, problems = load(data)
    assert problems == [] and policy is not None and policy.rules[0].services == ()


@pytest.mark.parametrize("text", ["tcp/5432", "tcp/8000-8080", "udp/53", "icmp", "any"])
def test_ports_round_trip(text: str) -> None:
    policy, _, _ = load(rule(services=[text]))
    assert policy is not None
    service = policy.rules[0].services[0]
    assert str(service) == text
    again, _, _ = load(rule(services=[str(service)]))
    assert again is not None and again.rules[0].services == (service,)


@pytest.mark.parametrize(("given", "normal"), [
    ("203.0.113.0/24", "203.0.113.0/24"), ("0.0.0.0/0", "0.0.0.0/0"), ("198.51.100.7", "198.51.100.7/32"),
    ("10.0.0.0/255.0.0.0", "10.0.0.0/8"),
])
def test_cidrs_normalize_and_round_trip(given: str, normal: str) -> None:
    policy, _, problems = load(rule(destination={"cidr": given}, action="deny"))
    assert problems == [] and policy is not None
    assert policy.rules[0].destination == CidrEndpoint(normal)
    again, _, _ = load(rule(destination={"cidr": normal}, action="deny"))
    assert again is not None and again.rules[0].destination == CidrEndpoint(normal)


# ---- structural problems ---------------------------------------------------------------------


def test_unknown_key_is_reported_with_a_suggestion() -> None:
    data = rule()
    data["destinaton"] = data.pop("destination")
    found = problems_at(data)
    assert "unknown key 'destinaton'" in found["policy.rules[0].destinaton"]
    assert "did you mean 'destination'" in found["policy.rules[0].destinaton"]
    assert found["policy.rules[0]"] == "missing required key 'destination'"


def test_unknown_key_in_endpoint_and_policy() -> None:
    _, _, problems = parse_policy({"rules": [rule(source={"grop": "web"})], "rulez": []}, GROUPS)
    locations = {p.location for p in problems}
    assert {"policy.rules[0].source.grop", "policy.rulez"} <= locations


@pytest.mark.parametrize(("field", "value", "location", "fragment"), [
    ("position", "ten", "policy.rules[0].position", "whole number"),
    ("position", True, "policy.rules[0].position", "whole number"),
    ("position", 0, "policy.rules[0].position", "out of range 1-9000"),
    ("position", 9001, "policy.rules[0].position", "out of range 1-9000"),
    ("tier", "apps", "policy.rules[0].tier", "unknown tier 'apps'"),
    ("action", "permit", "policy.rules[0].action", "unknown action 'permit'"),
    ("enabled", "yes", "policy.rules[0].enabled", "true or false"),
    ("monitor", 1, "policy.rules[0].monitor", "true or false"),
    ("id", 7, "policy.rules[0].id", "expected a string"),
    ("id", "", "policy.rules[0].id", "must not be empty"),
    ("source", "anything", "policy.rules[0].source", "expected any"),
    ("source", {"group": "web", "cidr": "10.0.0.0/8"}, "policy.rules[0].source", "exactly one"),
    ("destination", {"cidr": "10.0.0.1/8"}, "policy.rules[0].destination.cidr",
     "has host bits set; did you mean 10.0.0.0/8?"),
    ("destination", {"cidr": "10.0.0.0/33"}, "policy.rules[0].destination.cidr", "not an IPv4 CIDR"),
    ("services", "tcp/22", "policy.rules[0].services", "expected a list"),
])
def test_field_problems(field: str, value: object, location: str, fragment: str) -> None:
    found = problems_at(rule(**{"action": "deny", field: value}))
    assert fragment in found[location], found


@pytest.mark.parametrize(("service", "fragment"), [
    ("tcp/70000", "port 70000 out of range"),
    ("ftp/21", "unknown protocol 'ftp'"),
    ("tcp", "tcp needs a port"),
    ("tcp/90-80", "reversed"),
    ("icmp/8", "icmp takes no port"),
    (443, "expected a service string"),
    ("app:", "app service needs a name"),
])
def test_service_problems(service: object, fragment: str) -> None:
    found = problems_at(rule(services=["tcp/22", service]))
    assert fragment in found["policy.rules[0].services[1]"], found


def test_missing_required_keys_are_each_reported() -> None:
    _, _, problems = parse_policy({"rules": [{"id": "x"}]}, {})
    missing = {p.message for p in problems if p.location == "policy.rules[0]"}
    assert missing == {f"missing required key {k!r}" for k in ("tier", "position", "source", "destination", "action")}


def test_rules_must_be_a_list_of_mappings() -> None:
    _, _, problems = parse_policy({"rules": {"id": "x"}}, {})
    assert [p.location for p in problems] == ["policy.rules"]
    _, _, problems = parse_policy({"rules": ["x"]}, {})
    assert [p.location for p in problems] == ["policy.rules[0]"]


def test_where_prefixes_locations() -> None:
    _, _, problems = parse_policy({"rules": [rule(tier="nope")]}, GROUPS, where="spec")
    assert [p.location for p in problems] == ["spec.rules[0].tier"]


# ---- groups ----------------------------------------------------------------------------------


def test_selector_syntax_error_names_group_and_column() -> None:
    _, groups, problems = parse_policy({"rules": []}, {"ok": "tag.a == 'b'", "broken": "tag.tier == "})
    assert [p.location for p in problems] == ["groups.broken"]
    assert "column 13" in problems[0].message and "tag.tier == " in problems[0].message
    assert set(groups) == {"ok"}


def test_group_must_be_a_string() -> None:
    _, _, problems = parse_policy(None, {"g": ["tag.a == 'b'"]})
    assert [p.location for p in problems] == ["groups.g"]


def test_rule_on_a_broken_group_is_not_also_called_unknown() -> None:
    _, _, problems = parse_policy({"rules": [rule(destination={"group": "broken"})]}, {**GROUPS, "broken": "tag.("})
    assert [p.location for p in problems] == ["groups.broken"]


def test_unknown_group() -> None:
    found = problems_at(rule(source={"group": "wbe"}))
    assert "unknown group 'wbe'" in found["policy.rules[0].source.group"]


# ---- cross-rule problems ---------------------------------------------------------------------


def test_duplicate_rule_id() -> None:
    found = problems_at(rule(), rule(position=20))
    assert found["policy.rules[1].id"] == "duplicate rule id 'r1' (first used at policy.rules[0])"


def test_same_tier_and_position_names_both_rules() -> None:
    found = problems_at(rule(id="a"), rule(id="b"))
    message = found["policy.rules[1].position"]
    assert "'a'" in message and "'b'" in message and "position 10" in message


def test_same_position_in_different_tiers_is_fine() -> None:
    policy, _, problems = load(rule(id="a"), rule(id="b", tier="infrastructure"))
    assert problems == [] and policy is not None


def test_rule_number_collision_asks_for_a_rename() -> None:
    a, b = COLLIDING_IDS
    assert rule_number(a) == rule_number(b) == zlib.crc32(a.encode())
    found = problems_at(rule(id=a), rule(id=b, position=20))
    message = found["policy.rules[1].id"]
    assert a in message and b in message and "rename" in message


# ---- the trust rule --------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["source", "destination"])
@pytest.mark.parametrize("enabled, monitor", [(True, False), (False, False), (True, True)])
def test_allow_on_guest_only_group_is_refused(side: str, enabled: bool, monitor: bool) -> None:
    found = problems_at(rule(**{side: {"group": "finance-users"}}, enabled=enabled, monitor=monitor))
    message = found[f"policy.rules[0].{side}"]
    assert "rests only on guest-reported context" in message
    assert "'finance-users'" in message and "usergroup == 'finance'" in message
    assert "tag.*" in message


@pytest.mark.parametrize("group", ["finance-desktops", "web", "everything"])
def test_allow_on_platform_constrained_or_context_free_group_is_accepted(group: str) -> None:
    policy, _, problems = load(rule(source={"group": group}))
    assert problems == [] and policy is not None


@pytest.mark.parametrize("action", ["deny", "reject"])
def test_deny_and_reject_may_use_guest_context_alone(action: str) -> None:
    policy, _, problems = load(rule(source={"group": "finance-users"}, action=action))
    assert problems == [] and policy is not None


@pytest.mark.parametrize("selector", [
    "tag.role == 'desktop' || usergroup == 'finance'",  # one branch escapes the platform
    "tag.role != 'desktop' && usergroup == 'finance'",  # a negation constrains nothing
    "!has(user)",
])
def test_trust_rule_sees_through_or_and_negation(selector: str) -> None:
    found = problems_at(rule(source={"group": "g"}), groups={**GROUPS, "g": selector})
    assert "guest-reported" in found["policy.rules[0].source"]


# ---- app services ----------------------------------------------------------------------------


def test_app_service_to_cidr_is_refused() -> None:
    found = problems_at(rule(destination={"cidr": "203.0.113.0/24"}, services=["tcp/80", "app:nginx"], action="deny"))
    assert "no agent" in found["policy.rules[0].services[1]"]


@pytest.mark.parametrize("destination", ["any", {"group": "db"}])
def test_app_service_to_group_or_any_is_fine(destination: object) -> None:
    policy, _, problems = load(rule(destination=destination, services=["app:postgres"], action="deny"))
    assert problems == [] and policy is not None


def test_cidr_to_cidr_is_refused() -> None:
    found = problems_at(rule(source={"cidr": "10.0.0.0/8"}, destination={"cidr": "192.0.2.0/24"}, action="deny"))
    assert "both CIDRs" in found["policy.rules[0]"]


# ---- everything at once, and validate_policy on its own ---------------------------------------


def test_all_problems_reported_together_in_rule_order() -> None:
    rules = [
        rule(id="a", tier="nope"),
        rule(id="b", position=20, services=["tcp/0"]),
        rule(id="c", position=30, source={"group": "finance-users"}),
        rule(id="a", position=40, destination={"group": "ghost"}),
    ]
    _, _, problems = load(*rules)
    assert [p.location for p in problems] == [
        "policy.rules[0].tier", "policy.rules[1].services[0]", "policy.rules[2].source",
        "policy.rules[3].destination.group", "policy.rules[3].id",
    ]
    assert problems == sorted(problems, key=lambda p: p.location)  # deterministic


def test_problem_str() -> None:
    assert str(Problem("policy.rules[2].services[1]", "bad")) == "policy.rules[2].services[1]: bad"


def test_validate_policy_checks_policies_built_in_code() -> None:
    groups = {name: GroupDef(name, parse_selector(text), text) for name, text in GROUPS.items()}
    bad = Rule("x", "application", 10, GroupEndpoint("finance-users"), CidrEndpoint("10.0.0.1/8"),
               (Port("tcp", 0, 0), AppService("pg")), Action.ALLOW)
    problems = validate_policy(Policy(rules=(bad,)), groups)
    assert {p.location for p in problems} == {
        "policy.rules[0].source", "policy.rules[0].destination.cidr",
        "policy.rules[0].services[0]", "policy.rules[0].services[1]",
    }
    good = replace(bad, source=AnyEndpoint(), destination=GroupEndpoint("db"), services=(Port("tcp", 1, 2),))
    assert validate_policy(Policy(rules=(good,)), groups) == []
