"""apps/restore against real Open vSwitch: a bridge dialled on its management socket shows itself as it is
(dpid, ports, flow count, version), gets exactly the flows chosen for it in one atomic bundle
(thousands too), or — the choice declined, one flow mod refused, a malformed one given, another
OpenFlow version spoken — keeps exactly the table it had; and a restarted ovs-vswitchd gets its
table back. A scripted switch on a socket pair covers what OVS does not do on demand (echo
requests, a version bitmap, port descriptions in several parts, silence). And the module loads
neither os-ken nor SQLAlchemy, and declares os-ken's values for OpenFlow's names.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from os_ken.ofproto import ofproto_v1_4

from apps import restore
from apps.ofwire import flow_mod_body
from apps.restore import Choice, Outcome, SwitchView, restore_connection
from controller.flows.pipeline import COOKIE_PREFIX
from controller.flows.reconcile import OpKind
from controller.flows.render import render_flows
from controller.flows.types import ETH_TYPE_IP, FlowSpec, GotoTable, Match, Output
from tests.ovs.harness import OvsSandbox
from tests.ovs.test_ofcodec_ovs import desired

ROOT = Path(__file__).resolve().parents[2]
WAIT = 10.0  # s for OVS to connect to a restorer and the restore to end


def flow_mod(spec: FlowSpec) -> bytes:
    """A complete OF1.4 OFPT_FLOW_MOD adding `spec` (xid 0: the restorer sets its own)."""
    body = flow_mod_body(OpKind.ADD, spec)
    return struct.pack("!BBHI", 5, 14, 8 + len(body), 0) + body


def synthetic(n: int) -> list[FlowSpec]:
    """n distinct flows over two tables, all of them acceptable to OVS."""
    return [FlowSpec(10 * (i % 2), 100 + i % 50,
                     Match.of(in_port=1 + i % 60, eth_type=ETH_TYPE_IP, ipv4_src=0x0A000000 + i),
                     (Output(1 + i % 7),), COOKIE_PREFIX | i)
            for i in range(n)]


@dataclass
class Chooser:
    """A `choose` that answers with a fixed choice and records every view it was given."""

    choice: Choice
    views: list[SwitchView] = field(default_factory=list)

    def __call__(self, view: SwitchView) -> Choice:
        self.views.append(view)
        return self.choice


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def dial(ovs: OvsSandbox, bridge: str) -> socket.socket:
    """An OpenFlow connection to the bridge's management socket, as controller/warmstart.py makes."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(ovs.dir / f"{bridge}.mgmt"))
    return sock


def restore_once(ovs: OvsSandbox, bridge: str, choose: Callable[[SwitchView], Choice]) -> Outcome:
    return restore_connection(dial(ovs, bridge), choose, WAIT)


def flows_on(ovs: OvsSandbox, bridge: str, protocol: str = "OpenFlow14") -> list[str]:
    """The bridge's whole flow table in OVS's words, every table and cookie, sorted."""
    out = subprocess.run(["ovs-ofctl", "-O", protocol, "--no-stats", "dump-flows",
                          f"unix:{ovs.dir}/{bridge}.mgmt"],
                         env=ovs.env, capture_output=True, text=True, check=True).stdout
    return sorted(line.strip() for line in out.splitlines()
                  if line.strip() and not line.lstrip().startswith(("OFPST_FLOW", "NXST_FLOW")))


def as_ovs_writes(ovs: OvsSandbox, bridge_factory, flows: Iterable[FlowSpec]) -> list[str]:
    """`flows` loaded by ovs-ofctl from their rendering onto a bridge of their own, dumped:
    the table a restore of them must leave, in the same words."""
    reference = bridge_factory()
    ovs.replace_flows(reference, render_flows(flows))
    return flows_on(ovs, reference)


def add_internal_ports(ovs: OvsSandbox, bridge: str, ports: set[tuple[int, str]]) -> None:
    for ofport, name in sorted(ports):
        ovs.vsctl("add-port", bridge, name, "--", "set", "Interface", name, "type=internal",
                  f"ofport_request={ofport}")


