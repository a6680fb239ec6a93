"""The flow compiler: (inventory, group members, policy, hypervisor) -> frozenset[FlowSpec].

A bridge's flows are the union of independent *parts* (the fixed pipeline, one part per local
port, one per known address, one per rule). Parts are what incremental recompute replaces, so
each part depends only on the inputs it names. docs/pipeline.md walks a packet through.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache

from controller.flows.pipeline import (
    CT_MARK_REVOKED,
    PRIO_CHECKED_AT_EGRESS,
    PRIO_CT_ALLOW_REPLY,
    PRIO_CT_GUARD,
    PRIO_DEFAULT,
    PRIO_QUARANTINE_ALLOW,
    PRIO_QUARANTINE_DENY,
    PRIO_REVOKE_EST,
    REG_FROM_VNIC,
    REG_OUT_PORT,
    REG_ZONE,
    CookieKind,
    Table,
    check_flow,
    cookie,
    quarantine_cookie,
    rule_cookie,
    rule_priority,
)
from controller.flows.types import (
    CT_EST,
    CT_INV,
    CT_NEW,
    CT_REL,
    CT_RPL,
    CT_TRK,
    ETH_TYPE_ARP,
    ETH_TYPE_IP,
    IP_PROTO_ICMP,
    IP_PROTO_TCP,
    IP_PROTO_UDP,
    Action,
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
    ip_to_int,
    mac_to_int,
)
from controller.model import VM, Gateway, Hypervisor, Inventory, Port, VNic
from controller.policy.schema import (
    Action as RuleAction,
)
from controller.policy.schema import (
    AnyEndpoint,
    AppService,
    CidrEndpoint,
    Endpoint,
    GroupEndpoint,
    Policy,
    Rule,
)

Flows = frozenset[FlowSpec]
PartKey = tuple[str, ...]


@dataclass(frozen=True)
class World:
    """Everything the compiler reads. VMs are *effective* (directory groups already derived)."""

    inventory: Inventory
    members: Mapping[str, frozenset[str]]  # group name -> VM uuids
    policy: Policy
    # Quarantined VMs (uuid -> reasons) and the group that stays reachable from them.
    quarantined: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    remediation_group: str | None = None


def _flow(table: Table, priority: int, match: Match, actions: Iterable[Action], ck: int, origin: str) -> FlowSpec:
    return FlowSpec(int(table), priority, match, tuple(actions), ck, origin)


def _ct_state(*, on: int, off: int = 0) -> tuple[int, int]:
    return (on | CT_TRK, on | off | CT_TRK)


CT_NEW_ORIG = _ct_state(on=CT_NEW, off=CT_RPL)
CT_EST_ORIG = _ct_state(on=CT_EST, off=CT_RPL)


# ---- the fixed pipeline ----------------------------------------------------------------------


def pipeline_part(hv: Hypervisor) -> Flows:
    ck = cookie(CookieKind.PIPELINE, 0)
    o = "pipeline"
    flows = [_flow(t, PRIO_DEFAULT, Match(), (), ck, o) for t in Table]
    flows = [f for f in flows if f.table not in (Table.EGRESS_MONITOR, Table.INGRESS_MONITOR)]
    ip = Match.of(eth_type=ETH_TYPE_IP)
    for ct_table, monitor, policy, after in (
        (Table.EGRESS_CT, Table.EGRESS_MONITOR, Table.EGRESS_POLICY, Table.L2_LOOKUP),
        (Table.INGRESS_CT, Table.INGRESS_MONITOR, Table.INGRESS_POLICY, Table.ACCEPT),
    ):
        flows.append(_flow(ct_table, 1, ip, (Ct(REG_ZONE.field, table=int(monitor)),), ck, o))
        flows.append(_flow(monitor, PRIO_DEFAULT, Match(), (GotoTable(int(policy)),), ck, o))
        flows.extend(_conntrack_guards(policy, after, ck))
    flows.extend(_checked_at_egress(ck))
    return frozenset(flows)


def _checked_at_egress(ck: int) -> list[FlowSpec]:
    """A packet from a local vNIC that reaches INGRESS_POLICY has passed EGRESS_POLICY on this
    bridge, where the same rules saw the same source, destination and service: it is not
    judged twice, only committed in the destination's zone so that its replies are tracked
    there. L2_LOOKUP delivers only packets whose IPv4 destination is the vNIC's own, so the
    destination judged at egress (by address) is the one ingress would judge (by port)."""
    accept = GotoTable(int(Table.ACCEPT))
    return [
        _flow(Table.INGRESS_POLICY, PRIO_CHECKED_AT_EGRESS,
              Match.of(**{REG_FROM_VNIC.field: 1}, ct_state=state, eth_type=ETH_TYPE_IP), actions, ck, "pipeline:checked-at-egress")
        for state, actions in ((CT_NEW_ORIG, (Ct(REG_ZONE.field, commit=True), accept)), (CT_EST_ORIG, (accept,)))
    ]


def _conntrack_guards(policy: Table, after: Table, ck: int) -> list[FlowSpec]:
    o = "pipeline:conntrack"
    revoke = Ct(REG_ZONE.field, commit=True, set_mark=CT_MARK_REVOKED)
    return [
        _flow(policy, PRIO_CT_GUARD + 1, Match.of(ct_state=_ct_state(on=CT_INV)), (), ck, o),
        _flow(policy, PRIO_CT_GUARD, Match.of(ct_state=_ct_state(on=0), ct_mark=(CT_MARK_REVOKED, CT_MARK_REVOKED)), (), ck, o),
        # Replies of connections some rule allowed; their originals are re-checked every packet.
        _flow(policy, PRIO_CT_ALLOW_REPLY + 1, Match.of(ct_state=_ct_state(on=CT_EST | CT_RPL)), (GotoTable(int(after)),), ck, o),
        _flow(policy, PRIO_CT_ALLOW_REPLY, Match.of(ct_state=_ct_state(on=CT_REL)), (GotoTable(int(after)),), ck, o),
        # An original-direction packet no rule grants any more: mark the connection so its
        # replies stop too, then drop.
        _flow(policy, PRIO_REVOKE_EST, Match.of(ct_state=CT_EST_ORIG, eth_type=ETH_TYPE_IP), (revoke,), ck, o),
    ]


# ---- ports and addresses ---------------------------------------------------------------------


def port_part(nic: VNic, hv: Hypervisor) -> Flows:
    """Anti-spoofing, zone and delivery for one vNIC bound to this bridge."""
    if nic.ofport is None:
        return frozenset()
    p, mac, ck, o = nic.ofport, nic.mac, cookie(CookieKind.PORT, nic.ofport), f"port:{nic.name or nic.mac}"
    flows = [_flow(Table.ACCEPT, 100, Match.of(reg7=p), (Output(p),), ck, o)]
    for ip in nic.ips:
        # Delivered only when addressed to the vNIC at both layers (see _checked_at_egress).
        flows.append(_flow(Table.L2_LOOKUP, 100, Match.of(eth_dst=mac, eth_type=ETH_TYPE_IP, ipv4_dst=ip),
                           (SetField(REG_OUT_PORT.field, p), SetField(REG_ZONE.field, p), GotoTable(int(Table.INGRESS_CT))),
                           ck, o))
        flows.append(_flow(Table.CLASSIFY, 100, Match.of(in_port=p, eth_src=mac, eth_type=ETH_TYPE_IP, ipv4_src=ip),
                           (SetField(REG_ZONE.field, p), SetField(REG_FROM_VNIC.field, 1), GotoTable(int(Table.EGRESS_CT))),
                           ck, o))
        flows.append(_flow(Table.CLASSIFY, 100, Match.of(in_port=p, eth_src=mac, eth_type=ETH_TYPE_ARP, arp_spa=ip, arp_sha=mac),
                           (GotoTable(int(Table.ARP)),), ck, o))
        if hv.uplink_ofport is not None:
            # Nobody beyond the uplink may speak with a local VM's addresses.
            up = hv.uplink_ofport
            flows.append(_flow(Table.CLASSIFY, 200, Match.of(in_port=up, eth_type=ETH_TYPE_IP, ipv4_src=ip), (), ck, o))
            flows.append(_flow(Table.CLASSIFY, 200, Match.of(in_port=up, eth_type=ETH_TYPE_ARP, arp_spa=ip), (), ck, o))
    if hv.uplink_ofport is not None:
        flows.append(_flow(Table.CLASSIFY, 210, Match.of(in_port=hv.uplink_ofport, eth_src=mac), (), ck, o))
    return frozenset(flows)


def uplink_part(hv: Hypervisor) -> Flows:
    if hv.uplink_ofport is None:
        return frozenset()
    up, ck, o = hv.uplink_ofport, cookie(CookieKind.UPLINK, hv.uplink_ofport), "uplink"
    return frozenset({
        _flow(Table.CLASSIFY, 10, Match.of(in_port=up, eth_type=ETH_TYPE_IP), (GotoTable(int(Table.L2_LOOKUP)),), ck, o),
        _flow(Table.CLASSIFY, 10, Match.of(in_port=up, eth_type=ETH_TYPE_ARP), (GotoTable(int(Table.ARP)),), ck, o),
    })


def _arp_answer(ip: str, mac: str, ck: int, origin: str) -> FlowSpec:
    """Answer an ARP request for `ip` with `mac` on the bridge itself: nothing is flooded."""
    return _flow(Table.ARP, 100, Match.of(eth_type=ETH_TYPE_ARP, arp_op=1, arp_tpa=ip), (
        Move("eth_src", "eth_dst"), SetField("eth_src", mac_to_int(mac)), SetField("arp_op", 2),
        Move("arp_sha", "arp_tha"), Move("arp_spa", "arp_tpa"),
        SetField("arp_sha", mac_to_int(mac)), SetField("arp_spa", ip_to_int(ip)), OutputInPort(),
    ), ck, origin)


def address_part(nic: VNic, local: bool, hv: Hypervisor) -> Flows:
    """ARP answers for a vNIC anywhere in the fleet, and L2 delivery to it if it is remote."""
    ck = cookie(CookieKind.ADDRESS, mac_to_int(nic.mac) & ((1 << 40) - 1))
    o = f"address:{nic.mac}"
    flows = {_arp_answer(ip, nic.mac, ck, o) for ip in nic.ips}
    if not local and hv.uplink_ofport is not None:
        flows.add(_flow(Table.L2_LOOKUP, 100, Match.of(eth_dst=nic.mac), (Output(hv.uplink_ofport),), ck, o))
    return frozenset(flows)


def gateway_part(gw: Gateway | None, hv: Hypervisor) -> Flows:
    if gw is None or hv.uplink_ofport is None:
        return frozenset()
    ck, o = cookie(CookieKind.ADDRESS, (1 << 40) - 1), "gateway"
    return frozenset({
        _arp_answer(gw.ip, gw.mac, ck, o),
        _flow(Table.L2_LOOKUP, 90, Match.of(eth_dst=gw.mac), (Output(hv.uplink_ofport),), ck, o),
    })


# ---- rules -----------------------------------------------------------------------------------

def _local_ports(vms: Iterable[VM], hv: str) -> list[int]:
    return sorted({n.ofport for vm in vms if vm.hypervisor == hv for n in vm.vnics if n.ofport is not None})


def _ips(vms: Iterable[VM]) -> list[str]:
    return sorted({ip for vm in vms for ip in vm.ips})


# A rule on one bridge is up to four conjunctions (egress/ingress x plain/app services). Each
# dimension of a conjunction is either fixed (services, a CIDR) or drawn from the VMs of a group
# (their local ports, their addresses, their app ports). Clauses drawn from a VM are that VM's
# own part of the rule, so a VM joining or leaving a group recomputes only its own clauses: the
# cost of a membership change does not grow with the size of the group.


class DimKind(str, Enum):
    PORT = "port"  # the member's ports on this bridge (the near side)
    ADDRESS = "address"  # the member's addresses, wherever it runs (the far side)
    APP = "app"  # the member's app ports, with its addresses (egress) or local ports (ingress)


@dataclass(frozen=True)
class MemberDim:
    """A dimension drawn from the VMs of `group`; `group` None means every VM (app rules to `any`)."""

    kind: DimKind
    group: str | None
    field: str = ""  # the match field of PORT and ADDRESS dimensions
    apps: tuple[str, ...] = ()
    egress: bool = True  # ingress ADDRESS dimensions hold only VMs on other bridges


Dim = tuple[Match, ...] | MemberDim  # fixed matches, or drawn from members


@dataclass(frozen=True)
class Conj:
    """Flows matching when every dimension holds: a conjunction when two or more constrain."""

    table: Table
    priority: int
    ident: int
    dims: tuple[Dim, ...]  # the constraining ones only
    on_new: tuple[Action, ...]
    on_est: tuple[Action, ...] | None  # None: new connections only (monitor rules)


Liveness = tuple[bool, ...]  # per Conj of a rule: does every dimension have a match on this bridge


def port_range_masks(low: int, high: int) -> list[tuple[int, int]]:
    """Cover [low, high] exactly with (value, mask) pairs, as few as possible."""
    out: list[tuple[int, int]] = []
    while low <= high:
        size = low & -low if low else 1 << 16
        while size > high - low + 1:
            size >>= 1
        out.append((low, 0xFFFF & ~(size - 1)))
        low += size
    return out


def service_matches(port: Port) -> list[Match] | None:
    """Matches for one service; None when it allows everything."""
    if port.protocol == "any":
        return None
    if port.protocol == "icmp":
        return [Match.of(eth_type=ETH_TYPE_IP, ip_proto=IP_PROTO_ICMP)]
    proto, field = (IP_PROTO_TCP, "tcp_dst") if port.protocol == "tcp" else (IP_PROTO_UDP, "udp_dst")
    return [Match.of(eth_type=ETH_TYPE_IP, ip_proto=proto, **{field: vm}) for vm in port_range_masks(port.low, port.high)]


def _services_dimension(ports: Iterable[Port]) -> tuple[Match, ...] | None:
    out: list[Match] = []
    for port in ports:
        ms = service_matches(port)
        if ms is None:
            return None
        out.extend(ms)
    return tuple(sorted(set(out)))


def _cidr_dimension(ep: CidrEndpoint, field: str) -> tuple[Match, ...] | None:
    if ep.cidr.endswith("/0"):
        return None  # every IPv4 address: no constraint (non-IPv4 never reaches policy)
    return (Match.of(eth_type=ETH_TYPE_IP, **{field: ep.cidr}),)


def _endpoint_dimension(ep: Endpoint, kind: DimKind, field: str, cidr_field: str, egress: bool) -> Dim | None:
    if isinstance(ep, AnyEndpoint):
        return None
    if isinstance(ep, CidrEndpoint):
        return _cidr_dimension(ep, cidr_field)
    return MemberDim(kind, ep.group, field, egress=egress)


def _app_dimension(dst: Endpoint, apps: list[AppService], egress: bool) -> Dim:
    """Destination and port in one dimension: each destination VM has its own app ports."""
    names = tuple(a.app for a in apps)
    if isinstance(dst, GroupEndpoint):
        return MemberDim(DimKind.APP, dst.group, apps=names, egress=egress)
    if isinstance(dst, AnyEndpoint):
        return MemberDim(DimKind.APP, None, apps=names, egress=egress)
    return ()  # a CIDR has no app ports


@lru_cache(maxsize=8192)
def rule_conjunctions(rule: Rule) -> tuple[Conj, ...]:
    """The conjunctions of an enabled rule; they depend on the rule alone, not on the world."""
    if not rule.enabled:
        return ()
    ports = [s for s in rule.services if isinstance(s, Port)]
    apps = [s for s in rule.services if isinstance(s, AppService)]
    # No services at all means any service; app-only rules have no plain part.
    has_plain = bool(ports) or not apps
    plain_services = _services_dimension(ports) if ports else None
    prio = rule_priority(rule.tier, rule.position)
    out: list[Conj] = []
    for egress in (True, False):
        if rule.monitor:
            table = Table.EGRESS_MONITOR if egress else Table.INGRESS_MONITOR
            after = Table.EGRESS_POLICY if egress else Table.INGRESS_POLICY
            on_new: tuple[Action, ...] = (GotoTable(int(after)),)
            on_est: tuple[Action, ...] | None = None  # monitor counts connections, not packets
        else:
            table = Table.EGRESS_POLICY if egress else Table.INGRESS_POLICY
            on_new, on_est = _verdict_actions(rule, Table.L2_LOOKUP if egress else Table.ACCEPT)
        if egress:
            near = _endpoint_dimension(rule.source, DimKind.PORT, "in_port", "ipv4_src", egress)
            far = _endpoint_dimension(rule.destination, DimKind.ADDRESS, "ipv4_dst", "ipv4_dst", egress)
        else:
            near = _endpoint_dimension(rule.destination, DimKind.PORT, "reg7", "ipv4_dst", egress)
            far = _endpoint_dimension(rule.source, DimKind.ADDRESS, "ipv4_src", "ipv4_src", egress)
        tag = "egress" if egress else "ingress"
        if has_plain:
            dims = tuple(d for d in (near, far, plain_services) if d is not None)
            out.append(Conj(table, prio, conj_id(rule.id, tag), dims, on_new, on_est))
        if apps:
            src_dim = near if egress else far
            dims = tuple(d for d in (src_dim, _app_dimension(rule.destination, apps, egress)) if d is not None)
            out.append(Conj(table, prio - 1, conj_id(rule.id, tag + "-app"), dims, on_new, on_est))
    return tuple(out)


def member_matches(dim: MemberDim, vm: VM, hv: str) -> tuple[Match, ...]:
    """What one VM contributes to a dimension drawn from its group."""
    if dim.kind is DimKind.PORT:
        if vm.hypervisor != hv:
            return ()
        return tuple(sorted({Match.of(**{dim.field: n.ofport}) for n in vm.vnics if n.ofport is not None}))
    if dim.kind is DimKind.ADDRESS:
        if not dim.egress and vm.hypervisor == hv:
            return ()  # a local source's packets were judged at egress (_checked_at_egress)
        ip_type = MatchField("eth_type", ETH_TYPE_IP)
        return tuple(Match((ip_type, MatchField(dim.field, ip_to_int(ip)))) for ip in sorted(set(vm.ips)))
    if not dim.egress and vm.hypervisor != hv:
        return ()
    ports = [p for app in dim.apps for p in vm.app_ports(app)]
    services = [m for p in ports for m in (service_matches(p) or [Match.of(eth_type=ETH_TYPE_IP)])]
    if dim.egress:
        where = [Match.of(ipv4_dst=ip, eth_type=ETH_TYPE_IP) for ip in vm.ips]
    else:
        where = [Match.of(reg7=n.ofport) for n in vm.vnics if n.ofport is not None]
    return tuple(sorted({_merge(w, s) for w in where for s in services}))


def _dim_members(dim: MemberDim, world: World) -> Iterable[VM]:
    vms = world.inventory.vms
    if dim.group is None:
        return vms.values()
    return (vms[u] for u in world.members.get(dim.group, frozenset()) if u in vms)


def _is_member(dim: MemberDim, uuid: str, world: World) -> bool:
    return dim.group is None or uuid in world.members.get(dim.group, frozenset())


def _dim_holds(dim: Dim, world: World, hv: str) -> bool:
    if isinstance(dim, MemberDim):
        return any(member_matches(dim, vm, hv) for vm in _dim_members(dim, world))
    return len(dim) > 0


def rule_liveness(rule: Rule, world: World, hv: str) -> Liveness:
    """Per conjunction: a side with no match here means the rule cannot match on this bridge."""
    return tuple(all(_dim_holds(d, world, hv) for d in c.dims) for c in rule_conjunctions(rule))


def _merge(a: Match, b: Match) -> Match:
    fields: dict[str, MatchField] = {f.name: f for f in a.fields}
    for f in b.fields:
        if f.name in fields and fields[f.name] != f:
            raise ValueError(f"conflicting matches on {f.name}")
        fields[f.name] = f
    return Match.from_fields(list(fields.values()))


def conj_id(rule_id: str, part: str) -> int:
    return zlib.crc32(f"{rule_id}#{part}".encode())


def _verdict_actions(rule: Rule, after: Table) -> tuple[tuple[Action, ...], tuple[Action, ...]]:
    """(actions for a new connection, actions for an established one) of an enforced rule."""
    if rule.action is RuleAction.ALLOW:
        return (Ct(REG_ZONE.field, commit=True), GotoTable(int(after))), (GotoTable(int(after)),)
    # deny and reject both drop in the datapath: OVS cannot write a TCP RST or an ICMP error
    # by flows alone (tcp_flags is read-only), see docs/pipeline.md.
    return (), (Ct(REG_ZONE.field, commit=True, set_mark=CT_MARK_REVOKED),)


def _states(c: Conj) -> list[tuple[tuple[int, int], tuple[Action, ...]]]:
    return [(CT_NEW_ORIG, c.on_new)] + ([(CT_EST_ORIG, c.on_est)] if c.on_est is not None else [])


def _dim_flows(c: Conj, k: int, matches: Iterable[Match], ck: int, origin: str) -> set[FlowSpec]:
    """The flows of dimension `k` (1-based) of `c` for `matches`: conjunction clauses, or, when
    it is the only dimension, the verdict itself for each connection state."""
    if len(c.dims) == 1:
        # ct() in the verdict needs the ip prerequisite, which a port match lacks.
        return {_flow(c.table, c.priority, _merge(m, Match.of(ct_state=state, eth_type=ETH_TYPE_IP)), actions, ck, origin)
                for m in matches for state, actions in _states(c)}
    clause = (Conjunction(c.ident, k, len(c.dims)),)
    return {_flow(c.table, c.priority, m, clause, ck, origin) for m in matches}


def rule_fixed_part(rule: Rule, live: Liveness) -> Flows:
    """A rule's flows that no VM contributes: fixed dimensions and the conj_id flows."""
    ck, origin = rule_cookie(rule.id), f"rule:{rule.id}"
    flows: set[FlowSpec] = set()
    for c, holds in zip(rule_conjunctions(rule), live):
        if not holds:
            continue
        if not c.dims:
            flows |= _dim_flows(c, 1, (Match.of(eth_type=ETH_TYPE_IP),), ck, origin)
        for k, dim in enumerate(c.dims, start=1):
            if not isinstance(dim, MemberDim):
                flows |= _dim_flows(c, k, dim, ck, origin)
        if len(c.dims) > 1:
            # ct() needs the ip prerequisite even on the conj_id flow.
            flows |= {_flow(c.table, c.priority, Match.of(conj_id=c.ident, ct_state=state, eth_type=ETH_TYPE_IP),
                            actions, ck, origin) for state, actions in _states(c)}
    return frozenset(flows)


