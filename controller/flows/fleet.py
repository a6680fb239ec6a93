"""Simulate packets across a fleet of compiled bridges joined by their uplinks.

The fabric behind the uplinks delivers by destination MAC: to the hypervisor hosting that vNIC,
or out to the gateway. Each bridge keeps its own conntrack, as each hypervisor does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from controller.flows.evaluate import Conntrack, FlowTable, Packet, Result, evaluate
from controller.flows.types import (
    ETH_TYPE_IP,
    IP_PROTO_ICMP,
    IP_PROTO_TCP,
    IP_PROTO_UDP,
    FlowSpec,
    ip_to_int,
    mac_to_int,
)
from controller.model import VM, Inventory


@dataclass(frozen=True)
class Delivery:
    """Where a packet ended up: ("vm", name) / ("gateway", ip) / ("dropped", hypervisor)."""

    kind: str
    where: str
    hops: tuple[tuple[str, Result], ...]  # (hypervisor, what its bridge did)

    @property
    def delivered(self) -> bool:
        return self.kind != "dropped"


@dataclass
class Fleet:
    inventory: Inventory
    tables: dict[str, FlowTable]
    conntrack: dict[str, Conntrack] = field(default_factory=dict)

    @staticmethod
    def of(inventory: Inventory, flows: Mapping[str, frozenset[FlowSpec]]) -> Fleet:
        return Fleet(inventory, {hv: FlowTable(f) for hv, f in flows.items()},
                     {hv: Conntrack() for hv in flows})

    def reprogram(self, flows: Mapping[str, frozenset[FlowSpec]]) -> None:
        """New flows, same conntrack: what a policy change does to live connections."""
        self.tables = {hv: FlowTable(f) for hv, f in flows.items()}

    def send(self, src: VM, packet: Packet) -> Delivery:
        nic = src.vnics[0]
        pkt = dict(packet, in_port=nic.ofport or 0)
        return self._through(src.hypervisor, pkt, ())

    def _through(self, hv: str, pkt: Packet, hops: tuple[tuple[str, Result], ...]) -> Delivery:
        result = evaluate(self.tables[hv], pkt, self.conntrack[hv])
        hops = hops + ((hv, result),)
        uplink = self.inventory.hypervisors[hv].uplink_ofport
        for port in result.outputs:
            if port == uplink and pkt.get("in_port") != uplink:
                return self._across_fabric(dict(result.packet), hops)
            vm = self._vm_at(hv, port)
            if vm is not None:
                return Delivery("vm", vm.name, hops)
        return Delivery("dropped", hv, hops)

    def _across_fabric(self, pkt: Packet, hops: tuple[tuple[str, Result], ...]) -> Delivery:
        gw = self.inventory.gateway
        if gw is not None and pkt.get("eth_dst") == mac_to_int(gw.mac):
            return Delivery("gateway", gw.ip, hops)
        for vm in self.inventory.vms.values():
            if any(mac_to_int(n.mac) == pkt.get("eth_dst") for n in vm.vnics):
                up = self.inventory.hypervisors[vm.hypervisor].uplink_ofport
                if up is None or vm.hypervisor == hops[-1][0]:
                    break
                # Registers and conntrack state stay on the bridge that set them.
                clean = {k: v for k, v in pkt.items() if not k.startswith("reg") and k not in ("ct_state", "ct_mark")}
                return self._through(vm.hypervisor, dict(clean, in_port=up), hops)
        return Delivery("dropped", "fabric", hops)

    def _vm_at(self, hv: str, port: int) -> VM | None:
        return next((vm for vm in self.inventory.vms.values() if vm.hypervisor == hv
                     and any(n.ofport == port for n in vm.vnics)), None)

    def send_external(self, hv: str, packet: Packet) -> Delivery:
        """A packet arriving from beyond the uplink of `hv` (from the gateway)."""
        up = self.inventory.hypervisors[hv].uplink_ofport
        return self._through(hv, dict(packet, in_port=up or 0), ())


def ip_packet(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, protocol: str, dport: int,
              sport: int = 40000) -> Packet:
    pkt: Packet = {
        "eth_src": mac_to_int(src_mac), "eth_dst": mac_to_int(dst_mac), "eth_type": ETH_TYPE_IP,
        "ipv4_src": ip_to_int(src_ip), "ipv4_dst": ip_to_int(dst_ip),
    }
    if protocol == "tcp":
        pkt.update(ip_proto=IP_PROTO_TCP, tcp_src=sport, tcp_dst=dport)
    elif protocol == "udp":
        pkt.update(ip_proto=IP_PROTO_UDP, udp_src=sport, udp_dst=dport)
    else:
        pkt.update(ip_proto=IP_PROTO_ICMP, icmpv4_type=8)
    return pkt


def reply_of(pkt: Packet) -> Packet:
    """The answer to `pkt`: addresses and ports swapped."""
    out = dict(pkt)
    out["eth_src"], out["eth_dst"] = pkt["eth_dst"], pkt["eth_src"]
    out["ipv4_src"], out["ipv4_dst"] = pkt["ipv4_dst"], pkt["ipv4_src"]
    for s, d in (("tcp_src", "tcp_dst"), ("udp_src", "udp_dst")):
        if s in pkt:
            out[s], out[d] = pkt[d], pkt[s]
    if pkt.get("ip_proto") == IP_PROTO_ICMP:
        out["icmpv4_type"] = 0
    out.pop("in_port", None)
    return out
