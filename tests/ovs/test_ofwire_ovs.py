"""apps/ofwire against real Open vSwitch: a bundle written byte by byte by our encoder — staged
(open, adds, barrier), then committed (commit, barrier), in OpenFlow 1.4 and in 1.3 with the ONF
extension — installs exactly the desired flows (dumped back and decoded), strict modify and
delete change exactly what the plan says, and a flow the switch refuses is reported under the
xid the app maps to that flow before the staged barrier's reply; discarding the bundle then
leaves the flow table exactly as it was, which committing it would not."""

from __future__ import annotations

import itertools
import subprocess
from dataclasses import replace
from types import ModuleType
from typing import Any

import pytest
from os_ken.ofproto import ofproto_v1_3, ofproto_v1_3_parser, ofproto_v1_4, ofproto_v1_4_parser

from apps.ofcodec import decode_flow_stats
from apps.ofwire import BundleXids, encode_commit, encode_direct, encode_discard, encode_staged
from controller.flows.reconcile import FlowOp, OpKind, apply_plan, diff, plan
from controller.flows.types import FlowSpec, GotoTable, Output
from tests.ovs.harness import OvsSandbox
from tests.ovs.test_ofcodec_ovs import CASES, OpenFlowPeer, connect, desired

VERSIONS = [pytest.param((ofproto_v1_4, ofproto_v1_4_parser, "OpenFlow14"), id="of14"),
            pytest.param((ofproto_v1_3, ofproto_v1_3_parser, "OpenFlow13"), id="of13")]
BUNDLE_XIDS = itertools.count(1 << 30, 1 << 20)  # far from the peer's own xids (counted from 1)


def stage(peer: OpenFlowPeer, ops: list[FlowOp], bundle_id: int) -> tuple[BundleXids, list[Any]]:
    """Phase one, our bytes straight onto the switch's socket: open, adds, barrier; the errors
    before that barrier's reply, which are every error for an add."""
    xids = BundleXids(next(BUNDLE_XIDS), len(ops))
    for chunk in encode_staged(peer.ofproto.OFP_VERSION, bundle_id, xids, ops, chunk_ops=100):
        peer.sock.sendall(chunk)
    return xids, errors_until(peer, xids.staged())


def commit(peer: OpenFlowPeer, xids: BundleXids, bundle_id: int) -> list[Any]:
    """Phase two: commit, barrier; the errors before the barrier's reply."""
    peer.sock.sendall(encode_commit(peer.ofproto.OFP_VERSION, bundle_id, xids))
    return errors_until(peer, xids.barrier())


def errors_until(peer: OpenFlowPeer, barrier_xid: int) -> list[Any]:
    parser, errors = peer.ofproto_parser, []
    while not isinstance(msg := peer.recv(errors_fail=False), parser.OFPBarrierReply) or msg.xid != barrier_xid:
        if isinstance(msg, parser.OFPErrorMsg):
            errors.append(msg)
    return errors


def send_bundle(peer: OpenFlowPeer, ops: list[FlowOp], bundle_id: int = 1) -> tuple[BundleXids, list[Any]]:
    """Both phases, committed whatever the first one's errors (those are the caller's to judge)."""
    xids, errors = stage(peer, ops, bundle_id)
    return xids, errors + commit(peer, xids, bundle_id)


def table(ovs: OvsSandbox, bridge: str, protocol: str) -> str:
    """The bridge's whole flow table as ovs-ofctl prints it, every cookie, without counters."""
    return subprocess.run(["ovs-ofctl", "-O", protocol, "--no-stats", "dump-flows", f"unix:{ovs.dir}/{bridge}.mgmt"],
                          env=ovs.env, capture_output=True, text=True, check=True).stdout


def dumped(peer: OpenFlowPeer) -> frozenset[FlowSpec]:
    return frozenset(decode_flow_stats(entry) for entry in peer.dump_ours())


def adds(flows: frozenset[FlowSpec]) -> list[FlowOp]:
    return list(plan(diff(flows, frozenset())))


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("example,hv", CASES)
def test_a_bundle_of_our_bytes_installs_exactly_the_desired_flows(
    ovs: OvsSandbox, bridge_factory, version: tuple[ModuleType, ModuleType, str], example: str, hv: str
) -> None:
    ofp, parser, protocol = version
    dpid, flows = desired(example, hv)
    bridge = bridge_factory(dpid=dpid, protocols=protocol)
    peer = connect(ovs, bridge, ofp, parser)
    try:
        assert send_bundle(peer, adds(flows))[1] == []
        entries = peer.dump_ours()  # ovs-ofctl would speak 1.4, which this bridge may refuse
    finally:
        peer.sock.close()
    assert len(entries) == len(flows)
    assert frozenset(decode_flow_stats(e) for e in entries) == flows


