"""apps/ofcodec against real Open vSwitch: flow mods encoded with os-ken load, mean what the
ovs-ofctl renderer means, and a flow dump of them decodes back to exactly the desired set —
so a reconnect with nothing changed needs zero flow mods.

The OpenFlow peer here is deliberately raw (a listening socket and os-ken's message classes,
no app manager): the test is about the codec, not about os-ken's event loop. ovs-vswitchd runs
in the sandbox's own network namespace, so the controller is a Unix socket, not 127.0.0.1.
"""

from __future__ import annotations

import itertools
import socket
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from os_ken.ofproto import ofproto_common, ofproto_parser, ofproto_v1_4, ofproto_v1_4_parser

from apps.ofcodec import decode_flow_stats, flow_mod, flow_stats_request
from controller.engine import Engine
from controller.flows.pipeline import COOKIE_PREFIX, COOKIE_PREFIX_MASK
from controller.flows.reconcile import FlowOp, OpKind
from controller.flows.render import render_flows
from controller.flows.types import FlowSpec, Match, Output
from controller.scenario import load_scenario
from tests.ovs.harness import OvsSandbox

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
OFP, PARSER = ofproto_v1_4, ofproto_v1_4_parser
TIMEOUT = 10.0
# Ethernet + IPv4 + UDP 10.0.0.1:53 -> 10.0.0.2:53, to count packets through one flow.
UDP_PACKET = "ffffffffffff02000000000108004500001c0001000040117ccd0a0000010a0000020035003500080000"


@dataclass
class OpenFlowPeer:
    """The controller end of one switch connection, driven synchronously by the test."""

    sock: socket.socket
    ofproto: Any = OFP
    ofproto_parser: Any = PARSER
    xids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    datapath_id: int = 0

    def send(self, msg: Any) -> int:
        msg.set_xid(next(self.xids))
        msg.serialize()
        self.sock.sendall(bytes(msg.buf))
        return int(msg.xid)

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("switch closed the connection")
            data += chunk
        return data

    def recv(self, errors_fail: bool = True) -> Any:
        """The next message that is not an echo request (those are answered here)."""
        while True:
            head = self._read(ofproto_common.OFP_HEADER_SIZE)
            version, msg_type, length, xid = struct.unpack(ofproto_common.OFP_HEADER_PACK_STR, head)
            buf = head + self._read(length - len(head))
            msg = ofproto_parser.msg(self, version, msg_type, length, xid, buf)
            if isinstance(msg, self.ofproto_parser.OFPEchoRequest):
                reply = self.ofproto_parser.OFPEchoReply(self, data=msg.data)
                reply.set_xid(xid)
                reply.serialize()
                self.sock.sendall(bytes(reply.buf))
                continue
            if errors_fail and isinstance(msg, self.ofproto_parser.OFPErrorMsg):
                pytest.fail(f"switch error type={msg.type} code={msg.code} xid={msg.xid}")
            return msg

    def recv_until(self, kind: type) -> Any:
        """Skip asynchronous messages (port status ...) until one of `kind` arrives."""
        while not isinstance(msg := self.recv(), kind):
            pass
        return msg

    def handshake(self) -> None:
        ofp, parser = self.ofproto, self.ofproto_parser
        self.send(parser.OFPHello(self))
        hello = self.recv_until(parser.OFPHello)
        assert hello.version == ofp.OFP_VERSION, f"bridge must speak OpenFlow version {ofp.OFP_VERSION:#x}"
        self.send(parser.OFPFeaturesRequest(self))
        self.datapath_id = self.recv_until(parser.OFPSwitchFeatures).datapath_id

    def barrier(self) -> None:
        xid = self.send(self.ofproto_parser.OFPBarrierRequest(self))
        while self.recv_until(self.ofproto_parser.OFPBarrierReply).xid != xid:
            pass

    def dump_ours(self) -> list[Any]:
        """Every flow stats entry under the Goldilocks cookie prefix, over all reply parts."""
        ofp, parser = self.ofproto, self.ofproto_parser
        self.send(flow_stats_request(ofp, parser, self, COOKIE_PREFIX, COOKIE_PREFIX_MASK))
        entries: list[Any] = []
        while True:
            reply = self.recv_until(parser.OFPFlowStatsReply)
            entries.extend(reply.body)
            if not reply.flags & ofp.OFPMPF_REPLY_MORE:
                return entries


def connect(ovs: OvsSandbox, bridge: str, ofp: Any = OFP, parser: Any = PARSER) -> OpenFlowPeer:
    """Listen, point the bridge's controller at us, accept and shake hands."""
    path = ovs.dir / f"{bridge}.ctl.sock"
    path.unlink(missing_ok=True)  # bridge names are reused from test to test
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    server.settimeout(TIMEOUT)
    ovs.vsctl("set-controller", bridge, f"unix:{path}")
    try:
        conn, _ = server.accept()
    finally:
        server.close()
        path.unlink()  # one connection only: a reconnecting switch must not reach a stale peer
    conn.settimeout(TIMEOUT)
    peer = OpenFlowPeer(conn, ofp, parser)
    peer.handshake()
    return peer


