"""The controller port the API uses, on a real engine: explain, members, what-if, status, hits."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.engine import Engine
from controller.facade import EngineFacade
from controller.flows.pipeline import rule_cookie
from controller.policy.load import parse_policy
from controller.runtime import Runtime
from controller.scenario import load_scenario
from tests.support import logout_event

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finance-identity.yaml"


@pytest.fixture
def facade() -> EngineFacade:
    sc = load_scenario(EXAMPLE)
    return EngineFacade.local(Runtime(Engine(sc.inventory, sc.directory, sc.policy, sc.groups)))


def test_explain_and_unknown_vm(facade: EngineFacade) -> None:
    assert facade.explain("fin-desk1", "ledger-db", "tcp", 5432).allowed
    assert not facade.explain("fin-desk2", "ledger-db", "tcp", 5432).allowed
    with pytest.raises(LookupError, match="no VM named 'ghost'"):
        facade.explain("ghost", "ledger-db", "tcp", 5432)


def test_members_follow_submitted_context(facade: EngineFacade) -> None:
    names = [vm.name for vm in facade.group_members("finance-desktops") or ()]
    assert names == ["fin-desk1"]
    facade.submit(logout_event(facade.vm("fin-desk1")))
    assert facade.group_members("finance-desktops") == ()
    why = facade.membership("finance-desktops", "fin-desk1")
    assert why is not None and not why.member
    assert facade.group_members("nope") is None and facade.membership("nope", "fin-desk1") is None


def test_whatif_reports_pairs_and_flow_counts_without_changing_anything(facade: EngineFacade) -> None:
    sc = load_scenario(EXAMPLE)
    before = {s.hypervisor: s.desired_flows for s in facade.status()}
    doc_rules = [{"id": "desktops-ping-ledger", "tier": "application", "position": 20,
                  "source": {"group": "desktops"}, "destination": {"group": "ledger"}, "services": ["icmp", "tcp/22"],
                  "action": "allow"}]
    policy, groups, problems = parse_policy({"rules": doc_rules}, dict(sc.policy.groups))
    assert not problems and policy is not None
    result = facade.whatif(policy, groups)
    allowed = {(c.src, c.dst, c.service) for c in result.newly_allowed}
    denied = {(c.src, c.dst, c.service) for c in result.newly_denied}
    assert ("fin-desk2", "ledger-db", "tcp/22") in allowed
    assert ("fin-desk1", "ledger-db", "tcp/5432") in denied  # finance-to-ledger is gone in the draft
    assert {f.hypervisor: f.before for f in result.flows} == before
    assert any(f.after != f.before for f in result.flows)
    assert {s.hypervisor: s.desired_flows for s in facade.status()} == before


def test_hits_sum_rule_cookies_over_bridges_and_survive_counter_resets(facade: EngineFacade) -> None:
    ck = rule_cookie("finance-to-ledger")
    facade.hits.update(1, {ck: (10, 1000)}, now=100.0)
    facade.hits.update(2, {ck: (3, 300)}, now=100.0)
    facade.hits.update(1, {ck: (12, 1200)}, now=110.0)
    facade.hits.update(1, {ck: (1, 100)}, now=120.0)  # the flow was re-added: counters restarted
    hits = facade.rule_hits()["finance-to-ledger"]
    assert (hits.packets, hits.bytes, hits.last_hit) == (16, 1600, 120.0)
    assert facade.rule_hits()["desktops-ping-ledger"].last_hit is None


def test_status_and_health(facade: EngineFacade) -> None:
    status = {s.hypervisor: s for s in facade.status()}
    assert set(status) == {"hv1", "hv2"}
    assert all(not s.connected and s.installed_flows is None and s.desired_flows > 0 for s in status.values())
    assert facade.healthy()
