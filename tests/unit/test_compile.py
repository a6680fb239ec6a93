"""The compiler's structural promises: declared pipeline, conjunctive cost, cookies, ranges."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from controller.flows.compile import World, compile_bridge, port_range_masks
from controller.flows.pipeline import (
    COOKIE_PREFIX,
    COOKIE_PREFIX_MASK,
    CookieKind,
    PipelineViolation,
    Table,
    check_flow,
    cookie,
    cookie_kind,
    rule_cookie,
)
from controller.flows.reconcile import OpKind, apply_plan, diff, plan
from controller.flows.types import Conjunction, Ct, FlowSpec, GotoTable, Match, Output
from controller.identity.groups import compute_members
from controller.model import (
    VM,
    Attr,
    Fact,
    Gateway,
    Hypervisor,
    Inventory,
    Provenance,
    VNic,
    parse_port,
)
from controller.policy.schema import Action, GroupEndpoint, Policy, Rule
from controller.scenario import load_scenario


def _vm(i: int, hv: str, tier: str) -> VM:
    nic = VNic(f"02:00:00:00:{i >> 8:02x}:{i & 0xFF:02x}", (f"10.{i >> 16}.{(i >> 8) & 0xFF}.{i & 0xFF}",), (i % 60000) + 1)
    return VM(f"u{i}", f"vm{i}", hv, (nic,), frozenset({Fact(Attr.TAG, "tier", tier, Provenance.PLATFORM)}))


def _world(m: int, n: int, services: tuple[str, ...] = ("tcp/5432",), remote_web: int = 0) -> World:
    """M web VMs and N db VMs on hv1 (the first `remote_web` web VMs on hv2), one rule web -> db."""
    vms = ([_vm(i, "hv2" if i <= remote_web else "hv1", "web") for i in range(1, m + 1)]
           + [_vm(i, "hv1", "db") for i in range(m + 1, m + n + 1)])
    hvs = {"hv1": Hypervisor("hv1", 65000), "hv2": Hypervisor("hv2", 65000)}
    inv = Inventory(hvs, {vm.uuid: vm for vm in vms}, Gateway("10.255.255.254", "02:ff:00:00:00:fe"))
    members = {"web": frozenset(vm.uuid for vm in vms[:m]), "db": frozenset(vm.uuid for vm in vms[m:])}
    rule = Rule("web-db", "application", 1, GroupEndpoint("web"), GroupEndpoint("db"),
                tuple(parse_port(s) for s in services), Action.ALLOW)
    return World(inv, members, Policy((rule,)))


def _rule_flows(world: World, hv: str = "hv1") -> list[FlowSpec]:
    return [f for f in compile_bridge(world, hv) if f.cookie == rule_cookie("web-db")]


@pytest.mark.parametrize("m,n", [(1, 1), (10, 10), (50, 20), (100, 100)])
def test_rule_cost_grows_as_m_plus_n_not_m_times_n(m: int, n: int) -> None:
    flows = _rule_flows(_world(m, n))
    # Egress: M local sources + N destination addresses + 1 service + 2 conj_id flows (new/est).
    # Every source is local, so ingress has nothing to judge: egress already did (pipeline.md).
    assert len(flows) == m + n + 1 + 2
    assert len(flows) < m * n or m * n < 10


@pytest.mark.parametrize("m,n,remote", [(1, 1, 1), (10, 10, 4), (50, 20, 50)])
def test_ingress_judges_only_sources_on_other_bridges(m: int, n: int, remote: int) -> None:
    flows = _rule_flows(_world(m, n, remote_web=remote))
    egress = [f for f in flows if f.table == Table.EGRESS_POLICY]
    ingress = [f for f in flows if f.table == Table.INGRESS_POLICY]
    local = m - remote
    # Egress: local sources + every destination address + service + 2; ingress: local
    # destinations + remote source addresses + service + 2.
    assert len(egress) == (local + n + 1 + 2 if local else 0)
    assert len(ingress) == n + remote + 1 + 2
    sources = {mf.value for f in ingress if (mf := f.match.get("ipv4_src")) is not None}
    assert len(sources) == remote
    # And on hv2 the remote sources are local: they are judged at egress there.
    assert len([f for f in _rule_flows(_world(m, n, remote_web=remote), "hv2") if f.table == Table.EGRESS_POLICY]) == remote + n + 1 + 2


def test_conjunction_clauses_carry_one_id_per_direction() -> None:
    flows = _rule_flows(_world(3, 4, remote_web=1))
    ids = {a.id for f in flows for a in f.actions if isinstance(a, Conjunction)}
    assert len(ids) == 2
    for cid in ids:
        conj_id_flows = [f for f in flows if (mf := f.match.get("conj_id")) and mf.value == cid]
        assert len(conj_id_flows) == 2  # one for new connections, one for established ones


def test_every_flow_fits_the_declared_pipeline() -> None:
    for f in compile_bridge(_world(5, 5, ("tcp/80", "udp/53", "icmp")), "hv1"):
        check_flow(f)
        assert f.cookie & COOKIE_PREFIX_MASK == COOKIE_PREFIX
        assert cookie_kind(f.cookie) is not None


def test_check_flow_rejects_what_the_pipeline_does_not_declare() -> None:
    ck = cookie(CookieKind.PIPELINE, 0)
    with pytest.raises(PipelineViolation, match="undeclared table 99"):
        check_flow(FlowSpec(99, 1, Match(), (), ck))
    with pytest.raises(PipelineViolation, match="backwards"):
        check_flow(FlowSpec(int(Table.L2_LOOKUP), 1, Match(), (GotoTable(int(Table.CLASSIFY)),), ck))
    with pytest.raises(PipelineViolation, match="undeclared register reg3"):
        check_flow(FlowSpec(0, 1, Match.of(reg3=1), (), ck))
    with pytest.raises(PipelineViolation, match="tcp_dst needs"):
        check_flow(FlowSpec(0, 1, Match.of(tcp_dst=80), (), ck))
    with pytest.raises(PipelineViolation, match="not a Goldilocks cookie"):
        check_flow(FlowSpec(0, 1, Match(), (), 0x1234))
    with pytest.raises(PipelineViolation, match="undeclared register"):
        check_flow(FlowSpec(0, 1, Match(), (Ct("reg1", table=int(Table.EGRESS_MONITOR)),), ck))


def test_each_rule_gets_its_own_cookie_under_the_prefix() -> None:
    flows = compile_bridge(_world(2, 2), "hv1")
    rule_flows = [f for f in flows if cookie_kind(f.cookie) is CookieKind.RULE]
    assert rule_flows and {f.cookie for f in rule_flows} == {rule_cookie("web-db")}
    assert all(f.origin == "rule:web-db" for f in rule_flows)


@pytest.mark.parametrize("low,high", [(1, 1), (80, 80), (1000, 1999), (1, 65535), (8000, 8080), (1023, 1025)])
def test_port_range_masks_cover_exactly_the_range(low: int, high: int) -> None:
    masks = port_range_masks(low, high)
    covered = {p for p in range(65536) if any(p & m == v for v, m in masks)}
    assert covered == set(range(low, high + 1))


def test_no_policy_flow_has_a_timeout_or_non_drop_default() -> None:
    flows = compile_bridge(_world(1, 1), "hv1")
    defaults = [f for f in flows if f.priority == 0 and not f.match.fields]
    assert {f.table for f in defaults} >= {Table.CLASSIFY, Table.L2_LOOKUP, Table.EGRESS_POLICY, Table.INGRESS_POLICY, Table.ACCEPT}
    for f in defaults:
        if f.table in (Table.EGRESS_MONITOR, Table.INGRESS_MONITOR):
            continue
        assert f.actions == (), f"table {f.table} default must drop"


def test_diff_and_plan_reach_the_desired_table() -> None:
    old = compile_bridge(_world(3, 3), "hv1")
    new = compile_bridge(_world(4, 2, ("tcp/5432", "tcp/6432")), "hv1")
    d = diff(new, old)
    ops = plan(d)
    assert apply_plan(old, ops) == new
    assert diff(new, new).empty
    kinds = [op.kind for op in ops]
    assert kinds == sorted(kinds, key=[OpKind.DELETE, OpKind.MODIFY, OpKind.ADD].index)


@pytest.mark.parametrize("example", ["finance-identity.yaml", "three-tier.yaml"])
def test_a_compiled_table_has_one_flow_per_key(example: str) -> None:
    """diff() takes an empty bridge's desired table as it is: it must not name a key twice."""
    sc = load_scenario(Path(__file__).resolve().parents[2] / "examples" / example)
    world = World(sc.inventory, compute_members(sc.groups, sc.inventory.vms.values()), sc.policy)
    for hv in sc.inventory.hypervisors:
        flows = compile_bridge(world, hv)
        assert len({f.key for f in flows}) == len(flows)