def rule_member_part(rule: Rule, live: Liveness, world: World, hv: str, vm: VM | None) -> Flows:
    """The clauses one VM contributes to a rule on this bridge (none if it is in none of the
    rule's groups, or gone)."""
    if vm is None:
        return frozenset()
    ck, origin = rule_cookie(rule.id), f"rule:{rule.id}"
    flows: set[FlowSpec] = set()
    for c, holds in zip(rule_conjunctions(rule), live):
        if not holds:
            continue
        for k, dim in enumerate(c.dims, start=1):
            if isinstance(dim, MemberDim) and _is_member(dim, vm.uuid, world):
                flows |= _dim_flows(c, k, member_matches(dim, vm, hv), ck, origin)
    return frozenset(flows)


def rule_member_uuids(rule: Rule, world: World) -> set[str]:
    """Every VM that may contribute clauses to the rule."""
    out: set[str] = set()
    for c in rule_conjunctions(rule):
        for dim in c.dims:
            if isinstance(dim, MemberDim):
                out.update(vm.uuid for vm in _dim_members(dim, world))
    return out


def rule_groups(rule: Rule) -> tuple[frozenset[str], bool]:
    """(the groups the rule's clauses are drawn from, whether some dimension draws from every VM)."""
    dims = [d for c in rule_conjunctions(rule) for d in c.dims if isinstance(d, MemberDim)]
    return frozenset(d.group for d in dims if d.group is not None), any(d.group is None for d in dims)


