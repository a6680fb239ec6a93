"""The flow compiler: (inventory, group members, policy, hypervisor) -> frozenset[FlowSpec].

A bridge's flows are the union of independent *parts* (the fixed pipeline, one part per local
port, one per known address, one per rule). Parts are what incremental recompute replaces, so
each part depends only on the inputs it names. docs/pipeline.md walks a packet through.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from controller.flows.pipeline import (
    CT_MARK_REVOKED,
    PRIO_CT_ALLOW_REPLY,
    PRIO_CT_GUARD,
    PRIO_DEFAULT,
    PRIO_QUARANTINE_ALLOW,
    PRIO_QUARANTINE_DENY,
    PRIO_REVOKE_EST,
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
    # Per-world memo of what does not depend on the hypervisor (a group's addresses), so a
    # fleet compile or one event's recompute builds each only once.
    memo: dict[tuple[object, ...], object] = field(default_factory=dict, compare=False, hash=False, repr=False)
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
    return frozenset(flows)


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
    flows = [
        _flow(Table.L2_LOOKUP, 100, Match.of(eth_dst=mac),
              (SetField(REG_OUT_PORT.field, p), SetField(REG_ZONE.field, p), GotoTable(int(Table.INGRESS_CT))), ck, o),
        _flow(Table.ACCEPT, 100, Match.of(reg7=p), (Output(p),), ck, o),
    ]
    for ip in nic.ips:
        flows.append(_flow(Table.CLASSIFY, 100, Match.of(in_port=p, eth_src=mac, eth_type=ETH_TYPE_IP, ipv4_src=ip),
                           (SetField(REG_ZONE.field, p), GotoTable(int(Table.EGRESS_CT))), ck, o))
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

Dimension = tuple[Match, ...]  # one flow per alternative; None = unconstrained


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


def _services_dimension(ports: Iterable[Port]) -> Dimension | None:
    out: list[Match] = []
    for port in ports:
        ms = service_matches(port)
        if ms is None:
            return None
        out.extend(ms)
    return tuple(sorted(set(out)))


def _members(world: World, endpoint: GroupEndpoint) -> list[VM]:
    vms = world.inventory.vms
    return [vms[u] for u in sorted(world.members.get(endpoint.group, frozenset())) if u in vms]


def _local_ports(vms: Iterable[VM], hv: str) -> list[int]:
    return sorted({n.ofport for vm in vms if vm.hypervisor == hv for n in vm.vnics if n.ofport is not None})


def _ips(vms: Iterable[VM]) -> list[str]:
    return sorted({ip for vm in vms for ip in vm.ips})


def _remote_dimension(world: World, ep: Endpoint, field: str) -> Dimension | None:
    """The far side of a rule: matched by IP address wherever the VM is."""
    if isinstance(ep, AnyEndpoint):
        return None
    if isinstance(ep, CidrEndpoint):
        return _cidr_dimension(ep, field)
    key = ("remote", ep.group, field)
    found = world.memo.get(key)
    if found is None:
        ip_type = MatchField("eth_type", ETH_TYPE_IP)
        found = tuple(Match((ip_type, MatchField(field, ip_to_int(ip)))) for ip in _ips(_members(world, ep)))
        world.memo[key] = found
    return found  # type: ignore[return-value]


def _cidr_dimension(ep: CidrEndpoint, field: str) -> Dimension | None:
    if ep.cidr.endswith("/0"):
        return None  # every IPv4 address: no constraint (non-IPv4 never reaches policy)
    return (Match.of(eth_type=ETH_TYPE_IP, **{field: ep.cidr}),)


def _local_dimension(world: World, ep: Endpoint, hv: str, port_field: str, ip_field: str) -> Dimension | None:
    """The near side of a rule: matched by the local port the packet left from / goes to."""
    if isinstance(ep, AnyEndpoint):
        return None
    if isinstance(ep, CidrEndpoint):
        return _cidr_dimension(ep, ip_field)
    return tuple(Match.of(**{port_field: p}) for p in _local_ports(_members(world, ep), hv))


def _app_hosts(world: World, dst: Endpoint) -> list[VM]:
    if isinstance(dst, GroupEndpoint):
        return _members(world, dst)
    return sorted(world.inventory.vms.values(), key=lambda vm: vm.uuid) if isinstance(dst, AnyEndpoint) else []


def _app_dimension(world: World, rule: Rule, apps: list[AppService], hv: str, egress: bool) -> Dimension:
    """Destination and port in one dimension: each destination VM has its own app ports."""
    out: set[Match] = set()
    for vm in _app_hosts(world, rule.destination):
        if not egress and vm.hypervisor != hv:
            continue
        ports = [p for app in apps for p in vm.app_ports(app.app)]
        services = [m for p in ports for m in (service_matches(p) or [Match.of(eth_type=ETH_TYPE_IP)])]
        where: list[Match]
        if egress:
            where = [Match.of(ipv4_dst=ip, eth_type=ETH_TYPE_IP) for ip in vm.ips]
        else:
            where = [Match.of(reg7=n.ofport) for n in vm.vnics if n.ofport is not None]
        out.update(_merge(w, s) for w in where for s in services)
    return tuple(sorted(out))


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


def _conjunctive(table: Table, priority: int, dims: list[Dimension | None], ident: int,
                 on_new: tuple[Action, ...], on_est: tuple[Action, ...] | None, ck: int, origin: str) -> set[FlowSpec]:
    """Flows for `dims` all holding: a conjunction when two or more dimensions constrain."""
    active = [d for d in dims if d is not None]
    if any(len(d) == 0 for d in active):
        return set()  # a side with no members: the rule cannot match here
    states = [(CT_NEW_ORIG, on_new)] + ([(CT_EST_ORIG, on_est)] if on_est is not None else [])
    flows: set[FlowSpec] = set()
    if len(active) <= 1:
        for m in active[0] if active else (Match.of(eth_type=ETH_TYPE_IP),):
            for state, actions in states:
                flows.add(_flow(table, priority, _merge(m, Match.of(ct_state=state)), actions, ck, origin))
        return flows
    n = len(active)
    clauses: dict[Match, list[Action]] = {}
    for k, dim in enumerate(active, start=1):
        for m in dim:
            # One match in two dimensions must be one flow carrying both clauses.
            clauses.setdefault(m, []).append(Conjunction(ident, k, n))
    flows.update(_flow(table, priority, m, tuple(acts), ck, origin) for m, acts in clauses.items())
    for state, actions in states:
        # ct() needs the ip prerequisite even on the conj_id flow.
        flows.add(_flow(table, priority, Match.of(conj_id=ident, ct_state=state, eth_type=ETH_TYPE_IP), actions, ck, origin))
    return flows


def rule_part(rule: Rule, world: World, hv: str) -> Flows:
    if not rule.enabled:
        return frozenset()
    ports = [s for s in rule.services if isinstance(s, Port)]
    apps = [s for s in rule.services if isinstance(s, AppService)]
    # No services at all means any service; app-only rules have no plain part.
    has_plain = bool(ports) or not apps
    plain_services = _services_dimension(ports) if ports else None
    prio = rule_priority(rule.tier, rule.position)
    ck, origin = rule_cookie(rule.id), f"rule:{rule.id}"
    flows: set[FlowSpec] = set()
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
            near = _local_dimension(world, rule.source, hv, "in_port", "ipv4_src")
            far = _remote_dimension(world, rule.destination, "ipv4_dst")
        else:
            near = _local_dimension(world, rule.destination, hv, "reg7", "ipv4_dst")
            far = _remote_dimension(world, rule.source, "ipv4_src")
        tag = "egress" if egress else "ingress"
        if has_plain:
            flows |= _conjunctive(table, prio, [near, far, plain_services], conj_id(rule.id, tag),
                                  on_new, on_est, ck, origin)
        if apps:
            app_dim = _app_dimension(world, rule, apps, hv, egress)
            src_dim = near if egress else far
            flows |= _conjunctive(table, prio - 1, [src_dim, app_dim], conj_id(rule.id, tag + "-app"),
                                  on_new, on_est, ck, origin)
    return frozenset(flows)


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
        parts[("rule", rule.id)] = rule_part(rule, world, hv_name)
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
