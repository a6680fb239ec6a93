"""apps/ofcodec: every compiled flow survives FlowSpec -> OFPFlowMod bytes -> OFPFlowStats bytes
-> FlowSpec unchanged, in OpenFlow 1.4 and 1.3; the forms OVS returns decode to what we wrote;
what Goldilocks never writes is refused."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from os_ken.ofproto import (
    nicira_ext,
    ofproto_v1_3,
    ofproto_v1_3_parser,
    ofproto_v1_4,
    ofproto_v1_4_parser,
)

from apps.ofcodec import (
    DecodeError,
    decode_action,
    decode_flow_stats,
    decode_instructions,
    decode_match,
    encode_action,
    encode_instructions,
    encode_match,
    flow_mod,
    flow_stats_request,
)
from controller.engine import Engine
from controller.flows.pipeline import COOKIE_PREFIX, COOKIE_PREFIX_MASK
from controller.flows.reconcile import FlowOp, OpKind
from controller.flows.render import render_flow
from controller.flows.types import (
    CT_EST,
    CT_TRK,
    ETH_TYPE_IP,
    Conjunction,
    Ct,
    FlowSpec,
    GotoTable,
    Match,
    MatchField,
    Move,
    Output,
    OutputInPort,
    SetField,
)
from controller.scenario import load_scenario

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
VERSIONS = [
    pytest.param((ofproto_v1_4, ofproto_v1_4_parser), id="of14"),
    pytest.param((ofproto_v1_3, ofproto_v1_3_parser), id="of13"),
]
OF14, P14 = ofproto_v1_4, ofproto_v1_4_parser


@dataclass(frozen=True)
class Datapath:
    """What os-ken's serializers read from a datapath: the two protocol modules."""

    ofproto: ModuleType
    ofproto_parser: ModuleType


@cache
def example_flows() -> tuple[FlowSpec, ...]:
    flows: set[FlowSpec] = set()
    for name in ("three-tier.yaml", "finance-identity.yaml"):
        sc = load_scenario(EXAMPLES / name)
        engine = Engine(sc.inventory, sc.directory, sc.policy, sc.groups)
        for hv in engine.hypervisors():
            flows |= engine.desired(hv)
    return tuple(sorted(flows, key=render_flow))


def serialize(msg: Any) -> bytes:
    msg.set_xid(0)
    msg.serialize()
    return bytes(msg.buf)


def stats_entry_bytes(
    ofp: ModuleType, flow_mod_bytes: bytes, table: int, priority: int, cookie: int
) -> bytes:
    """The flow stats entry a switch would send for this flow mod: its match and instructions
    bytes copied behind an ofp_flow_stats header (OF1.4 adds `importance`; 1.3 pads there)."""
    body = flow_mod_bytes[ofp.OFP_FLOW_MOD_SIZE - ofp.OFP_MATCH_SIZE :]
    length = ofp.OFP_FLOW_STATS_0_SIZE + len(body)
    counters = (cookie, 7, 700)  # cookie, packet_count, byte_count
    if ofp is ofproto_v1_4:
        head = struct.pack(
            ofp.OFP_FLOW_STATS_0_PACK_STR, length, table, 1, 2, priority, 0, 0, 0, 0, *counters
        )
    else:
        head = struct.pack(
            ofp.OFP_FLOW_STATS_0_PACK_STR, length, table, 1, 2, priority, 0, 0, 0, *counters
        )
    return head + body


def round_trip(version: tuple[ModuleType, ModuleType], flow: FlowSpec) -> FlowSpec:
    ofp, parser = version
    wire = serialize(flow_mod(ofp, parser, Datapath(ofp, parser), FlowOp(OpKind.ADD, flow)))
    entry = stats_entry_bytes(ofp, wire, flow.table, flow.priority, flow.cookie)
    stats = parser.OFPFlowStats.parser(entry, 0)
    assert stats.length == len(entry)
    return decode_flow_stats(stats)