# ---- real OVS ------------------------------------------------------------------------------


def test_an_empty_bridge_gets_exactly_the_chosen_flows_and_is_seen_as_it_is(
    ovs: OvsSandbox, bridge_factory
) -> None:
    dpid, flows = desired("three-tier.yaml", "hv1")  # compiled flows: ct, conjunctions, goto
    bridge = bridge_factory(dpid=dpid)
    ports = {(5, f"{bridge}a"), (9, f"{bridge}b")}
    add_internal_ports(ovs, bridge, ports)
    choose = Chooser([flow_mod(f) for f in sorted(flows)])

    assert restore_once(ovs, bridge, choose) == Outcome(dpid, len(flows), "")
    assert choose.views == [SwitchView(dpid, 5, frozenset(ports), 0)]  # LOCAL is not listed
    assert flows_on(ovs, bridge) == as_ovs_writes(ovs, bridge_factory, flows)


def test_two_thousand_flows_are_restored_in_one_bundle(ovs: OvsSandbox, bridge_factory) -> None:
    flows = synthetic(2000)
    bridge = bridge_factory(dpid=0x2000)
    assert restore_once(ovs, bridge, Chooser([flow_mod(f) for f in flows])) == Outcome(0x2000, 2000, "")
    assert flows_on(ovs, bridge) == as_ovs_writes(ovs, bridge_factory, flows)


def test_a_bridge_with_flows_shows_their_count_and_keeps_them_when_choose_declines(
    ovs: OvsSandbox, bridge_factory
) -> None:
    bridge = bridge_factory(dpid=0x2)
    ovs.add_flows(bridge, """
        table=0,priority=10,in_port=1 actions=output:2
        table=3,priority=5,cookie=0x99,ip actions=drop
        table=200,priority=1,cookie=0x601d000000000007 actions=drop
    """)
    before = flows_on(ovs, bridge)
    assert len(before) == 3
    choose = Chooser("the table is not empty")

    assert restore_once(ovs, bridge, choose) == Outcome(0x2, 0, "the table is not empty")
    assert [view.flow_count for view in choose.views] == [3]  # every table, every cookie
    assert flows_on(ovs, bridge) == before


def test_one_refused_flow_mod_among_good_ones_leaves_the_table_as_it_was(
    ovs: OvsSandbox, bridge_factory
) -> None:
    """OVS refuses a goto_table backwards as the add reaches the bundle (and would commit the
    others): the restorer discards the bundle and names the refused message. It is that one
    flow: the others alone are restored."""
    good = [flow_mod(f) for f in synthetic(1200)]
    bad = flow_mod(FlowSpec(30, 7, Match.of(in_port=1), (GotoTable(10),), COOKIE_PREFIX))
    given = good[:700] + [bad] + good[700:]  # in the second write of adds
    bridge = bridge_factory(dpid=0x3)

    outcome = restore_once(ovs, bridge, Chooser(given))
    assert (outcome.dpid, outcome.installed) == (0x3, 0)
    assert outcome.reason == ("the switch refused flow mod #700 (of 1201): OFPET_BAD_INSTRUCTION "
                              "(3), OFPBIC_BAD_TABLE_ID (2); bundle discarded, nothing installed")
    assert flows_on(ovs, bridge) == []

    assert restore_once(ovs, bridge, Chooser(good)) == Outcome(0x3, 1200, "")
    assert len(flows_on(ovs, bridge)) == 1200


@pytest.mark.parametrize("protocol,dpid_known,words", [
    ("OpenFlow13", True, "the switch speaks OpenFlow 1.3 (version 0x04)"),
    ("OpenFlow15", False,
     "no OpenFlow version in common: the switch offers OpenFlow 1.5 (version 0x06)"),
])
def test_a_bridge_that_does_not_speak_openflow14_is_left_alone(
    ovs: OvsSandbox, bridge_factory, protocol: str, dpid_known: bool, words: str
) -> None:
    bridge = bridge_factory(dpid=0x4, protocols=protocol)
    choose = Chooser([flow_mod(f) for f in synthetic(3)])

    assert restore_once(ovs, bridge, choose) == Outcome(
        0x4 if dpid_known else None, 0,
        f"{words}; only OpenFlow 1.4 (version 0x05) is restored")
    assert choose.views == []
    assert flows_on(ovs, bridge, protocol) == []