@pytest.mark.parametrize("version", VERSIONS)
def test_a_one_phase_bundle_installs_and_changes_what_the_plan_says(
    ovs: OvsSandbox, bridge_factory, version: tuple[ModuleType, ModuleType, str]
) -> None:
    """Open, adds, commit and barrier in one stream: the switch applies the adds before the
    commit that follows them, so one round trip does what the two phases do."""
    ofp, parser, protocol = version
    _, flows = desired("finance-identity.yaml", "hv1")
    ordered = sorted(flows)
    after = frozenset(ordered[20:]) | {replace(f, actions=(Output(42),)) for f in ordered[:10]}
    peer = connect(ovs, bridge_factory(protocols=protocol), ofp, parser)
    try:
        for bundle_id, ops in ((1, adds(flows)), (2, list(plan(diff(after, flows))))):
            xids = BundleXids(next(BUNDLE_XIDS), len(ops))
            for chunk in encode_direct(ofp.OFP_VERSION, bundle_id, xids, ops, chunk_ops=100):
                peer.sock.sendall(chunk)
            assert errors_until(peer, xids.barrier()) == []
        assert dumped(peer) == after
    finally:
        peer.sock.close()


@pytest.mark.parametrize("version", VERSIONS)
def test_strict_modify_and_delete_do_what_the_plan_says(
    ovs: OvsSandbox, bridge_factory, version: tuple[ModuleType, ModuleType, str]
) -> None:
    ofp, parser, protocol = version
    _, flows = desired("finance-identity.yaml", "hv1")
    ordered = sorted(flows)
    changed = {replace(f, actions=(Output(42),)) for f in ordered[:10]}  # same key and cookie
    after = frozenset(ordered[20:]) | changed  # ordered[10:20] go away
    peer = connect(ovs, bridge_factory(protocols=protocol), ofp, parser)
    try:
        send_bundle(peer, adds(flows))
        ops = list(plan(diff(after, flows)))
        assert {op.kind for op in ops} == {OpKind.MODIFY, OpKind.DELETE}
        assert send_bundle(peer, ops, bundle_id=2)[1] == []
        assert dumped(peer) == after == apply_plan(flows, ops)
    finally:
        peer.sock.close()


def with_refused_add(ops: list[FlowOp], like: FlowSpec) -> tuple[list[FlowOp], FlowOp]:
    """`ops` with, in the middle, an add OVS refuses as it is added: goto_table goes forward only."""
    bad = FlowOp(OpKind.ADD, FlowSpec(30, 7, like.match, (GotoTable(10),), like.cookie))
    return ops[: len(ops) // 2] + [bad] + ops[len(ops) // 2 :], bad


@pytest.mark.parametrize("version", VERSIONS)
def test_a_refused_flow_is_reported_under_its_xid_and_ovs_commits_the_rest(
    ovs: OvsSandbox, bridge_factory, version: tuple[ModuleType, ModuleType, str]
) -> None:
    """Why a bundle is staged first: OVS refuses a bad add when it is added (its error carries
    that add's xid, before the staged barrier's reply), leaves it out of the bundle, and a commit
    then applies the others. Only a failure at commit (e.g. a full table) changes nothing."""
    ofp, parser, protocol = version
    _, flows = desired("three-tier.yaml", "hv1")
    peer = connect(ovs, bridge_factory(protocols=protocol), ofp, parser)
    try:
        first = min(flows)
        send_bundle(peer, adds(frozenset([first])))
        ops, bad = with_refused_add(adds(flows - {first}), first)
        xids, errors = stage(peer, ops, bundle_id=2)
        assert [xids.ops(ops).get(e.xid) for e in errors] == [bad]
        assert commit(peer, xids, bundle_id=2) == []
        assert dumped(peer) == flows
    finally:
        peer.sock.close()


@pytest.mark.parametrize("version", VERSIONS)
def test_a_staged_bundle_with_a_refused_add_is_discarded_and_the_table_stays_byte_identical(
    ovs: OvsSandbox, bridge_factory, version: tuple[ModuleType, ModuleType, str]
) -> None:
    """What the app does instead: a refusal seen by the staged barrier's reply gets a discard,
    and adds, strict modifies and deletes alike are gone; the same change without the refused
    add commits."""
    ofp, parser, protocol = version
    _, flows = desired("three-tier.yaml", "hv1")
    ordered = sorted(flows)
    before = frozenset(ordered[:60])
    # ordered[:10] modified (same key and cookie), ordered[10:20] deleted, ordered[60:] added
    after = frozenset(ordered[20:]) | {replace(f, actions=(Output(42),)) for f in ordered[:10]}
    change = list(plan(diff(after, before)))
    assert {op.kind for op in change} == set(OpKind)
    bridge = bridge_factory(protocols=protocol)
    peer = connect(ovs, bridge, ofp, parser)
    try:
        assert send_bundle(peer, adds(before))[1] == []
        table0 = table(ovs, bridge, protocol)
        ops, bad = with_refused_add(change, ordered[0])
        xids, errors = stage(peer, ops, bundle_id=2)
        assert [xids.ops(ops).get(e.xid) for e in errors] == [bad]
        peer.sock.sendall(encode_discard(ofp.OFP_VERSION, 2, xids))
        peer.barrier()  # fails the test on an error for the discard
        assert table(ovs, bridge, protocol) == table0
        assert dumped(peer) == before

        xids, errors = stage(peer, change, bundle_id=3)
        assert errors == []
        assert commit(peer, xids, bundle_id=3) == []
        assert dumped(peer) == after
    finally:
        peer.sock.close()