def rule_parts(rule: Rule, world: World, hv: str) -> tuple[Liveness, dict[PartKey, Flows]]:
    """A rule on one bridge: its liveness, its fixed part ("rule", id) and one part per
    contributing VM ("rule", id, uuid)."""
    live = rule_liveness(rule, world, hv)
    if not any(live):
        return live, {}
    vms = world.inventory.vms
    parts: dict[PartKey, Flows] = {("rule", rule.id): rule_fixed_part(rule, live)}
    for uuid in rule_member_uuids(rule, world):
        parts[("rule", rule.id, uuid)] = rule_member_part(rule, live, world, hv, vms.get(uuid))
    return live, {k: v for k, v in parts.items() if v}


# ---- quarantine ------------------------------------------------------------------------------


def remediation_members(world: World) -> list[VM]:
    """VMs that stay reachable from quarantined VMs: the remediation group's members, if the
    group exists in the active policy, except those quarantined themselves."""
    group = world.remediation_group
    if group is None:
        return []
    vms = world.inventory.vms
    return [vms[u] for u in sorted(world.members.get(group, frozenset()))
            if u in vms and u not in world.quarantined]


def quarantine_part(world: World, hv: str) -> Flows:
    """Emergency isolation above every rule tier, on this bridge's ports of quarantined VMs (deny
    everything but the remediation group, both directions, established connections revoked) and
    of remediation members (allow to and from quarantined VMs, whatever operator rules say)."""
    if not world.quarantined:
        return frozenset()
    vms = world.inventory.vms
    quarantined = [vms[u] for u in sorted(world.quarantined) if u in vms]
    helpers = remediation_members(world)
    helper_ips = _ips(helpers)
    flows: set[FlowSpec] = set()
    allow_egress = (Ct(REG_ZONE.field, commit=True), GotoTable(int(Table.L2_LOOKUP))), (GotoTable(int(Table.L2_LOOKUP)),)
    allow_ingress = (Ct(REG_ZONE.field, commit=True), GotoTable(int(Table.ACCEPT))), (GotoTable(int(Table.ACCEPT)),)
    deny = (), (Ct(REG_ZONE.field, commit=True, set_mark=CT_MARK_REVOKED),)

    def add(table: Table, prio: int, match: Match, actions: tuple[tuple[Action, ...], tuple[Action, ...]],
            ck: int, origin: str) -> None:
        for state, acts in zip((CT_NEW_ORIG, CT_EST_ORIG), actions):
            flows.add(_flow(table, prio, _merge(match, Match.of(ct_state=state, eth_type=ETH_TYPE_IP)), acts, ck, origin))

    for vm in quarantined:
        ports = _local_ports([vm], hv)
        if not ports:
            continue
        ck, origin = quarantine_cookie(vm.uuid), f"quarantine:{vm.name}"
        for p in ports:
            add(Table.EGRESS_POLICY, PRIO_QUARANTINE_DENY, Match.of(in_port=p), deny, ck, origin)
            add(Table.INGRESS_POLICY, PRIO_QUARANTINE_DENY, Match.of(reg7=p), deny, ck, origin)
            for ip in helper_ips:
                add(Table.EGRESS_POLICY, PRIO_QUARANTINE_ALLOW, Match.of(in_port=p, ipv4_dst=ip), allow_egress, ck, origin)
                add(Table.INGRESS_POLICY, PRIO_QUARANTINE_ALLOW, Match.of(reg7=p, ipv4_src=ip), allow_ingress, ck, origin)
    # The remediation side: its own rules may not undo what quarantine grants.
    owner: dict[str, VM] = {}
    for vm in quarantined:
        for ip in vm.ips:
            owner.setdefault(ip, vm)  # one flow per address even if two VMs claim it
    for helper in helpers:
        for p in _local_ports([helper], hv):
            for ip, vm in sorted(owner.items()):
                ck, origin = quarantine_cookie(vm.uuid), f"quarantine:{vm.name}:remediation"
                add(Table.EGRESS_POLICY, PRIO_QUARANTINE_ALLOW, Match.of(in_port=p, ipv4_dst=ip), allow_egress, ck, origin)
                add(Table.INGRESS_POLICY, PRIO_QUARANTINE_ALLOW, Match.of(reg7=p, ipv4_src=ip), allow_ingress, ck, origin)
    return frozenset(flows)


