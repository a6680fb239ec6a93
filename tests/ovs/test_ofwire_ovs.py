"""apps/ofwire against real Open vSwitch: a bundle written byte by byte by our encoder — open,
adds, commit, barrier, in OpenFlow 1.4 and in 1.3 with the ONF extension — installs exactly the
desired flows (dumped back and decoded), strict modify and delete change exactly what the plan
says, and a flow the switch refuses is reported under the xid the app maps to that flow, with
the table left untouched."""

from __future__ import annotations

import itertools
from dataclasses import replace
from types import ModuleType
from typing import Any

import pytest
from os_ken.ofproto import ofproto_v1_3, ofproto_v1_3_parser, ofproto_v1_4, ofproto_v1_4_parser

from apps.ofcodec import decode_flow_stats
from apps.ofwire import BundleXids, encode_bundle
from controller.flows.reconcile import FlowOp, OpKind, apply_plan, diff, plan
from controller.flows.types import FlowSpec, GotoTable, Output
from tests.ovs.harness import OvsSandbox
from tests.ovs.test_ofcodec_ovs import CASES, OpenFlowPeer, connect, desired

VERSIONS = [pytest.param((ofproto_v1_4, ofproto_v1_4_parser, "OpenFlow14"), id="of14"),
            pytest.param((ofproto_v1_3, ofproto_v1_3_parser, "OpenFlow13"), id="of13")]
BUNDLE_XIDS = itertools.count(1 << 30, 1 << 20)  # far from the peer's own xids (counted from 1)


def send_bundle(peer: OpenFlowPeer, ops: list[FlowOp], bundle_id: int = 1) -> tuple[BundleXids, list[Any]]:
    """Our bytes straight onto the switch's socket; the errors before the final barrier reply."""
    xids = BundleXids(next(BUNDLE_XIDS), len(ops))
    for chunk in encode_bundle(peer.ofproto.OFP_VERSION, bundle_id, xids, ops, chunk_ops=100):
        peer.sock.sendall(chunk)
    parser, errors = peer.ofproto_parser, []
    while not isinstance(msg := peer.recv(errors_fail=False), parser.OFPBarrierReply) or msg.xid != xids.barrier():
        if isinstance(msg, parser.OFPErrorMsg):
            errors.append(msg)
    return xids, errors


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


@pytest.mark.parametrize("version", VERSIONS)
def test_a_refused_flow_is_reported_under_its_xid_and_ovs_commits_the_rest(
    ovs: OvsSandbox, bridge_factory, version: tuple[ModuleType, ModuleType, str]
) -> None:
    """What the app's error mapping relies on, and what an atomic bundle does not give: OVS
    refuses a bad add when it is added (its error carries that add's xid), leaves it out of the
    bundle and commits the others. Only a failure at commit (e.g. a full table) changes nothing;
    the app reports both as BundleFailed and the runtime then trusts only a fresh dump."""
    ofp, parser, protocol = version
    _, flows = desired("three-tier.yaml", "hv1")
    peer = connect(ovs, bridge_factory(protocols=protocol), ofp, parser)
    try:
        first = min(flows)
        send_bundle(peer, adds(frozenset([first])))
        backwards = FlowSpec(30, 7, first.match, (GotoTable(10),), first.cookie)  # goto goes forward only
        ops = adds(flows - {first})
        ops.insert(len(ops) // 2, FlowOp(OpKind.ADD, backwards))
        xids, errors = send_bundle(peer, ops, bundle_id=2)
        assert [xids.ops(ops).get(e.xid) for e in errors] == [FlowOp(OpKind.ADD, backwards)]
        assert dumped(peer) == flows
    finally:
        peer.sock.close()
