"""What one hypervisor's OVSDB says about its bridge, as immutable values (pure: no ovs, no I/O).

libvirt and Nova bind a VM's vNIC to its OVS interface through ``Interface.external_ids``
(``iface-id``, ``attached-mac``, ``vm-id`` or ``vm-uuid``); OVS assigns the OpenFlow port
number (``Interface.ofport``). This module turns plain row dicts — what ``topology.ovsdb``
copies out of the python-ovs IDL — into an `ObservedBridge`, and says loudly what is wrong
with it. Keeping the conversion here means it is unit-tested without an OVSDB.

Row dicts take OVSDB's own shapes as python-ovs gives them: an optional column is ``[]`` or
``[value]`` (a plain value or None is accepted too), maps are dicts, references are names.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from controller.events import BoundPort, PortsObserved
from controller.model import normalize_mac

# external_ids keys set by libvirt (<virtualport type='openvswitch'>) and Nova.
IFACE_ID = "iface-id"
ATTACHED_MAC = "attached-mac"
VM_ID_KEYS = ("vm-id", "vm-uuid")  # libvirt writes vm-id; Nova/XenServer style writes vm-uuid
UPLINK_KEY = "goldilocks-uplink"
SECURE = "secure"

Row = Mapping[str, Any]


@dataclass(frozen=True, order=True)
class ObservedPort:
    """One interface on the bridge, with the VM binding its external_ids claim."""

    name: str  # Interface.name
    ofport: int | None  # None while OVS has not assigned one, or attaching failed (-1)
    mac: str | None  # external_ids:attached-mac, normalized; None if absent or invalid
    iface_id: str | None
    vm_uuid: str | None  # external_ids vm-id or vm-uuid, lower-cased
    uplink: bool  # named as an uplink in the config, or external_ids:goldilocks-uplink=true

    @property
    def is_vm_port(self) -> bool:
        """A port libvirt/Nova attached for a VM (not an uplink, not an unrelated port)."""
        return not self.uplink and (self.vm_uuid is not None or self.iface_id is not None)


@dataclass(frozen=True)
class ObservedBridge:
    """A full snapshot of one hypervisor bridge: compare two snapshots to see a change."""

    hypervisor: str
    bridge: str
    dpid: int | None
    fail_mode: str | None  # "secure" | "standalone" | None (OVS then behaves as standalone)
    datapath_type: str
    ports: tuple[ObservedPort, ...]  # sorted by name; the bridge's own internal port excluded
    # Faults found while converting rows (bad MAC text, failed interface) that the values
    # above can no longer show; bridge_problems() reports them with the rest.
    row_problems: tuple[str, ...] = ()

    @property
    def uplink_ofport(self) -> int | None:
        """The first uplink port's ofport (ports are sorted by name, so this is stable)."""
        return next((p.ofport for p in self.ports if p.uplink), None)

    def bound_ports(self) -> tuple[BoundPort, ...]:
        """VM ports complete enough to enforce policy on: ofport, MAC and VM all known."""
        return tuple(sorted(
            BoundPort(p.ofport, p.mac, p.vm_uuid)
            for p in self.ports
            if p.is_vm_port and p.ofport is not None and p.mac and p.vm_uuid
        ))

    def to_event(self) -> PortsObserved:
        """The engine's view of this snapshot."""
        return PortsObserved(self.hypervisor, self.dpid, self.uplink_ofport, self.bound_ports())


# --------------------------------------------------------------------------- problems


def bridge_problems(b: ObservedBridge) -> list[str]:
    """Human messages for everything that weakens enforcement on this bridge (empty = fine)."""
    where = f"{b.hypervisor}/{b.bridge}"
    return [
        *_fail_mode_problems(b, where),
        *list(b.row_problems),
        *_ofport_problems(b, where),
        *_mac_problems(b, where),
        *_uplink_problems(b, where),
    ]


def _fail_mode_problems(b: ObservedBridge, where: str) -> list[str]:
    if b.fail_mode == SECURE:
        return []
    shown = b.fail_mode or "unset (standalone)"
    return [(f"bridge {where} has fail_mode={shown}, not secure: a controller outage would make "
             f"it a learning switch that forwards everything "
             f"(fix: ovs-vsctl set-fail-mode {b.bridge} secure)")]


def _ofport_problems(b: ObservedBridge, where: str) -> list[str]:
    return [f"port {p.name} on {where} has no OpenFlow port number (not assigned yet, or "
            f"the interface failed to attach: see Interface.error); no flows can name it"
            for p in b.ports if p.ofport is None]


def _mac_problems(b: ObservedBridge, where: str) -> list[str]:
    problems = [f"VM port {p.name} on {where} (vm {p.vm_uuid or '?'}, iface-id "
                f"{p.iface_id or '?'}) has no valid external_ids:attached-mac; the VM "
                f"cannot be bound to it"
                for p in b.ports if p.is_vm_port and p.mac is None]
    owners = Counter(p.mac for p in b.ports if p.mac is not None)
    for mac, count in sorted(owners.items()):
        if count > 1:
            names = ", ".join(p.name for p in b.ports if p.mac == mac)
            problems.append(f"ports {names} on {where} all claim attached-mac {mac}; "
                            f"anti-spoofing cannot tell them apart")
    return problems