# ---- the whole bridge ------------------------------------------------------------------------


def bridge_parts(world: World, hv_name: str) -> dict[PartKey, Flows]:
    hv = world.inventory.hypervisors[hv_name]
    parts: dict[PartKey, Flows] = {
        ("pipeline",): pipeline_part(hv),
        ("uplink",): uplink_part(hv),
        ("gateway",): gateway_part(world.inventory.gateway, hv),
    }
    for vm in world.inventory.vms.values():
        local = vm.hypervisor == hv_name
        for nic in vm.vnics:
            parts[("address", nic.mac)] = address_part(nic, local, hv)
            if local:
                parts[("port", nic.mac)] = port_part(nic, hv)
    for rule in world.policy.rules:
        parts.update(rule_parts(rule, world, hv_name)[1])
    parts[("quarantine",)] = quarantine_part(world, hv_name)
    return parts


def compile_bridge(world: World, hv_name: str, *, check: bool = True) -> Flows:
    """All flows for one hypervisor's bridge."""
    flows: set[FlowSpec] = set()
    for part in bridge_parts(world, hv_name).values():
        flows |= part
    result = frozenset(flows)
    if check:
        for f in result:
            check_flow(f)
        check_unique_keys(result)
    return result


def check_unique_keys(flows: Iterable[FlowSpec]) -> None:
    """Two flows with one (table, priority, match) but different actions would overwrite each other."""
    seen: dict[tuple[int, int, Match], FlowSpec] = {}
    for f in flows:
        other = seen.setdefault(f.key, f)
        if other != f:
            raise ValueError(f"flows from {other.origin} and {f.origin} collide at table {f.table} priority {f.priority}")
