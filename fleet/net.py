"""The simulated fleet on Mininet: one OVS switch per hypervisor, one host per VM.

    host (VM netns)  eth0 --veth-- <p>vN  hypervisor switch <p>hN  <p>uN --veth-- <p>fN  fabric <p>f
                                         (netdev, fail_mode=secure,                (standalone
                                          controller = Goldilocks)                  learning switch)

Every interface in the root namespace carries the fleet's random prefix <p>, so two fleets (or
a fleet and the OVS test sandboxes) never touch each other's devices. A VM's switch port gets
the external_ids libvirt would set (`iface-id`, `attached-mac`, `vm-id`) in the same OVSDB
transaction that creates it, so the controller binds it to the VM as soon as it has an ofport.
"""

from __future__ import annotations

import re
import secrets
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mininet.net import Mininet
from mininet.node import Host, OVSSwitch, RemoteController
from mininet.topo import Topo

from controller.model import Inventory
from fleet.ovs import PrivateOvs

PROTOCOLS = "OpenFlow13,OpenFlow14"


# --------------------------------------------------------------------------- the plan (pure)


@dataclass(frozen=True)
class VmPlan:
    name: str
    uuid: str
    hypervisor: str
    mac: str
    ip: str  # with its prefix length: 10.0.0.11/24
    port: str  # the switch-side interface name
    ofport: int

    @property
    def address(self) -> str:
        return self.ip.split("/", 1)[0]

    def external_ids(self) -> dict[str, str]:
        """What libvirt writes for `<virtualport type='openvswitch'>` (docs/topology.md)."""
        return {"iface-id": f"{self.uuid}-{self.mac}", "attached-mac": self.mac, "vm-id": self.uuid}


@dataclass(frozen=True)
class HypervisorPlan:
    name: str
    switch: str
    dpid: int
    uplink: str  # the hypervisor-side interface of its link to the fabric
    uplink_ofport: int
    fabric_port: str


@dataclass(frozen=True)
class FleetPlan:
    prefix: str
    hypervisors: tuple[HypervisorPlan, ...]
    vms: tuple[VmPlan, ...]

    @property
    def fabric(self) -> str:
        return f"{self.prefix}f"

    def hypervisor(self, name: str) -> HypervisorPlan:
        return next(hv for hv in self.hypervisors if hv.name == name)

    def vm(self, name: str) -> VmPlan:
        return next(vm for vm in self.vms if vm.name == name)


def new_prefix() -> str:
    """A short random prefix: `<prefix>v12` must fit the 15-character interface names."""
    return "g" + secrets.token_hex(2)


def plan_fleet(inventory: Inventory, prefix: str) -> FleetPlan:
    """Names, ports and addresses for every hypervisor and VM of an inventory.

    VM ports are numbered per hypervisor from 1 in the inventory's order (the scenario's own
    ofport when it gives one); the uplink keeps the scenario's uplink port (default 100).
    """
    hvs = []
    for index, hv in enumerate(sorted(inventory.hypervisors.values(), key=lambda h: h.name), start=1):
        hvs.append(HypervisorPlan(hv.name, f"{prefix}h{index}", hv.dpid or index, f"{prefix}u{index}",
                                  hv.uplink_ofport or 100, f"{prefix}f{index}"))
    vms, used = [], {hv.name: {hv.uplink_ofport} for hv in hvs}
    for index, vm in enumerate(sorted(inventory.vms.values(), key=lambda v: v.name), start=1):
        nic = vm.vnics[0]
        taken = used[vm.hypervisor]
        ofport = nic.ofport if nic.ofport and nic.ofport not in taken else free_ofport(taken)
        used[vm.hypervisor].add(ofport)
        vms.append(VmPlan(vm.name, vm.uuid, vm.hypervisor, nic.mac, f"{nic.ips[0]}/24",
                          f"{prefix}v{index}", ofport))
    return FleetPlan(prefix, tuple(hvs), tuple(vms))


def free_ofport(taken: Iterable[int]) -> int:
    """The lowest port number not taken (a VM port, or the uplink)."""
    return min(set(range(1, 1000)) - set(taken))


# --------------------------------------------------------------------------- Mininet


class HypervisorSwitch(OVSSwitch):
    """An OVSSwitch whose VM ports carry libvirt's external_ids from the moment they exist."""

    def __init__(self, name: str, external_ids: dict[str, dict[str, str]] | None = None, **params: object):
        super().__init__(name, **params)
        self.external_ids = external_ids or {}

    def intfOpts(self, intf: object) -> str:
        opts = super().intfOpts(intf)
        ids = self.external_ids.get(str(intf), {})
        return opts + "".join(f" external_ids:{key}={shlex.quote(value)}" for key, value in ids.items())


class FabricSwitch(OVSSwitch):
    """The network between hypervisors: a learning switch with no controller."""

    def start(self, controllers: list[object]) -> None:
        super().start([])


