"""Compiled flows on real Open vSwitch: they load, and OVS's own verdicts (ofproto/trace with
--ct-next, and real packets between network namespaces) are the verdicts `explain` gives."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from controller.engine import Engine
from controller.events import PolicyChanged
from controller.flows.render import render_flows
from controller.model import VM
from controller.policy.explain import explain
from controller.scenario import Scenario, load_scenario
from tests.ovs.harness import EstablishedConnection, OvsSandbox, ping, tcp_connect, tcp_server
from tests.support import logout_event

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PROBES = [("tcp", 22), ("tcp", 80), ("tcp", 443), ("tcp", 5432), ("tcp", 8080), ("udp", 53), ("icmp", 0)]


@dataclass
class Fleet:
    ovs: OvsSandbox
    scenario: Scenario
    engine: Engine
    bridges: dict[str, str]  # hypervisor -> bridge name

    def load(self) -> None:
        for hv, br in self.bridges.items():
            self.ovs.replace_flows(br, render_flows(self.engine.desired(hv)))

    def vm(self, name: str) -> VM:
        vm = self.engine.world().inventory.vm_by_name(name)
        assert vm is not None
        return vm


def build_fleet(ovs: OvsSandbox, bridge_factory, path: Path) -> Fleet:
    sc = load_scenario(path)
    engine = Engine(sc.inventory, sc.directory, sc.policy, sc.groups)
    bridges = {hv.name: bridge_factory(f"gl{hv.name}", dpid=hv.dpid) for hv in sc.inventory.hypervisors.values()}
    (a, hva), (b, hvb) = [(bridges[n], sc.inventory.hypervisors[n]) for n in sorted(bridges)]
    ovs.add_patch_or_veth_link(a, hva.uplink_ofport, b, hvb.uplink_ofport)
    for vm in sc.inventory.vms.values():
        nic = vm.vnics[0]
        ovs.add_vm_port(bridges[vm.hypervisor], vm.name[:15], mac=nic.mac, ip=f"{nic.ips[0]}/24", ofport=nic.ofport,
                        external_ids={"iface-id": f"{vm.uuid}-0", "attached-mac": nic.mac, "vm-id": vm.uuid})
    fleet = Fleet(ovs, sc, engine, bridges)
    fleet.load()
    return fleet


def trace_flow(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, proto: str, port: int, in_port: int,
               sport: int = 40000) -> str:
    head = f"in_port={in_port},dl_src={src_mac},dl_dst={dst_mac}"
    if proto == "icmp":
        return f"{head},icmp,nw_src={src_ip},nw_dst={dst_ip},icmp_type=8,icmp_code=0"
    return f"{head},{proto},nw_src={src_ip},nw_dst={dst_ip},{proto}_src={sport},{proto}_dst={port}"


def traced_delivery(fleet: Fleet, src: VM, dst: VM, proto: str, port: int, state: str = "trk,new",
                    reply: bool = False, **spoof: str) -> bool:
    """Does a packet from src reach dst's port, per OVS's trace on each bridge it crosses?"""
    a, b = (dst, src) if reply else (src, dst)
    src_mac, src_ip = spoof.get("mac", a.vnics[0].mac), spoof.get("ip", a.ips[0])
    sport, dport = (port, 40000) if reply else (40000, port)
    flow = trace_flow(src_mac, b.vnics[0].mac, src_ip, b.ips[0], proto, dport, a.vnics[0].ofport, sport)
    if proto == "icmp" and reply:
        flow = flow.replace("icmp_type=8", "icmp_type=0")
    first = fleet.ovs.trace(fleet.bridges[a.hypervisor], flow, [state, state])
    if a.hypervisor == b.hypervisor:
        return first.output_ports == (b.vnics[0].ofport,)
    uplink = fleet.scenario.inventory.hypervisors[a.hypervisor].uplink_ofport
    if first.output_ports != (uplink,):
        return False
    up_in = fleet.scenario.inventory.hypervisors[b.hypervisor].uplink_ofport
    second = fleet.ovs.trace(fleet.bridges[b.hypervisor], flow.replace(f"in_port={a.vnics[0].ofport}", f"in_port={up_in}", 1), [state])
    return second.output_ports == (b.vnics[0].ofport,)


@pytest.mark.parametrize("example", ["three-tier.yaml", "finance-identity.yaml"])
def test_trace_verdicts_match_explain_for_every_pair(ovs: OvsSandbox, bridge_factory, example: str) -> None:
    fleet = build_fleet(ovs, bridge_factory, EXAMPLES / example)
    for hv, br in fleet.bridges.items():
        assert len(ovs.dump_flows(br)) == len(fleet.engine.desired(hv)), "OVS holds exactly the compiled flows"
    world = fleet.engine.world()
    vms = sorted(world.inventory.vms.values(), key=lambda v: v.name)
    mismatches, allowed = [], 0
    for src in vms:
        for dst in vms:
            if src is dst:
                continue
            for proto, port in PROBES:
                want = explain(world, fleet.scenario.groups, src, dst, proto, port).allowed
                got = traced_delivery(fleet, src, dst, proto, port)
                if got != want:
                    mismatches.append(f"{src.name}->{dst.name} {proto}/{port}: explain {want}, OVS {got}")
                if want:
                    allowed += 1
                    # The reply of an allowed connection passes; as a new connection it would not
                    # unless policy allows that direction too.
                    if not traced_delivery(fleet, src, dst, proto, port, state="trk,est,rpl", reply=True):
                        mismatches.append(f"reply {dst.name}->{src.name} {proto}/{port} dropped")
    assert not mismatches, "\n".join(mismatches)
    assert allowed > 0


def test_trace_drops_spoofed_sources(ovs: OvsSandbox, bridge_factory) -> None:
    fleet = build_fleet(ovs, bridge_factory, EXAMPLES / "three-tier.yaml")
    web1, app1, admin1 = fleet.vm("web1"), fleet.vm("app1"), fleet.vm("admin1")
    assert traced_delivery(fleet, web1, app1, "tcp", 8080)
    assert not traced_delivery(fleet, web1, app1, "tcp", 8080, ip="10.0.0.99")
    assert not traced_delivery(fleet, web1, app1, "tcp", 8080, mac="02:00:00:00:00:99")
    assert traced_delivery(fleet, admin1, app1, "tcp", 22)
    # web1's port claiming admin1's addresses does not inherit admin1's ssh grant.
    flow = trace_flow(admin1.vnics[0].mac, app1.vnics[0].mac, admin1.ips[0], app1.ips[0], "tcp", 22, web1.vnics[0].ofport)
    assert ovs.trace(fleet.bridges[web1.hypervisor], flow).dropped


def test_trace_drops_a_packet_to_one_vm_by_mac_and_another_by_ip(ovs: OvsSandbox, bridge_factory) -> None:
    """Egress judges the IPv4 destination, delivery follows the MAC: web1 may reach app1 on 8080
    but not admin1 beside it, so app1's address under admin1's MAC must not reach admin1."""
    fleet = build_fleet(ovs, bridge_factory, EXAMPLES / "three-tier.yaml")
    web1, app1, admin1 = fleet.vm("web1"), fleet.vm("app1"), fleet.vm("admin1")
    world = fleet.engine.world()
    assert explain(world, fleet.scenario.groups, web1, app1, "tcp", 8080).allowed
    assert not explain(world, fleet.scenario.groups, web1, admin1, "tcp", 8080).allowed
    assert web1.hypervisor == admin1.hypervisor
    crossed = trace_flow(web1.vnics[0].mac, admin1.vnics[0].mac, web1.ips[0], app1.ips[0], "tcp", 8080, web1.vnics[0].ofport)
    for state in ("trk,new", "trk,est"):
        assert ovs.trace(fleet.bridges[web1.hypervisor], crossed, [state, state]).dropped, state


def test_trace_established_connection_dropped_after_logout(ovs: OvsSandbox, bridge_factory) -> None:
    fleet = build_fleet(ovs, bridge_factory, EXAMPLES / "finance-identity.yaml")
    desk, ledger = fleet.vm("fin-desk1"), fleet.vm("ledger-db")
    assert traced_delivery(fleet, desk, ledger, "tcp", 5432, state="trk,est")
    logout(fleet, desk)
    fleet.load()
    assert not traced_delivery(fleet, desk, ledger, "tcp", 5432, state="trk,new")
    assert not traced_delivery(fleet, desk, ledger, "tcp", 5432, state="trk,est")
    # Other access stays: every desktop may still ping the ledger.
    assert traced_delivery(fleet, desk, ledger, "icmp", 0)


def logout(fleet: Fleet, vm: VM) -> None:
    fleet.engine.handle(logout_event(vm))


def test_real_packets_follow_policy_and_logout_cuts_an_established_connection(ovs: OvsSandbox, bridge_factory) -> None:
    fleet = build_fleet(ovs, bridge_factory, EXAMPLES / "finance-identity.yaml")
    vms = {name: ovs.vms[name] for name in ("fin-desk1", "fin-desk2", "eng-desk1", "ledger-db")}
    ledger_ip = fleet.vm("ledger-db").ips[0]
    with tcp_server(vms["ledger-db"], 5432):
        assert tcp_connect(vms["fin-desk1"], ledger_ip, 5432), "alice's finance desktop reaches the ledger"
        assert not tcp_connect(vms["fin-desk2"], ledger_ip, 5432, timeout=1.0), "bob's desktop does not"
        assert not tcp_connect(vms["eng-desk1"], ledger_ip, 5432, timeout=1.0)
        assert ping(vms["fin-desk2"], ledger_ip), "every desktop may ping the ledger"
        assert not ping(vms["ledger-db"], fleet.vm("fin-desk1").ips[0]), "the ledger may not ping desktops"
        assert not ping(vms["fin-desk1"], fleet.vm("fin-desk2").ips[0])
        with EstablishedConnection(vms["fin-desk1"], ledger_ip, 5432) as conn:
            assert conn.alive()
            logout(fleet, fleet.vm("fin-desk1"))
            fleet.load()
            ovs.wait_revalidated()
            assert not conn.alive(timeout=1.5), "the established connection outlived the logout"
        assert not tcp_connect(vms["fin-desk1"], ledger_ip, 5432, timeout=1.0)
        assert ping(vms["fin-desk1"], ledger_ip), "platform-based access stays"


def test_same_bridge_connection_is_judged_once_and_still_cut_when_its_rule_goes(ovs: OvsSandbox, bridge_factory) -> None:
    """web1 and app1 share hv1's bridge: the rules judge their packets at egress only, and the
    destination's zone only tracks them. Replies still pass, app1 still may not open a connection
    back, and an established connection dies with its rule."""
    fleet = build_fleet(ovs, bridge_factory, EXAMPLES / "three-tier.yaml")
    web1, app1 = fleet.vm("web1"), fleet.vm("app1")
    assert web1.hypervisor == app1.hypervisor
    world = fleet.engine.world()
    rule = explain(world, fleet.scenario.groups, web1, app1, "tcp", 8080).rule
    assert rule is not None and not explain(world, fleet.scenario.groups, app1, web1, "tcp", 8080).allowed
    with tcp_server(ovs.vms["app1"], 8080), tcp_server(ovs.vms["web1"], 8080):
        assert tcp_connect(ovs.vms["web1"], app1.ips[0], 8080)
        assert not tcp_connect(ovs.vms["app1"], web1.ips[0], 8080, timeout=1.0)
        with EstablishedConnection(ovs.vms["web1"], app1.ips[0], 8080) as conn:
            assert conn.alive()
            policy = fleet.scenario.policy
            rules = tuple(r for r in policy.rules if r.id != rule.id)
            fleet.engine.handle(PolicyChanged(replace(policy, rules=rules), fleet.scenario.groups))
            fleet.load()
            ovs.wait_revalidated()
            assert not conn.alive(timeout=1.5), "the established connection outlived its rule"
        assert not tcp_connect(ovs.vms["web1"], app1.ips[0], 8080, timeout=1.0)