def _uplink_problems(b: ObservedBridge, where: str) -> list[str]:
    uplinks = [p.name for p in b.ports if p.uplink]
    if len(uplinks) <= 1:
        return []
    return [(f"bridge {where} has {len(uplinks)} uplinks ({', '.join(uplinks)}); only the "
             f"first, {uplinks[0]}, is used")]


# --------------------------------------------------------------------------- conversion


def from_rows(
    hypervisor: str,
    bridge: str,
    bridge_row: Row,
    port_rows: Iterable[Row],
    interface_rows: Iterable[Row],
    uplinks: Collection[str],
) -> ObservedBridge:
    """Build a snapshot from plain rows.

    ``bridge_row``: name, datapath_id, fail_mode, datapath_type, and optionally ``ports``
    (port names): when given, only those of ``port_rows`` are this bridge's.
    ``port_rows``: name, interfaces (interface names). ``interface_rows``: name, ofport,
    external_ids; rows no port of the bridge references are ignored, so a caller may pass
    every interface of the database. ``uplinks`` names uplink ports or interfaces.
    """
    problems: list[str] = []
    where = f"{hypervisor}/{bridge}"
    interfaces = {str(row["name"]): row for row in interface_rows}
    ports: list[ObservedPort] = []
    for port_name, iface_name in _bridge_interfaces(bridge_row, port_rows):
        if iface_name == bridge:
            continue  # the bridge's own internal port: the host stack, never a VM or uplink
        row = interfaces.get(iface_name)
        if row is None:
            continue  # the IDL has not seen the row yet; the next snapshot will have it
        uplink = port_name in uplinks or iface_name in uplinks
        ports.append(_observed_port(row, uplink, where, problems))
    return ObservedBridge(
        hypervisor=hypervisor,
        bridge=bridge,
        dpid=_dpid(bridge_row.get("datapath_id"), where, problems),
        fail_mode=_optional_str(bridge_row.get("fail_mode")),
        datapath_type=_optional_str(bridge_row.get("datapath_type")) or "",
        ports=tuple(sorted(ports)),
        row_problems=tuple(problems),
    )


def _bridge_interfaces(bridge_row: Row, port_rows: Iterable[Row]) -> list[tuple[str, str]]:
    """(port name, interface name) for every interface of the bridge's ports."""
    wanted = bridge_row.get("ports")
    names = None if wanted is None else {str(n) for n in wanted}
    pairs = []
    for port in port_rows:
        port_name = str(port["name"])
        if names is not None and port_name not in names:
            continue
        pairs.extend((port_name, str(iface)) for iface in port.get("interfaces", ()))
    return pairs


def _observed_port(row: Row, uplink: bool, where: str, problems: list[str]) -> ObservedPort:
    name = str(row["name"])
    ids: Mapping[str, str] = row.get("external_ids") or {}
    return ObservedPort(
        name=name,
        ofport=_ofport(row.get("ofport"), name, where, problems),
        mac=_mac(ids.get(ATTACHED_MAC), name, where, problems),
        iface_id=_text(ids.get(IFACE_ID)),
        vm_uuid=_vm_uuid(ids, name, where, problems),
        uplink=uplink or ids.get(UPLINK_KEY, "").strip().lower() == "true",
    )


def _ofport(value: Any, name: str, where: str, problems: list[str]) -> int | None:
    ofport = _optional(value)
    if ofport is None:
        return None
    try:
        number = int(ofport)
    except (TypeError, ValueError):
        problems.append(f"port {name} on {where} has a non-numeric ofport {ofport!r}")
        return None
    if number == -1:
        # OVS writes -1 when it could not add the interface (missing device, bad type...).
        problems.append(f"port {name} on {where} failed to attach (ofport -1): see "
                        f"ovs-vsctl get Interface {name} error")
        return None
    return number if number > 0 else None


def _mac(value: str | None, name: str, where: str, problems: list[str]) -> str | None:
    text = _text(value)
    if text is None:
        return None
    try:
        return normalize_mac(text)
    except ValueError:
        problems.append(f"port {name} on {where} has an invalid external_ids:attached-mac "
                        f"{text!r}; ignored")
        return None


def _vm_uuid(ids: Mapping[str, str], name: str, where: str, problems: list[str]) -> str | None:
    claims = {key: v.lower() for key in VM_ID_KEYS if (v := _text(ids.get(key))) is not None}
    if len(set(claims.values())) > 1:
        problems.append(f"port {name} on {where} names two VMs: "
                        + ", ".join(f"{k}={v}" for k, v in claims.items())
                        + f"; using {VM_ID_KEYS[0]}")
    # vm-id first: libvirt sets it from the domain UUID, the identity the inventory uses.
    return next((claims[key] for key in VM_ID_KEYS if key in claims), None)


def _dpid(value: Any, where: str, problems: list[str]) -> int | None:
    text = _optional_str(value)
    if text is None:
        return None  # ovs-vswitchd fills it in shortly after the bridge is created
    try:
        return int(text, 16)
    except ValueError:
        problems.append(f"bridge {where} has an unreadable datapath_id {text!r}")
        return None


def _optional(value: Any) -> Any:
    """OVSDB's optional column ([] or [x]) or a plain value, as x or None."""
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def _optional_str(value: Any) -> str | None:
    return _text(_optional(value))


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None
