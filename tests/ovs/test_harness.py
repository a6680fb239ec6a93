"""The real-OVS harness itself, proven with hand-written flows only (no Goldilocks code)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require
from tests.ovs.conftest import BridgeFactory
from tests.ovs.harness import (
    EstablishedConnection,
    OdpPort,
    OvsSandbox,
    VmPort,
    datapath_outputs,
    parse_dpif_show,
    parse_trace,
    ping,
    split_actions,
    tcp_connect,
    tcp_server,
    unavailable_reason,
)

# ----------------------------------------------------------------------- parser (no OVS)

DPIF_SHOW = """\
netdev@ovs-netdev: hit:9 missed:6
  br0:
    br0 65534/1: (tap)
    tp1 1/2: (system)
    tp2 2/3: (system)
    pa1 7/none: (patch: peer=pb1)
  br1:
    br1 65534/4: (tap)
    vm9 1/5: (system)
"""

# Real OVS 3.1 output (trimmed): two ct() recirculations, the second stage outputs.
TRACE_RECIRC = """\
Flow: tcp,in_port=1,vlan_tci=0x0000,dl_src=02:00:00:00:00:01,dl_dst=02:00:00:00:00:02

bridge("br0")
-------------
 0. ip, priority 10
    ct(table=1,zone=1)
    drop
     -> A clone of the packet is forked to recirculate. The forked pipeline will be resumed at table 1.

Final flow: unchanged
Megaflow: recirc_id=0,eth,ip,in_port=1,nw_frag=no
Datapath actions: ct(zone=1),recirc(0x2)

===============================================================================
recirc(0x2) - resume conntrack with ct_state=new|trk
===============================================================================

bridge("br0")
-------------
    thaw
        Resuming from table 1
 1. ct_state=+new+trk,ip,in_port=1, priority 10
    ct(commit,zone=1,exec(load:0x1->NXM_NX_CT_MARK[]))
    output:2