def corrupt_type(msg: bytes) -> bytes:
    return msg[:1] + bytes([13]) + msg[2:]  # OFPT_PACKET_OUT


def corrupt_length(msg: bytes) -> bytes:
    return msg[:2] + struct.pack("!H", len(msg) - 8) + msg[4:]


def corrupt_version(msg: bytes) -> bytes:
    return bytes([4]) + msg[1:]


@pytest.mark.parametrize("corrupt,problem", [
    (corrupt_type, "message type 13, not OFPT_FLOW_MOD (14)"),
    (corrupt_length, "its header says {short} bytes but it has {long}"),
    (corrupt_version, "version 0x04, not 0x05"),
], ids=["type", "length", "version"])
def test_a_malformed_flow_mod_is_refused_before_anything_is_sent(
    ovs: OvsSandbox, bridge_factory, corrupt: Callable[[bytes], bytes], problem: str
) -> None:
    given = [flow_mod(f) for f in synthetic(5)]
    problem = problem.format(short=len(given[3]) - 8, long=len(given[3]))
    given[3] = corrupt(given[3])
    bridge = bridge_factory(dpid=0x6)

    assert restore_once(ovs, bridge, Chooser(given)) == Outcome(
        0x6, 0, f"flow mod #3 (of 5) is malformed: {problem}; nothing was sent")
    assert flows_on(ovs, bridge) == []


def test_a_restarted_switch_gets_its_table_back(ovs: OvsSandbox, bridge_factory) -> None:
    """The case the restorer is for: ovs-vswitchd restarts (its flows are gone) and the restorer
    fills the empty table again; while the table is full, it declines."""
    dpid, flows = desired("finance-identity.yaml", "hv1")
    bridge = bridge_factory(dpid=dpid)
    given = [flow_mod(f) for f in sorted(flows)]
    full = f"the table has {len(flows)} flows"

    def choose(view: SwitchView) -> Choice:
        return given if view.flow_count == 0 else full

    assert restore_once(ovs, bridge, choose) == Outcome(dpid, len(flows), "")
    assert restore_once(ovs, bridge, choose) == Outcome(dpid, 0, full)
    ovs.restart_vswitchd()
    wait_for(lambda: (ovs.dir / f"{bridge}.mgmt").exists(), "the restarted bridge's management socket")
    assert restore_once(ovs, bridge, choose) == Outcome(dpid, len(flows), "")
    assert flows_on(ovs, bridge) == as_ovs_writes(ovs, bridge_factory, flows)


# ---- no switch, or a scripted one -----------------------------------------------------------


