"""apps/ofwire: our bundle bytes are os-ken's bytes, message for message — every compiled flow of
both examples, every op kind, OpenFlow 1.4 and 1.3 (ONF bundles) — and a whole bundle, staged
then committed or discarded, is a stream of those messages with the xids the app maps replies by."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import os_ken.base.app_manager  # noqa: F401  (imports os_ken.controller.controller cycle-free)
import pytest
from os_ken.controller.controller import Datapath as OsKenDatapath
from os_ken.ofproto import (
    ofproto_common,
    ofproto_v1_3,
    ofproto_v1_3_parser,
    ofproto_v1_4,
    ofproto_v1_4_parser,
)

from apps import ofwire
from apps.ofcodec import decode_flow_stats, flow_mod
from apps.ofwire import (
    MAX_XID,
    BundleEncoder,
    BundleXids,
    encode_commit,
    encode_direct,
    encode_discard,
    encode_staged,
    flow_shape,
    reserve_xids,
)
from controller.flows.pipeline import COOKIE_PREFIX
from controller.flows.reconcile import FlowOp, OpKind
from controller.flows.types import (
    CT_EST,
    CT_TRK,
    ETH_TYPE_IP,
    Conjunction,
    Ct,
    FlowSpec,
    GotoTable,
    Match,
    Output,
    SetField,
)
from tests.unit.test_ofcodec import Datapath, example_flows, stats_entry_bytes

OF14, OF13 = (ofproto_v1_4, ofproto_v1_4_parser), (ofproto_v1_3, ofproto_v1_3_parser)
VERSIONS = [pytest.param(OF14, id="of14"), pytest.param(OF13, id="of13")]
BUNDLE_ID, FLAGS, XID = 0x1234_5678, 3, 0xDEAD_BEEF  # FLAGS: atomic | ordered, in 1.4 and ONF

MASKED = FlowSpec(  # every kind of mask, NXM fields and OpenFlow basic ones mixed
    12, 500,
    Match.of(eth_type=ETH_TYPE_IP, ip_proto=6, ipv4_src="10.1.0.0/16", tcp_dst=(0x400, 0xFC00),
             ct_state=(CT_TRK | CT_EST, 0x3F), ct_mark=(1, 1), reg7=(4, 0xFF),
             eth_dst=("01:00:00:00:00:00", "01:00:00:00:00:00")),
    (SetField("reg6", 3), SetField("eth_src", 0x020000000001), GotoTable(20)),
    COOKIE_PREFIX | 1 << 40,
)


def osken_bytes(msg: Any, xid: int) -> bytes:
    msg.set_xid(xid)
    msg.serialize()
    return bytes(msg.buf)


def osken_add(version: tuple[ModuleType, ModuleType], op: FlowOp, xid: int) -> bytes:
    ofp, parser = version
    dp = Datapath(ofp, parser)
    add = parser.OFPBundleAddMsg if ofp is ofproto_v1_4 else parser.ONFBundleAddMsg
    return osken_bytes(add(dp, BUNDLE_ID, FLAGS, flow_mod(ofp, parser, dp, op), []), xid)


def osken_ctrl(version: tuple[ModuleType, ModuleType], what: str, xid: int) -> bytes:
    ofp, parser = version
    dp = Datapath(ofp, parser)
    if ofp is ofproto_v1_4:
        msg = parser.OFPBundleCtrlMsg(dp, BUNDLE_ID, getattr(ofp, f"OFPBCT_{what}_REQUEST"), FLAGS, [])
    else:
        msg = parser.ONFBundleCtrlMsg(dp, BUNDLE_ID, getattr(ofp, f"ONF_BCT_{what}_REQUEST"), FLAGS, [])
    return osken_bytes(msg, xid)


def ops_of(flows: tuple[FlowSpec, ...]) -> list[FlowOp]:
    return [FlowOp(kind, f) for f in flows for kind in OpKind]


# ---- byte equality with os-ken ----------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_every_compiled_flow_and_op_kind_encodes_to_os_kens_bytes(version: tuple[ModuleType, ModuleType]) -> None:
    ofwire.clear_caches()
    enc = BundleEncoder(version[0].OFP_VERSION, BUNDLE_ID)
    ops = ops_of(example_flows() + (MASKED,))
    assert len(ops) > 450
    mismatched = [op for op in ops if enc.add(XID, op) != osken_add(version, op, XID)]
    assert mismatched == []
    # and again from the cache, which must not be keyed on anything but (kind, flow)
    assert [op for op in ops if enc.add(7, op) != osken_add(version, op, 7)] == []


@pytest.mark.parametrize("version", VERSIONS)
def test_bundle_control_and_barrier_are_os_kens_bytes(version: tuple[ModuleType, ModuleType]) -> None:
    ofp, parser = version
    enc = BundleEncoder(ofp.OFP_VERSION, BUNDLE_ID)
    assert enc.open(XID) == osken_ctrl(version, "OPEN", XID)
    assert enc.commit(XID) == osken_ctrl(version, "COMMIT", XID)
    assert enc.discard(XID) == osken_ctrl(version, "DISCARD", XID)
    assert enc.barrier(XID) == osken_bytes(parser.OFPBarrierRequest(Datapath(ofp, parser)), XID)


def test_an_add_carries_a_flow_os_ken_decodes_back_to_the_spec() -> None:
    """Beyond bytes: the flow mod inside our bundle add, read as a switch's flow stats entry,
    is the FlowSpec it was made from."""
    ofp = ofproto_v1_4
    for flow in example_flows() + (MASKED,):
        inner = BundleEncoder(ofp.OFP_VERSION, 1).add(1, FlowOp(OpKind.ADD, flow))[16:]
        entry = stats_entry_bytes(ofp, inner, flow.table, flow.priority, flow.cookie)
        assert decode_flow_stats(ofproto_v1_4_parser.OFPFlowStats.parser(entry, 0)) == flow


def test_goto_table_must_be_last_and_other_versions_have_no_bundles() -> None:
    bad = FlowSpec(0, 1, Match(), (GotoTable(20), Output(1)), COOKIE_PREFIX)
    with pytest.raises(ValueError):
        BundleEncoder(ofproto_v1_4.OFP_VERSION, 1).add(1, FlowOp(OpKind.ADD, bad))
    with pytest.raises(ValueError):
        BundleEncoder(0x01, 1)


# ---- whole bundles ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    type: int
    xid: int
    body: bytes  # after ofp_header and, in OF1.3, the ONF experimenter id and type
    exp_type: int | None = None


def split_stream(data: bytes) -> list[Message]:
    """Cut a byte stream into OpenFlow messages by their headers, as the switch reads it (os-ken
    has no parsers for controller-to-switch messages; their bytes are checked above)."""
    out, offset = [], 0
    while offset < len(data):
        version, msg_type, length, xid = struct.unpack_from("!BBHI", data, offset)
        body = data[offset + 8 : offset + length]
        if version == ofproto_v1_3.OFP_VERSION and msg_type == ofproto_v1_3.OFPT_EXPERIMENTER:
            experimenter, exp_type = struct.unpack_from("!II", body)
            assert experimenter == ofproto_common.ONF_EXPERIMENTER_ID
            out.append(Message(msg_type, xid, body[8:], exp_type))
        else:
            out.append(Message(msg_type, xid, body))
        offset += length
    assert offset == len(data)
    return out


def control_kinds(ofp: ModuleType, msgs: list[Message]) -> list[int]:
    """The bundle-control type of each message, after checking its bundle id and flags."""
    controls = [struct.unpack("!IHH", m.body) for m in msgs]
    assert [(bundle_id, flags) for bundle_id, _, flags in controls] == [(BUNDLE_ID, FLAGS)] * len(msgs)
    wire = ofp.OFPT_BUNDLE_CONTROL if ofp is ofproto_v1_4 else ofp.OFPT_EXPERIMENTER
    assert {m.type for m in msgs} == {wire}
    return [kind for _, kind, _ in controls]


def request(ofp: ModuleType, what: str) -> int:
    return getattr(ofp, f"OFPBCT_{what}_REQUEST" if ofp is ofproto_v1_4 else f"ONF_BCT_{what}_REQUEST")


@pytest.mark.parametrize("version", VERSIONS)
def test_a_bundle_is_staged_then_committed_with_one_block_of_consecutive_xids(
    version: tuple[ModuleType, ModuleType],
) -> None:
    """Staged: open, the adds, a barrier (in chunks); then commit and the final barrier. Every
    xid of the block in order, so the app knows what each reply answers."""
    ofp = version[0]
    ops = ops_of(example_flows()[:40])
    xids = BundleXids(MAX_XID - 5, len(ops))  # the block wraps past 2**32 - 1 to 0
    chunks = list(encode_staged(ofp.OFP_VERSION, BUNDLE_ID, xids, ops, chunk_ops=16))
    assert len(chunks) == -(-(len(ops) + 1) // 16)  # open + 16-op chunks, the barrier in the last
    staged = split_stream(b"".join(chunks))
    msgs = staged + split_stream(encode_commit(ofp.OFP_VERSION, BUNDLE_ID, xids))
    assert [m.xid for m in msgs] == [(MAX_XID - 5 + i) & MAX_XID for i in range(BundleXids.count(len(ops)))]
    assert xids.ops(ops) == {m.xid: op for m, op in zip(msgs[1:], ops)}
    assert [m.xid for m in msgs[-3:]] == [xids.staged(), xids.commit(), xids.barrier()]
    enc = BundleEncoder(ofp.OFP_VERSION, BUNDLE_ID)
    for m, op in zip(msgs[1:-3], ops):
        bundle_id, flags = struct.unpack_from("!I2xH", m.body)
        inner_xid = struct.unpack_from("!I", m.body, 12)[0]
        assert (bundle_id, flags, inner_xid) == (BUNDLE_ID, FLAGS, m.xid)
        assert enc.add(m.xid, op).endswith(m.body)
    for barrier in (msgs[-3], msgs[-1]):
        assert (barrier.type, barrier.body) == (ofp.OFPT_BARRIER_REQUEST, b"")
    if ofp is ofproto_v1_4:
        assert [m.type for m in msgs[1:-3]] == [ofp.OFPT_BUNDLE_ADD_MESSAGE] * len(ops)
    else:
        assert [m.exp_type for m in msgs[1:-3]] == [ofp.ONF_ET_BUNDLE_ADD_MESSAGE] * len(ops)
    assert control_kinds(ofp, [msgs[0], msgs[-2]]) == [request(ofp, "OPEN"), request(ofp, "COMMIT")]


@pytest.mark.parametrize("version", VERSIONS)
def test_a_one_phase_bundle_is_the_staged_one_with_the_commit_instead_of_the_staged_barrier(
    version: tuple[ModuleType, ModuleType],
) -> None:
    ofp = version[0]
    ops = ops_of(example_flows()[:40])
    xids = BundleXids(MAX_XID - 5, len(ops))
    staged = split_stream(b"".join(encode_staged(ofp.OFP_VERSION, BUNDLE_ID, xids, ops, chunk_ops=16)))
    direct = split_stream(b"".join(encode_direct(ofp.OFP_VERSION, BUNDLE_ID, xids, ops, chunk_ops=16)))
    committed = split_stream(encode_commit(ofp.OFP_VERSION, BUNDLE_ID, xids))
    assert direct == staged[:-1] + committed
    assert xids.staged() not in {m.xid for m in direct}


CLAUSE = FlowSpec(12, 21900, Match.of(in_port=65), (Conjunction(7, 1, 3),), COOKIE_PREFIX | 5)
VERDICT = FlowSpec(12, 21900, Match.of(conj_id=7, eth_type=ETH_TYPE_IP, ct_state=(CT_TRK | CT_EST, CT_TRK | CT_EST)),
                   (Ct("reg6", commit=True), GotoTable(20)), COOKIE_PREFIX | 5)


def test_a_flows_shape_leaves_out_addresses_ports_and_ids_but_not_its_form() -> None:
    """What OVS checks when it parses a flow mod is in the shape; which VM, port or rule a flow
    is for is not, so a new member's flows have the shape of the members' before it."""
    same = [
        replace(CLAUSE, match=Match.of(in_port=1905), actions=(Conjunction(9, 1, 3),), cookie=COOKIE_PREFIX | 9),
        replace(CLAUSE, priority=100),
        replace(VERDICT, match=Match.of(conj_id=8, eth_type=ETH_TYPE_IP, ct_state=(CT_TRK, CT_TRK | CT_EST))),
    ]
    assert [flow_shape(f) for f in same] == [flow_shape(CLAUSE), flow_shape(CLAUSE), flow_shape(VERDICT)]
    different = [
        replace(CLAUSE, table=32),
        replace(CLAUSE, match=Match.of(eth_type=ETH_TYPE_IP, ipv4_dst="10.0.0.1")),
        replace(CLAUSE, match=Match.of(eth_type=ETH_TYPE_IP, ipv4_dst="10.0.0.0/24")),
        replace(CLAUSE, actions=(Conjunction(7, 2, 3),)),
        replace(CLAUSE, actions=()),
        replace(VERDICT, match=Match.of(conj_id=7, eth_type=0x0806, ct_state=(CT_TRK, CT_TRK))),
        replace(VERDICT, actions=(Ct("reg6", commit=True, set_mark=1), GotoTable(20))),
        replace(VERDICT, actions=(Ct("reg6"), GotoTable(20))),
        replace(VERDICT, actions=(Output(3),)),
        replace(VERDICT, actions=(Output(ofproto_v1_4.OFPP_CONTROLLER),)),
    ]
    shapes = {flow_shape(f) for f in [CLAUSE, VERDICT, *different]}
    assert len(shapes) == 2 + len(different)


@pytest.mark.parametrize("version", VERSIONS)
def test_a_refused_bundle_is_discarded_under_the_commits_xid(version: tuple[ModuleType, ModuleType]) -> None:
    """Instead of commit and barrier, one discard: it takes the commit's xid (the commit is then
    never sent) and nothing after it, so the block stays one block either way."""
    ofp = version[0]
    xids = BundleXids(77, 3)
    (discard,) = split_stream(encode_discard(ofp.OFP_VERSION, BUNDLE_ID, xids))
    assert discard.xid == xids.discard() == xids.commit() == 77 + 1 + 3 + 1
    assert control_kinds(ofp, [discard]) == [request(ofp, "DISCARD")]


def test_xids_are_reserved_from_os_kens_own_counter() -> None:
    """A block of xids taken from a real os-ken Datapath: its next set_xid comes after it."""
    server = socket.create_server(("127.0.0.1", 0))
    with server, socket.create_connection(server.getsockname()) as sock, server.accept()[0]:
        dp = OsKenDatapath(sock, ("127.0.0.1", 0))
        dp.set_version(ofproto_v1_4.OFP_VERSION)
        dp.xid = MAX_XID - 1
        xids = reserve_xids(dp, 2)
        barrier = ofproto_v1_4_parser.OFPBarrierRequest(dp)
        dp.set_xid(barrier)
    assert (xids.first, xids.n_ops) == (MAX_XID, 2)
    assert barrier.xid == 5  # MAX_XID and 0..4 are the bundle's: open, 2 adds, barrier, commit, barrier


def test_the_body_cache_is_bounded() -> None:
    cache = ofwire._BODIES[OpKind.ADD]
    saved = cache.size
    try:
        ofwire.clear_caches()
        cache.size = 10
        enc = BundleEncoder(ofproto_v1_4.OFP_VERSION, 1)
        for flow in example_flows()[:25]:
            enc.add(1, FlowOp(OpKind.ADD, flow))
        assert 0 < len(cache) <= 10
    finally:
        cache.size = saved
        ofwire.clear_caches()
