"""The bridge-sync state machine: reconnect repairs only the difference, never flushes;
failures back off per bridge; changes in flight are not lost."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from controller.engine import Engine
from controller.events import PolicyChanged, VmTagsReplaced
from controller.flows.reconcile import OpKind, apply_plan, diff, plan
from controller.model import Attr, Fact, Provenance
from controller.runtime import (
    BundleCommitted,
    BundleFailed,
    FlowsDumped,
    RequestDump,
    Runtime,
    SendBundle,
    SwitchConnected,
    SwitchDisconnected,
    SyncState,
    Tick,
)
from controller.scenario import load_scenario
from tests.support import logout_event

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finance-identity.yaml"


def runtime() -> tuple[Runtime, dict[str, int]]:
    sc = load_scenario(EXAMPLE)
    rt = Runtime(Engine(sc.inventory, sc.directory, sc.policy, sc.groups))
    return rt, {hv: rec.dpid for hv, rec in sc.inventory.hypervisors.items()}


def connect_in_sync(rt: Runtime, dpid: int, hv: str) -> None:
    assert rt.handle(SwitchConnected(dpid), 0) == [RequestDump(dpid)]
    assert rt.handle(FlowsDumped(dpid, rt.engine.desired(hv)), 0) == []
    assert rt.bridge(hv).state is SyncState.IN_SYNC


def logout_alice(rt: Runtime) -> list:
    return rt.handle(logout_event(rt.engine.world().inventory.vm_by_name("fin-desk1")), 1)


def test_reconnect_with_nothing_changed_sends_no_flow_mod() -> None:
    rt, dp = runtime()
    connect_in_sync(rt, dp["hv1"], "hv1")
    rt.handle(SwitchDisconnected(dp["hv1"]), 1)
    connect_in_sync(rt, dp["hv1"], "hv1")
    assert rt.bridge("hv1").flow_mods_sent == 0


def test_reconnect_repairs_only_the_difference() -> None:
    rt, dp = runtime()
    desired = rt.engine.desired("hv1")
    missing = sorted(desired, key=lambda f: (f.table, f.priority))[:3]
    stale = replace(missing[0], priority=missing[0].priority + 1)  # something we no longer want
    dumped = (desired - set(missing)) | {stale}
    rt.handle(SwitchConnected(dp["hv1"]), 0)
    (cmd,) = rt.handle(FlowsDumped(dp["hv1"], frozenset(dumped)), 0)
    assert isinstance(cmd, SendBundle)
    assert {op.flow for op in cmd.ops if op.kind is OpKind.ADD} == set(missing)
    assert [op.flow for op in cmd.ops if op.kind is OpKind.DELETE] == [stale]
    assert apply_plan(dumped, cmd.ops) == desired
    assert rt.handle(BundleCommitted(dp["hv1"], cmd.bundle), 0) == []
    assert rt.bridge("hv1").state is SyncState.IN_SYNC


def test_change_goes_out_as_one_bundle_to_affected_bridges_only() -> None:
    rt, dp = runtime()
    connect_in_sync(rt, dp["hv1"], "hv1")
    connect_in_sync(rt, dp["hv2"], "hv2")
    before = {hv: rt.engine.desired(hv) for hv in ("hv1", "hv2")}
    cmds = logout_alice(rt)
    assert cmds and all(isinstance(c, SendBundle) for c in cmds)
    for c in cmds:
        hv = "hv1" if c.dpid == dp["hv1"] else "hv2"
        assert apply_plan(before[hv], c.ops) == rt.engine.desired(hv)
        assert len(c.ops) < len(before[hv]) / 3


def test_failed_bundle_backs_off_and_retries_by_dumping_other_bridges_unaffected() -> None:
    rt, dp = runtime()
    connect_in_sync(rt, dp["hv1"], "hv1")
    connect_in_sync(rt, dp["hv2"], "hv2")
    cmds = logout_alice(rt)
    failing = next(c for c in cmds if c.dpid == dp["hv1"])
    assert rt.handle(BundleFailed(dp["hv1"], failing.bundle, "table full"), 10) == []
    b = rt.bridge("hv1")
    assert b.state is SyncState.BACKOFF and b.last_error == "table full" and b.retry_at == 10.5
    for other in (c for c in cmds if c.dpid != dp["hv1"]):
        rt.handle(BundleCommitted(other.dpid, other.bundle), 10)
    assert rt.bridge("hv2").state is SyncState.IN_SYNC
    assert rt.handle(Tick(), 10.2) == []
    assert rt.handle(Tick(), 10.6) == [RequestDump(dp["hv1"])]
    # The failed bundle changed nothing on the switch: the dump shows the old flows.
    (retry,) = rt.handle(FlowsDumped(dp["hv1"], failing_before(rt, failing)), 10.7)
    assert isinstance(retry, SendBundle)
    rt.handle(BundleFailed(dp["hv1"], retry.bundle, "table full"), 11)
    assert rt.bridge("hv1").retry_at == 12.0  # doubled
    rt.handle(Tick(), 12.0)
    (again,) = rt.handle(FlowsDumped(dp["hv1"], failing_before(rt, failing)), 12.1)
    rt.handle(BundleCommitted(dp["hv1"], again.bundle), 12.2)
    assert rt.bridge("hv1").state is SyncState.IN_SYNC and rt.bridge("hv1").failures == 0


def failing_before(rt: Runtime, bundle: SendBundle) -> frozenset:
    """What the bridge held before the bundle: the desired flows with the bundle undone."""
    desired = rt.engine.desired("hv1")
    added = {op.flow for op in bundle.ops if op.kind is not OpKind.DELETE}
    removed = {op.flow for op in bundle.ops if op.kind is OpKind.DELETE}
    return frozenset((desired - added) | removed)


def bundle_in_flight(rt: Runtime, dp: dict[str, int]) -> SendBundle:
    """hv1 in sync, then alice's logout: its bundle is in flight until BundleCommitted."""
    connect_in_sync(rt, dp["hv1"], "hv1")
    (first,) = [c for c in logout_alice(rt) if c.dpid == dp["hv1"]]
    return first