def test_importing_the_restorer_loads_neither_os_ken_nor_sqlalchemy() -> None:
    code = ("import sys, apps.restore; print(sorted(m for m in sys.modules "
            "if m.startswith(('os_ken', 'sqlalchemy'))))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          check=True)
    assert proc.stdout.strip() == "[]"


def test_openflow_constants_have_os_kens_values() -> None:
    names = [n for n, v in vars(restore).items() if n.startswith("OFP") and isinstance(v, int)]
    assert len(names) > 30
    assert {n: getattr(restore, n) for n in names} == {n: getattr(ofproto_v1_4, n) for n in names}
    assert [getattr(ofproto_v1_4, n) for n in restore.OFPET_NAMES] == list(
        range(len(restore.OFPET_NAMES)))
    for codes in restore.OFP_ERROR_CODE_NAMES.values():
        assert [getattr(ofproto_v1_4, n) for n in codes] == list(range(len(codes)))


class ScriptedSwitch:
    """The switch end of a socket pair, one message at a time, as the test says."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(5.0)

    def send(self, msg_type: int, xid: int, body: bytes = b"", version: int = 5) -> None:
        self.sock.sendall(struct.pack("!BBHI", version, msg_type, 8 + len(body), xid) + body)

    def recv(self) -> tuple[int, int, int, bytes]:
        version, msg_type, length, xid = struct.unpack("!BBHI", self._read(8))
        return version, msg_type, xid, self._read(length - 8)

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "the restorer closed the connection"
            data += chunk
        return data


def ofp_port(port_no: int, name: str, with_ethernet_property: bool) -> bytes:
    prop = struct.pack("!HH4xIIIIII", 0, 32, 0, 0, 0, 0, 0, 0) if with_ethernet_property else b""
    return struct.pack("!IH2x6s2x16sII", port_no, 40 + len(prop), b"\x02" * 6, name.encode(),
                       0, 0) + prop


def test_a_scripted_switch_echoes_negotiates_by_bitmap_and_sends_ports_in_parts() -> None:
    ours, theirs = socket.socketpair()
    switch = ScriptedSwitch(theirs)
    choose = Chooser("declined")
    result: list[Outcome] = []
    thread = threading.Thread(target=lambda: result.append(restore_connection(ours, choose)))
    thread.start()
    try:
        # A 1.5 switch that also speaks 1.0, 1.3 and 1.4: the highest common version is 1.4.
        bitmap = 1 << 1 | 1 << 4 | 1 << 5 | 1 << 6
        switch.send(0, 1, struct.pack("!HHI", 1, 8, bitmap), version=6)
        assert switch.recv() == (5, 0, 1, b"")  # our hello: 1.4, no bitmap
        # Then all three requests, before the switch has answered any (one write).
        version, msg_type, features, _ = switch.recv()
        assert (version, msg_type) == (5, 5)  # features request
        _, msg_type, ports, body = switch.recv()
        assert (msg_type, body) == (18, struct.pack("!HH4x", 13, 0))  # port description
        _, msg_type, count, body = switch.recv()
        assert (msg_type, body) == (18, struct.pack("!HH4x", 2, 0) + struct.pack(
            "!B3xII4xQQHH4x", 0xFF, 0xFFFFFFFF, 0xFFFFFFFF, 0, 0, 1, 4))  # aggregate, all
        switch.send(2, 77, b"are you there")
        assert switch.recv() == (5, 3, 77, b"are you there")  # echo reply, at once
        switch.send(12, 0, bytes(8) + ofp_port(3, "noise", False))  # port status: ignored
        switch.send(6, features, struct.pack("!QIBB2xII", 0xFEED, 0, 254, 0, 0, 0))
        switch.send(19, ports, struct.pack("!HH4x", 13, 1) + ofp_port(1, "eth1", True)
                    + ofp_port(0xFFFFFFFE, "br0", True))
        switch.send(19, ports, struct.pack("!HH4x", 13, 0) + ofp_port(2, "eth2", False))
        switch.send(19, count, struct.pack("!HH4x", 2, 0) + struct.pack("!QQI4x", 0, 0, 7))
        thread.join(5.0)
        assert theirs.recv(1) == b""  # closed
    finally:
        theirs.close()
        thread.join(5.0)
    assert result == [Outcome(0xFEED, 0, "declined")]
    assert choose.views == [SwitchView(0xFEED, 5, frozenset({(1, "eth1"), (2, "eth2")}), 7)]


def test_a_silent_switch_times_out_with_a_reason_and_is_closed() -> None:
    ours, theirs = socket.socketpair()
    switch = ScriptedSwitch(theirs)
    switch.send(0, 1)  # a hello, then nothing
    try:
        outcome = restore_connection(ours, Chooser("unused"), timeout=0.2)
        assert outcome == Outcome(None, 0, "timed out after 0.2 s waiting for the features reply")
        assert [switch.recv()[1] for _ in range(4)] == [0, 5, 18, 18]  # hello, the three requests
        assert theirs.recv(1) == b""
    finally:
        theirs.close()