def test_diff_into_an_empty_bridge_adds_the_desired_table() -> None:
    new = compile_bridge(_world(3, 3), "hv1")
    d = diff(new, {})
    assert d.add == new and not d.modify and not d.delete
    assert apply_plan(frozenset(), plan(d)) == new


def test_plan_adds_conj_id_flow_after_its_clauses_and_deletes_it_first() -> None:
    new = compile_bridge(_world(2, 2), "hv1")
    adds = [op.flow for op in plan(diff(new, frozenset()))]
    first_conj_id = min(i for i, f in enumerate(adds) if f.match.get("conj_id"))
    last_clause = max(i for i, f in enumerate(adds) if any(isinstance(a, Conjunction) for a in f.actions))
    assert last_clause < first_conj_id
    dels = [op.flow for op in plan(diff(frozenset(), new))]
    assert dels[0].match.get("conj_id") is not None


def test_modified_flow_keeps_its_key() -> None:
    ck = cookie(CookieKind.PORT, 1)
    a = FlowSpec(int(Table.ACCEPT), 100, Match.of(reg7=1), (Output(1),), ck)
    b = FlowSpec(int(Table.ACCEPT), 100, Match.of(reg7=1), (Output(2),), ck)
    d = diff([b], [a])
    assert not d.add and not d.delete and d.modify == frozenset({(a, b)})