def without_ping_rule() -> PolicyChanged:
    sc = load_scenario(EXAMPLE)
    rules = tuple(r for r in sc.policy.rules if r.id != "desktops-ping-ledger")
    return PolicyChanged(replace(sc.policy, rules=rules), sc.groups)


def assert_in_sync(rt: Runtime) -> None:
    b = rt.bridge("hv1")
    assert b.state is SyncState.IN_SYNC and frozenset(b.installed.values()) == rt.engine.desired("hv1")


def test_change_while_a_bundle_is_in_flight_follows_after_commit() -> None:
    rt, dp = runtime()
    connect_in_sync(rt, dp["hv2"], "hv2")
    first = bundle_in_flight(rt, dp)
    during = rt.handle(without_ping_rule(), 2)
    assert not [c for c in during if c.dpid == dp["hv1"]], "no second bundle while one is in flight"
    assert rt.bridge("hv1").queued
    (follow,) = rt.handle(BundleCommitted(dp["hv1"], first.bundle), 3)
    assert isinstance(follow, SendBundle)
    rt.handle(BundleCommitted(dp["hv1"], follow.bundle), 4)
    assert_in_sync(rt)


def test_changes_queued_in_flight_go_out_as_one_bundle_of_the_flows_they_touch() -> None:
    rt, dp = runtime()
    first = bundle_in_flight(rt, dp)
    sc = load_scenario(EXAMPLE)
    desk = rt.engine.world().inventory.vm_by_name("fin-desk1")
    server = frozenset({Fact(Attr.TAG, "role", "server", Provenance.PLATFORM)})
    for n, event in enumerate((without_ping_rule(), VmTagsReplaced(desk.uuid, server),
                               PolicyChanged(sc.policy, sc.groups))):
        assert not [c for c in rt.handle(event, 2 + n) if c.dpid == dp["hv1"]]
    installed_before = frozenset(rt.bridge("hv1").installed.values())
    (follow,) = rt.handle(BundleCommitted(dp["hv1"], first.bundle), 5)
    committed = apply_plan(installed_before, first.ops)
    # Exactly the full reconcile's plan, found from the queued steps alone.
    assert follow.ops == plan(diff(rt.engine.desired("hv1"), committed))
    rt.handle(BundleCommitted(dp["hv1"], follow.bundle), 6)
    assert_in_sync(rt)


def test_a_change_undone_while_in_flight_sends_nothing_more() -> None:
    rt, dp = runtime()
    first = bundle_in_flight(rt, dp)
    sc = load_scenario(EXAMPLE)
    rt.handle(without_ping_rule(), 2)
    rt.handle(PolicyChanged(sc.policy, sc.groups), 3)
    assert rt.bridge("hv1").queued
    assert rt.handle(BundleCommitted(dp["hv1"], first.bundle), 4) == []
    assert_in_sync(rt)


def test_unknown_switch_is_ignored_until_ovsdb_names_it() -> None:
    rt, _ = runtime()
    assert rt.handle(SwitchConnected(0xDEAD), 0) == []
    assert rt.handle(FlowsDumped(0xDEAD, frozenset()), 0) == []