class FleetTopo(Topo):
    """N hypervisor switches with their VM hosts, each hypervisor linked to one fabric switch."""

    def build(self, plan: FleetPlan, run_dir: str) -> None:  # type: ignore[override]
        fabric = self.addSwitch(plan.fabric, cls=FabricSwitch, failMode="standalone", datapath="user",
                                dpid=f"{0xfab:016x}")
        for hv in plan.hypervisors:
            ids = {vm.port: vm.external_ids() for vm in plan.vms if vm.hypervisor == hv.name}
            self.addSwitch(hv.switch, cls=HypervisorSwitch, external_ids=ids, failMode="secure",
                           datapath="user", protocols=PROTOCOLS, dpid=f"{hv.dpid:016x}")
            self.addLink(hv.switch, fabric, port1=hv.uplink_ofport, intfName1=hv.uplink,
                         intfName2=hv.fabric_port)
        for vm in plan.vms:
            # Each VM sees only its own agent channel and utmp file (docs/agent.md).
            self.addHost(vm.name, ip=vm.ip, mac=vm.mac,
                         privateDirs=[("/run/goldilocks", f"{run_dir}/%(name)s")])
            self.addLink(vm.name, plan.hypervisor(vm.hypervisor).switch, port2=vm.ofport,
                         intfName1="eth0", intfName2=vm.port, addr1=vm.mac)


@dataclass
class Fleet:
    """A running Mininet fleet; `stop()` removes every switch, link, host and mount it made."""

    plan: FleetPlan
    ovs: PrivateOvs
    net: Mininet
    where: dict[str, str]  # VM name -> hypervisor it is plugged on now
    ofports: dict[str, int]  # VM name -> its port number there

    @staticmethod
    def start(plan: FleetPlan, ovs: PrivateOvs, controller: tuple[str, int], run_dir: Path) -> Fleet:
        net = Mininet(topo=FleetTopo(plan=plan, run_dir=str(run_dir)), switch=OVSSwitch, host=Host,
                      controller=None, build=False, autoSetMacs=False, autoStaticArp=False)
        net.addController(RemoteController("c0", ip=controller[0], port=controller[1]))
        fleet = Fleet(plan, ovs, net, {vm.name: vm.hypervisor for vm in plan.vms},
                      {vm.name: vm.ofport for vm in plan.vms})
        try:
            net.build()
            net.start()
            fleet._tx_off()
        except BaseException:
            fleet.stop()
            raise
        return fleet

    def _tx_off(self) -> None:
        # The userspace datapath does not fill in checksums the kernel left to the NIC:
        # without this TCP fails while ping works.
        for vm in self.plan.vms:
            self.host(vm.name).cmd("ethtool -K eth0 tx off")
        for hv in self.plan.hypervisors:
            for intf in (hv.uplink, hv.fabric_port):
                self.net.getNodeByName(hv.switch).cmd(f"ethtool -K {intf} tx off")

    def stop(self) -> None:
        self.net.stop()
        for controller in self.net.controllers:
            # RemoteController.stop() does nothing on purpose; its helper shell must still go.
            controller.terminate()

    def host(self, vm: str) -> Host:
        return self.net.getNodeByName(vm)

    def switch_of(self, hypervisor: str) -> str:
        return self.plan.hypervisor(hypervisor).switch

    def migrate(self, vm: str, to: str) -> int:
        """Move the VM's port to another hypervisor's switch in one OVSDB transaction, with its
        external_ids, as a live migration leaves it; returns its new ofport."""
        plan = self.plan.vm(vm)
        old = self.switch_of(self.where[vm])
        taken = [self.plan.hypervisor(to).uplink_ofport] + [p for n, p in self.ofports.items() if self.where[n] == to]
        ofport = free_ofport(taken)
        ids = [f"external_ids:{k}={v}" for k, v in plan.external_ids().items()]
        self.ovs.vsctl("del-port", old, plan.port, "--", "add-port", self.switch_of(to), plan.port,
                       "--", "set", "Interface", plan.port, f"ofport_request={ofport}", *ids)
        self.where[vm], self.ofports[vm] = to, ofport
        return ofport

    def set_uplink(self, hypervisor: str, up: bool) -> None:
        hv = self.plan.hypervisor(hypervisor)
        self.net.getNodeByName(hv.switch).cmd(f"ip link set {hv.uplink} {'up' if up else 'down'}")

    def local_flows(self, hypervisor: str, vm: str, ofport: int) -> list[str]:
        """Flows on a hypervisor's bridge that treat the VM as local on port `ofport`: its
        port classifier (eth_src), delivery to it, its ingress policy. Flows that send its
        MAC to the uplink (the VM is remote there) do not count."""
        plan = self.plan.vm(vm)
        uplink = self.plan.hypervisor(hypervisor).uplink_ofport
        return [flow for flow in self.ovs.dump_flows(self.switch_of(hypervisor))
                if f"eth_src={plan.mac}" in flow or _names_port(flow, ofport)
                or (f"eth_dst={plan.mac}" in flow and f"output:{uplink}" not in flow)]


def _names_port(flow: str, ofport: int) -> bool:
    return re.search(rf"(in_port|reg7)=(0x{ofport:x}|{ofport})\b|output:{ofport}\b", flow) is not None