def test_a_flow_changing_cookie_is_re_added_not_modified() -> None:
    """OVS's strict modify keeps the old cookie (checked on OVS 3.1): re-add instead."""
    a = FlowSpec(int(Table.ACCEPT), 100, Match.of(reg7=1), (Output(1),), cookie(CookieKind.PORT, 1))
    b = FlowSpec(int(Table.ACCEPT), 100, Match.of(reg7=1), (Output(1),), cookie(CookieKind.PORT, 2))
    (op,) = plan(diff([b], [a]))
    assert op.kind is OpKind.ADD and op.flow == b
    assert apply_plan([a], [op]) == frozenset({b})


def test_a_single_dimension_verdict_with_ct_carries_the_ip_prerequisite() -> None:
    """quarantine-out (group -> any, every service) is one dimension, a port: its verdict flows
    commit to conntrack, which OVS refuses without eth_type=ip (found on real OVS)."""
    sc = load_scenario(Path(__file__).resolve().parents[2] / "examples" / "finance-identity.yaml")
    desk = sc.inventory.vm_by_name("fin-desk1")
    tagged = replace(desk, facts=desk.facts | {Fact(Attr.TAG, "quarantine", "true", Provenance.PLATFORM)})
    vms = {**sc.inventory.vms, desk.uuid: tagged}
    world = World(replace(sc.inventory, vms=vms), compute_members(sc.groups, vms.values()), sc.policy)
    flows = compile_bridge(world, desk.hypervisor)  # checks every flow
    ct_flows = [f for f in flows if f.origin == "rule:quarantine-out" and any(isinstance(a, Ct) for a in f.actions)]
    assert ct_flows and all(f.match.get("eth_type") is not None for f in ct_flows)


def test_check_flow_refuses_ct_without_the_ip_prerequisite() -> None:
    bad = FlowSpec(int(Table.EGRESS_POLICY), 100, Match.of(in_port=1), (Ct("reg6", commit=True),), cookie(CookieKind.PIPELINE, 0))
    with pytest.raises(PipelineViolation, match="eth_type"):
        check_flow(bad)