Final flow: recirc_id=0x2,eth,tcp,in_port=1
Megaflow: recirc_id=0x2,ct_state=+new+trk,eth,ip,in_port=1,nw_frag=no
Datapath actions: ct(commit,zone=1,mark=0x1/0xffffffff),3
"""


def test_split_actions_respects_parentheses() -> None:
    assert split_actions("ct(commit,zone=1,nat(src=1.2.3.4)),recirc(0x2),3") == [
        "ct(commit,zone=1,nat(src=1.2.3.4))", "recirc(0x2)", "3"]
    assert split_actions("drop") == ["drop"]


def test_datapath_outputs() -> None:
    assert datapath_outputs("drop") == []
    assert datapath_outputs("ct(zone=1),recirc(0x2)") == []
    assert datapath_outputs("set(eth(src=02:00:00:00:00:01)),3,5") == [3, 5]
    assert datapath_outputs("clone(ct(commit),4),userspace(pid=0,controller(reason=1))") == [
        4, "CONTROLLER"]


def test_parse_dpif_show_maps_datapath_ports() -> None:
    ports = parse_dpif_show(DPIF_SHOW)
    assert ports[3] == OdpPort("br0", "tp2", 2, 3)
    assert ports[5] == OdpPort("br1", "vm9", 1, 5)
    assert all(port.name != "pa1" for port in ports.values())  # patch ports have no odp port


def test_parse_trace_follows_recirculation() -> None:
    result = parse_trace(TRACE_RECIRC, "br0", parse_dpif_show(DPIF_SHOW))
    assert result.stages == ("ct(zone=1),recirc(0x2)", "ct(commit,zone=1,mark=0x1/0xffffffff),3")
    assert result.output_ports == (2,)
    assert not result.dropped


def test_parse_trace_names_ports_of_other_bridges_and_local() -> None:
    ports = parse_dpif_show(DPIF_SHOW)
    assert parse_trace("Datapath actions: 5,1", "br0", ports).output_ports == ("vm9", "LOCAL")
    dropped = parse_trace("Datapath actions: ct(zone=1),recirc(0x2)\nDatapath actions: drop",
                          "br0", ports)
    assert dropped.dropped and dropped.output_ports == ()


# ----------------------------------------------------------------------- real OVS

MAC1, MAC2 = "02:00:00:00:00:01", "02:00:00:00:00:02"
IP1, IP2 = "10.0.0.1", "10.0.0.2"
SYN_1_TO_2 = (f"in_port=1,tcp,dl_src={MAC1},dl_dst={MAC2},nw_src={IP1},nw_dst={IP2},"
              "tp_src=40000,tp_dst=5001,tcp_flags=syn")

DROP_ALL = "priority=0,actions=drop"
ALLOW_1_2 = """
priority=0,actions=drop
priority=10,arp,in_port=1,actions=output:2
priority=10,arp,in_port=2,actions=output:1
priority=10,ip,in_port=1,actions=ct(commit,zone=1),output:2
priority=10,ip,in_port=2,actions=ct(commit,zone=1),output:1
"""
# Stateful: every IP packet goes through conntrack (a recirculation) before a verdict.
STATEFUL_1_2 = """
priority=0,actions=drop
priority=10,arp,in_port=1,actions=output:2
priority=10,arp,in_port=2,actions=output:1
priority=10,ip,actions=ct(zone=1,table=1)
table=1,priority=0,actions=drop
table=1,priority=10,ct_state=+trk+new,ip,in_port=1,actions=ct(commit,zone=1),output:2
table=1,priority=10,ct_state=+trk+est,ip,in_port=1,actions=output:2
table=1,priority=10,ct_state=+trk+est,ip,in_port=2,actions=output:1
"""


def _two_vms(ovs: OvsSandbox, bridge: str) -> tuple[VmPort, VmPort]:
    vm1 = ovs.add_vm_port(bridge, "vm1", mac=MAC1, ip=f"{IP1}/24", ofport=1,
                          external_ids={"iface-id": "port-1", "attached-mac": MAC1,
                                        "vm-id": "uuid-1"})
    vm2 = ovs.add_vm_port(bridge, "vm2", mac=MAC2, ip=f"{IP2}/24", ofport=2)
    return vm1, vm2


@pytest.fixture
def one_bridge(ovs: OvsSandbox, bridge_factory: BridgeFactory) -> tuple[str, VmPort, VmPort]:
    bridge = bridge_factory()
    vm1, vm2 = _two_vms(ovs, bridge)
    return bridge, vm1, vm2


def test_unavailable_reason_is_none_here(ovs: OvsSandbox) -> None:
    assert unavailable_reason() is None


def test_sandbox_is_private(ovs: OvsSandbox, bridge_factory: BridgeFactory) -> None:
    bridge = bridge_factory(f"{ovs.prefix}-b", dpid=0xABC)  # a name no one else uses
    pid = int((ovs.dir / "ovs-vswitchd.pid").read_text())
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{ovs.netns}").st_ino
    assert f"  {bridge}:" in ovs.appctl("dpif/show")
    assert ovs.vsctl("get", "Bridge", bridge, "datapath_type").strip() == "netdev"
    assert ovs.vsctl("get", "Bridge", bridge, "fail_mode").strip() == "secure"
    assert "dpid:0000000000000abc" in ovs.ofctl("show", bridge)
    # The netdev datapath's tap devices live in the sandbox namespace, not on the host.
    host = subprocess.run(["ip", "link", "show", bridge], capture_output=True, check=False)
    assert host.returncode != 0
    ovs.ip("link", "show", bridge)


def test_vm_port_has_identity_and_namespace(ovs: OvsSandbox, one_bridge) -> None:
    _, vm1, _ = one_bridge
    assert ovs.ofport("vm1") == 1
    assert ovs.interface_external_ids("vm1") == {
        "iface-id": "port-1", "attached-mac": MAC1, "vm-id": "uuid-1"}
    assert ovs.interface_external_ids("vm2") == {}
    shown = vm1.exec(["ip", "-o", "addr", "show", "eth0"]).stdout
    assert f"{IP1}/24" in shown
    assert MAC1 in vm1.exec(["ip", "link", "show", "eth0"]).stdout
    offload = vm1.exec(["ethtool", "-k", "eth0"]).stdout
    assert "tx-checksumming: off" in offload


def test_allowed_traffic_passes(ovs: OvsSandbox, one_bridge) -> None:
    bridge, vm1, vm2 = one_bridge
    ovs.add_flows(bridge, ALLOW_1_2)
    assert len(ovs.dump_flows(bridge)) == 5
    assert ping(vm1, IP2)
    assert ping(vm2, IP1, count=2)
    with tcp_server(vm2, 5001):
        assert tcp_connect(vm1, IP2, 5001)
    assert not tcp_connect(vm1, IP2, 5002, timeout=1.0)  # refused: nobody listens


def test_trace_outputs_through_conntrack(ovs: OvsSandbox, one_bridge) -> None:
    bridge, _, _ = one_bridge
    ovs.add_flows(bridge, ALLOW_1_2)
    simple = ovs.trace(bridge, SYN_1_TO_2)
    assert simple.output_ports == (2,) and not simple.dropped

    ovs.replace_flows(bridge, STATEFUL_1_2)
    new = ovs.trace(bridge, SYN_1_TO_2, ct_next=["trk,new"])
    assert len(new.stages) == 2 and "recirc(" in new.stages[0]
    assert new.output_ports == (2,)
    invalid = ovs.trace(bridge, SYN_1_TO_2, ct_next=["trk,inv"])
    assert invalid.dropped
    reply = SYN_1_TO_2.replace("in_port=1", "in_port=2")
    assert ovs.trace(bridge, reply, ct_next=["trk,new"]).dropped
    assert ovs.trace(bridge, reply, ct_next=["trk,est"]).output_ports == (1,)


def test_stateful_flows_pass_real_tcp(ovs: OvsSandbox, one_bridge) -> None:
    bridge, vm1, vm2 = one_bridge
    ovs.add_flows(bridge, STATEFUL_1_2)
    assert ping(vm1, IP2)
    assert not ping(vm2, IP1, timeout=0.5)  # vm2 may only answer
    with tcp_server(vm2, 5001), tcp_server(vm1, 5001):
        assert tcp_connect(vm1, IP2, 5001)
        assert not tcp_connect(vm2, IP1, 5001, timeout=1.0)


def test_drop_only(ovs: OvsSandbox, one_bridge) -> None:
    bridge, vm1, _ = one_bridge
    ovs.add_flows(bridge, DROP_ALL)
    assert ovs.dump_flows(bridge) == ["priority=0 actions=drop"]
    result = ovs.trace(bridge, SYN_1_TO_2, ct_next=["trk,new"])
    assert result.dropped and result.final_actions == "drop"
    assert not ping(vm1, IP2, timeout=0.5)


def test_established_connection_is_cut(ovs: OvsSandbox, one_bridge) -> None:
    bridge, vm1, vm2 = one_bridge
    ovs.add_flows(bridge, STATEFUL_1_2)
    with tcp_server(vm2, 5001), EstablishedConnection(vm1, IP2, 5001) as conn:
        assert conn.alive(1.0)
        assert conn.alive(1.0)
        ovs.replace_flows(bridge, STATEFUL_1_2 + "\ntable=1,priority=20,tcp,tp_dst=5001,actions=drop")
        ovs.wait_revalidated()
        assert not conn.alive(1.0)
        assert ping(vm1, IP2)  # only that traffic is cut


@pytest.mark.parametrize("kind", ["veth", "patch"])
def test_two_bridges_over_a_link(ovs: OvsSandbox, bridge_factory: BridgeFactory,
                                 kind: str) -> None:
    hv_a, hv_b = bridge_factory("hv-a", dpid=1), bridge_factory("hv-b", dpid=2)
    vm1 = ovs.add_vm_port(hv_a, "vm1", mac=MAC1, ip=f"{IP1}/24", ofport=1)
    vm2 = ovs.add_vm_port(hv_b, "vm2", mac=MAC2, ip=f"{IP2}/24", ofport=1)
    link = ovs.add_patch_or_veth_link(hv_a, 10, hv_b, 10, kind=kind)
    assert (ovs.ofport(link.port_a), ovs.ofport(link.port_b)) == (10, 10)
    for bridge in (hv_a, hv_b):
        ovs.add_flows(bridge, """
            priority=0,actions=drop
            priority=10,in_port=1,actions=output:10
            priority=10,arp,in_port=10,actions=output:1
            priority=10,ip,in_port=10,actions=ct(commit,zone=1),output:1
        """)
    assert ping(vm1, IP2) and ping(vm2, IP1)
    with tcp_server(vm2, 5001):
        assert tcp_connect(vm1, IP2, 5001)
    trace = ovs.trace(hv_a, SYN_1_TO_2)
    # A veth uplink ends the trace at hv-a's link port; a patch port continues into hv-b.
    assert trace.output_ports == ((10,) if kind == "veth" else ("vm2",))


def test_stop_removes_everything() -> None:
    require(unavailable_reason(), "Open vSwitch")
    sandbox = OvsSandbox().start()
    sandbox.add_bridge("br0")
    vm = sandbox.add_vm_port("br0", "vm1", mac=MAC1, ip=f"{IP1}/24", ofport=1)
    pids = [int((sandbox.dir / f"{d}.pid").read_text()) for d in ("ovsdb-server", "ovs-vswitchd")]
    sandbox.stop()
    assert not sandbox.dir.exists()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            check=False).stdout
    names = {line.split()[0] for line in listed.splitlines() if line.strip()}
    assert vm.netns not in names and sandbox.netns not in names
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z"
    sandbox.stop()  # twice is fine