# ---- round trip -----------------------------------------------------------------------------


def test_examples_cover_every_action_kind() -> None:
    kinds = {type(a) for f in example_flows() for a in f.actions}
    assert kinds == {Output, OutputInPort, SetField, Move, Ct, Conjunction, GotoTable}
    assert any(f.actions == () for f in example_flows())  # drops
    assert any(
        a.set_mark is not None for f in example_flows() for a in f.actions if isinstance(a, Ct)
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_every_compiled_flow_round_trips_through_the_wire(
    version: tuple[ModuleType, ModuleType],
) -> None:
    flows = example_flows()
    assert len(flows) > 150  # distinct flows over both examples, both hypervisors
    mismatched = [(f, got) for f in flows if (got := round_trip(version, f)) != f]
    assert mismatched == []


@pytest.mark.parametrize("version", VERSIONS)
def test_masked_and_ranged_matches_round_trip(version: tuple[ModuleType, ModuleType]) -> None:
    flow = FlowSpec(
        12,
        500,
        Match.of(
            eth_type=ETH_TYPE_IP,
            ip_proto=6,
            ipv4_src="10.1.0.0/16",
            tcp_dst=(0x400, 0xFC00),
            ct_state=(CT_TRK | CT_EST, 0x3F),
            ct_mark=(1, 1),
            reg7=(4, 0xFF),
            eth_dst=("01:00:00:00:00:00", "01:00:00:00:00:00"),
        ),
        (SetField("reg6", 3), GotoTable(20)),
        COOKIE_PREFIX | 1 << 40,
    )
    assert round_trip(version, flow) == flow


def test_conjunction_clause_is_zero_based_on_the_wire() -> None:
    """ovs-ofctl's conjunction(id,k/n) counts k from 1; nx_action_conjunction from 0."""
    action = encode_action(OF14, P14, Conjunction(id=9, clause=2, n_clauses=3))
    assert (action.clause, action.n_clauses, action.id) == (1, 3, 9)
    buf = bytearray()
    action.serialize(buf, 0)
    assert buf[10:16] == struct.pack("!BBI", 1, 3, 9)
    assert decode_action(action) == Conjunction(9, 2, 3)


def test_empty_actions_are_a_drop_with_no_instructions() -> None:
    assert encode_instructions(OF14, P14, ()) == []
    only_goto = encode_instructions(OF14, P14, (GotoTable(20),))
    assert [type(i).__name__ for i in only_goto] == ["OFPInstructionGotoTable"]


def test_goto_table_must_be_last() -> None:
    with pytest.raises(ValueError):
        encode_instructions(OF14, P14, (GotoTable(20), Output(1)))


# ---- flow mods and the dump request ----------------------------------------------------------


FLOW = FlowSpec(
    20,
    100,
    Match.of(eth_dst="02:00:00:00:00:11"),
    (SetField("reg7", 1), GotoTable(30)),
    COOKIE_PREFIX | 2 << 40 | 1,
)


@pytest.mark.parametrize(
    "kind,command",
    [
        (OpKind.ADD, "OFPFC_ADD"),
        (OpKind.MODIFY, "OFPFC_MODIFY_STRICT"),
        (OpKind.DELETE, "OFPFC_DELETE_STRICT"),
    ],
)
def test_flow_mod_commands_are_strict_and_permanent(kind: OpKind, command: str) -> None:
    msg = flow_mod(OF14, P14, Datapath(OF14, P14), FlowOp(kind, FLOW))
    assert msg.command == getattr(OF14, command)
    assert (msg.idle_timeout, msg.hard_timeout, msg.flags) == (0, 0, 0)
    assert (msg.table_id, msg.priority, msg.cookie, msg.cookie_mask) == (20, 100, FLOW.cookie, 0)
    assert msg.buffer_id == OF14.OFP_NO_BUFFER
    assert (msg.out_port, msg.out_group) == (OF14.OFPP_ANY, OF14.OFPG_ANY)
    assert decode_match(msg.match) == FLOW.match
    expected = () if kind is OpKind.DELETE else FLOW.actions
    assert decode_instructions(msg.instructions) == expected
    serialize(msg)  # os-ken accepts every field


def test_flow_stats_request_filters_on_the_cookie_prefix_in_every_table() -> None:
    msg = flow_stats_request(OF14, P14, Datapath(OF14, P14), COOKIE_PREFIX, COOKIE_PREFIX_MASK)
    wire = serialize(msg)
    table, out_port, out_group, cookie, mask = struct.unpack_from(
        OF14.OFP_FLOW_STATS_REQUEST_0_PACK_STR, wire, OF14.OFP_MULTIPART_REQUEST_SIZE
    )
    assert (table, out_port, out_group) == (OF14.OFPTT_ALL, OF14.OFPP_ANY, OF14.OFPG_ANY)
    assert (cookie, mask) == (COOKIE_PREFIX, COOKIE_PREFIX_MASK)
    assert len(msg.match.items()) == 0


# ---- what OVS hands back ----------------------------------------------------------------------


def masked_set_field(key: str, value: object, mask: object) -> Any:
    """A set_field carrying a mask (OF1.5 encoding; os-ken's constructor refuses masks)."""
    action = P14.OFPActionSetField(**{key: value})
    action.value = (value, mask)
    return action


def test_all_ones_masks_come_back_as_exact_matches() -> None:
    match = P14.OFPMatch(
        eth_type=ETH_TYPE_IP,
        ipv4_dst=("10.0.0.31", "255.255.255.255"),
        reg7=(5, 0xFFFFFFFF),
        eth_src=("02:00:00:00:00:11", "ff:ff:ff:ff:ff:ff"),
    )
    assert decode_match(match) == Match.of(
        eth_type=ETH_TYPE_IP, ipv4_dst="10.0.0.31", reg7=5, eth_src="02:00:00:00:00:11"
    )


def test_nxm_names_of_oxm_fields_are_the_same_fields() -> None:
    match = P14.OFPMatch(eth_type_nxm=0x0806, arp_spa_nxm="10.0.0.1", in_port=3)
    assert decode_match(match) == Match.of(eth_type=0x0806, arp_spa="10.0.0.1", in_port=3)
    move = P14.NXActionRegMove(src_field="arp_sha_nxm", dst_field="arp_tha_nxm", n_bits=48)
    assert decode_action(move) == Move("arp_sha", "arp_tha")


@pytest.mark.parametrize(
    "action",
    [
        P14.OFPActionSetField(reg6=7),
        masked_set_field("reg6", 7, 0xFFFFFFFF),
        P14.NXActionRegLoad(ofs_nbits=nicira_ext.ofs_nbits(0, 31), dst="reg6", value=7),
        P14.NXActionRegLoad2(dst="reg6", value=7),
        P14.NXActionRegLoad2(dst="reg6", value=7, mask=0xFFFFFFFF),
    ],
    ids=["set_field", "set_field-full-mask", "reg_load", "reg_load2", "reg_load2-full-mask"],
)
def test_every_form_of_a_whole_register_write_is_set_field(action: Any) -> None:
    assert decode_action(action) == SetField("reg6", 7)


def test_mac_and_ip_writes_decode_to_ints() -> None:
    assert decode_action(P14.OFPActionSetField(eth_src="02:00:00:00:00:11")) == SetField(
        "eth_src", 0x020000000011
    )
    assert decode_action(P14.OFPActionSetField(arp_spa="10.0.0.11")) == SetField(
        "arp_spa", 0x0A00000B
    )


def test_ct_mark_written_with_a_full_mask_is_set_mark() -> None:
    ct = P14.NXActionCT(
        flags=1,
        zone_src="reg6",
        zone_ofs_nbits=nicira_ext.ofs_nbits(0, 15),
        recirc_table=255,
        alg=0,
        actions=[masked_set_field("ct_mark", 1, 0xFFFFFFFF)],
    )
    assert decode_action(ct) == Ct("reg6", commit=True, table=None, set_mark=1)


def test_output_in_port_and_recirculating_ct() -> None:
    assert decode_action(P14.OFPActionOutput(OF14.OFPP_IN_PORT)) == OutputInPort()
    assert decode_action(P14.OFPActionOutput(5, max_len=0)) == Output(5)
    ct = encode_action(OF14, P14, Ct("reg6", table=11))
    assert (ct.flags, ct.recirc_table, ct.actions) == (0, 11, [])
    assert decode_action(ct) == Ct("reg6", table=11)


# ---- what Goldilocks never writes -------------------------------------------------------------


def _ct(**overrides: Any) -> Any:
    args = {
        "flags": 0,
        "zone_src": "reg6",
        "zone_ofs_nbits": nicira_ext.ofs_nbits(0, 15),
        "recirc_table": 255,
        "alg": 0,
        "actions": [],
    }
    return P14.NXActionCT(**{**args, **overrides})


@pytest.mark.parametrize(
    "action",
    [
        P14.OFPActionGroup(1),
        P14.OFPActionPushVlan(),
        P14.NXActionResubmitTable(in_port=0xFFF8, table_id=5),
        P14.NXActionCTClear(),
        P14.OFPActionSetField(udp_src=53),
        masked_set_field("reg6", 1, 0xFF),
        P14.NXActionRegLoad(ofs_nbits=nicira_ext.ofs_nbits(0, 15), dst="reg6", value=7),
        P14.NXActionRegMove(src_field="reg6", dst_field="reg7", n_bits=16),
        _ct(flags=2),
        _ct(zone_src="", zone_ofs_nbits=5),
        _ct(zone_ofs_nbits=nicira_ext.ofs_nbits(0, 7)),
        _ct(alg=21),
        _ct(flags=1, actions=[P14.NXActionNAT(flags=0)]),
        _ct(flags=1, actions=[masked_set_field("ct_mark", 1, 1)]),
    ],
    ids=lambda a: type(a).__name__,
)
def test_foreign_actions_are_refused(action: Any) -> None:
    with pytest.raises(DecodeError):
        decode_action(action)


@pytest.mark.parametrize(
    "instructions",
    [
        [P14.OFPInstructionActions(OF14.OFPIT_WRITE_ACTIONS, [P14.OFPActionOutput(1)])],
        [P14.OFPInstructionActions(OF14.OFPIT_CLEAR_ACTIONS, [])],
        [P14.OFPInstructionMeter(1)],
        [P14.OFPInstructionWriteMetadata(1, 1)],
        [P14.OFPInstructionActions(OF14.OFPIT_APPLY_ACTIONS, [P14.OFPActionGroup(1)])],
    ],
    ids=["write_actions", "clear_actions", "meter", "write_metadata", "group"],
)
def test_foreign_instructions_are_refused(instructions: list[Any]) -> None:
    with pytest.raises(DecodeError):
        decode_instructions(instructions)


@pytest.mark.parametrize(
    "kwargs", [{"udp_src": 53}, {"vlan_vid": 5}, {"tunnel_id": 1}, {"metadata": 1}]
)
def test_foreign_match_fields_are_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(DecodeError):
        decode_match(P14.OFPMatch(**kwargs))


def test_masked_fields_normalize_like_match_field() -> None:
    """OVS stores value & mask; MatchField's canonical form is the same, so they compare equal."""
    assert decode_match(P14.OFPMatch(reg7=(0x1234, 0xFF))) == Match(
        (MatchField("reg7", 0x34, 0xFF),)
    )
    assert decode_match(encode_match(P14, Match.of(ct_state=(CT_TRK, CT_TRK)))) == Match.of(
        ct_state=(CT_TRK, CT_TRK)
    )