def desired(example: str, hv: str) -> tuple[int, frozenset[FlowSpec]]:
    sc = load_scenario(EXAMPLES / example)
    engine = Engine(sc.inventory, sc.directory, sc.policy, sc.groups)
    return sc.inventory.hypervisors[hv].dpid, engine.desired(hv)


def install(peer: OpenFlowPeer, flows: frozenset[FlowSpec]) -> None:
    for flow in sorted(flows, key=lambda f: (f.table, -f.priority, f.cookie)):
        peer.send(flow_mod(OFP, PARSER, peer, FlowOp(OpKind.ADD, flow)))
    peer.barrier()


CASES = [(ex, hv) for ex in ("three-tier.yaml", "finance-identity.yaml") for hv in ("hv1", "hv2")]


@pytest.mark.parametrize("example,hv", CASES)
def test_installed_flows_dump_back_to_the_desired_set(
    ovs: OvsSandbox, bridge_factory, example: str, hv: str
) -> None:
    dpid, flows = desired(example, hv)
    bridge = bridge_factory(dpid=dpid)
    peer = connect(ovs, bridge)
    try:
        assert peer.datapath_id == dpid
        install(peer, flows)
        dumped = frozenset(decode_flow_stats(entry) for entry in peer.dump_ours())
    finally:
        peer.sock.close()
    assert dumped == flows
    assert len(ovs.dump_flows(bridge)) == len(flows)


@pytest.mark.parametrize("example,hv", CASES[:1] + CASES[3:])
def test_encoded_flows_mean_what_the_renderer_writes(
    ovs: OvsSandbox, bridge_factory, example: str, hv: str
) -> None:
    """The same desired set, once through os-ken and once through ovs-ofctl text, is the same
    flow table in OVS's own words; and flows ovs-ofctl installed decode to the desired set too."""
    _, flows = desired(example, hv)
    via_osken, via_ofctl = bridge_factory(), bridge_factory()
    # Connect first: OVS flushes every flow when a bridge gets its first controller
    # (connmgr_set_controllers), so flows loaded before set-controller would be gone.
    osken_peer, ofctl_peer = connect(ovs, via_osken), connect(ovs, via_ofctl)
    try:
        install(osken_peer, flows)
        ovs.replace_flows(via_ofctl, render_flows(flows))
        assert sorted(ovs.dump_flows(via_osken)) == sorted(ovs.dump_flows(via_ofctl))
        assert frozenset(decode_flow_stats(e) for e in ofctl_peer.dump_ours()) == flows
    finally:
        osken_peer.sock.close()
        ofctl_peer.sock.close()


def test_a_foreign_flow_is_not_dumped_under_our_cookie(ovs: OvsSandbox, bridge_factory) -> None:
    """The dump is filtered by the switch: someone else's flow never reaches the decoder."""
    _, flows = desired("three-tier.yaml", "hv1")
    bridge = bridge_factory()
    peer = connect(ovs, bridge)
    try:
        install(peer, flows)
        ovs.add_flows(bridge, "table=0,priority=7,cookie=0x1234,udp,tp_src=53 actions=drop\n")
        assert frozenset(decode_flow_stats(e) for e in peer.dump_ours()) == flows
    finally:
        peer.sock.close()
    assert len(ovs.dump_flows(bridge)) == len(flows) + 1


def test_strict_modify_keeps_counters_and_cookie_add_replaces_the_cookie(
    ovs: OvsSandbox, bridge_factory
) -> None:
    """What the reconciler can rely on (OpenFlow 1.4 on OVS): MODIFY_STRICT swaps actions in
    place and keeps counters but never changes the cookie; an ADD on the same key keeps the
    counters too (no RESET_COUNTS flag) and does take the new cookie."""
    bridge = bridge_factory()
    peer = connect(ovs, bridge)
    first = FlowSpec(0, 100, Match.of(in_port=OFP.OFPP_LOCAL), (), COOKIE_PREFIX | 1 << 40 | 5)
    try:
        peer.send(flow_mod(OFP, PARSER, peer, FlowOp(OpKind.ADD, first)))
        peer.barrier()
        for _ in range(3):
            ovs.ofctl("packet-out", bridge, "LOCAL", "table", UDP_PACKET)
        modified = replace(first, actions=(Output(7),), cookie=COOKIE_PREFIX | 2 << 40 | 6)
        peer.send(flow_mod(OFP, PARSER, peer, FlowOp(OpKind.MODIFY, modified)))
        peer.barrier()
        (entry,) = peer.dump_ours()
        assert (decode_flow_stats(entry), entry.packet_count) == (
            replace(modified, cookie=first.cookie),
            3,
        )
        peer.send(flow_mod(OFP, PARSER, peer, FlowOp(OpKind.ADD, modified)))
        peer.barrier()
        (entry,) = peer.dump_ours()
        assert (decode_flow_stats(entry), entry.packet_count) == (modified, 3)
        peer.send(
            flow_mod(
                OFP, PARSER, peer, FlowOp(OpKind.DELETE, replace(modified, cookie=COOKIE_PREFIX))
            )
        )
        peer.barrier()
        assert peer.dump_ours() == []  # strict delete goes by key, whatever the cookie
    finally:
        peer.sock.close()
