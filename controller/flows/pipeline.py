"""The single declaration of the datapath pipeline: tables, registers, ct_mark bits, cookies and
priority bands. Every compiled flow is checked against it (`check_flow`).

See docs/pipeline.md for the walk of a packet through these tables.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from enum import IntEnum

from controller.flows.types import (
    ETH_TYPE_ARP,
    ETH_TYPE_IP,
    FIELD_BITS,
    IP_PROTO_ICMP,
    IP_PROTO_TCP,
    IP_PROTO_UDP,
    Conjunction,
    Ct,
    FlowSpec,
    GotoTable,
    Move,
    Output,
    OutputInPort,
    SetField,
)


class Table(IntEnum):
    CLASSIFY = 0  # per port: anti-spoofing, load the zone register; unknown ports drop
    ARP = 5  # ARP responder for every known address; nothing else answers or floods
    EGRESS_CT = 10  # conntrack in the source vNIC's zone
    EGRESS_MONITOR = 11  # monitor-only rules: counted under their cookie, never enforced
    EGRESS_POLICY = 12  # rules evaluated at the source
    L2_LOOKUP = 20  # destination MAC -> local vNIC (load registers) or uplink
    INGRESS_CT = 30  # conntrack in the destination vNIC's zone
    INGRESS_MONITOR = 31
    INGRESS_POLICY = 32  # rules evaluated at the destination
    ACCEPT = 40  # output to the port held in REG_OUT_PORT


@dataclass(frozen=True)
class Register:
    field: str
    bits: int  # how many low bits carry meaning
    meaning: str


# Registers: declared here once, nowhere else.
REG_ZONE = Register("reg6", 16, "conntrack zone of the vNIC whose policy is being applied")
REG_OUT_PORT = Register("reg7", 32, "OpenFlow port of the local destination vNIC")
REG_FROM_VNIC = Register("reg5", 1, "1: the packet came from a local vNIC, so this bridge's EGRESS_POLICY allowed it")
REGISTERS: tuple[Register, ...] = (REG_FROM_VNIC, REG_ZONE, REG_OUT_PORT)

# ct_mark bits.
CT_MARK_REVOKED = 0x1  # the connection lost its grant: drop both directions from now on

# Cookies: 16-bit Goldilocks prefix, 8-bit kind, 40-bit id. The prefix lets the controller
# dump and repair its own flows and leave everyone else's alone.
COOKIE_PREFIX = 0x601D << 48
COOKIE_PREFIX_MASK = 0xFFFF << 48


class CookieKind(IntEnum):
    PIPELINE = 1
    PORT = 2
    ADDRESS = 3  # ARP answers and L2 delivery for one vNIC
    RULE = 4
    UPLINK = 5
    QUARANTINE = 6  # emergency isolation of one VM: id = CRC-32 of the quarantined VM's uuid


def cookie(kind: CookieKind, ident: int) -> int:
    if not 0 <= ident < 1 << 40:
        raise ValueError(f"cookie id {ident} does not fit in 40 bits")
    return COOKIE_PREFIX | (int(kind) << 40) | ident


def rule_number(rule_id: str) -> int:
    """A stable 32-bit number for a rule id: its cookie and conjunction ids derive from it."""
    return zlib.crc32(rule_id.encode())


def rule_cookie(rule_id: str) -> int:
    return cookie(CookieKind.RULE, rule_number(rule_id))


def quarantine_cookie(vm_uuid: str) -> int:
    return cookie(CookieKind.QUARANTINE, zlib.crc32(vm_uuid.encode()))


def cookie_kind(value: int) -> CookieKind | None:
    if value & COOKIE_PREFIX_MASK != COOKIE_PREFIX:
        return None
    try:
        return CookieKind((value >> 40) & 0xFF)
    except ValueError:
        return None


def cookie_ident(value: int) -> int:
    return value & ((1 << 40) - 1)


# Priority bands, per table. Rules sit between the conntrack guards and the defaults.
PRIO_DEFAULT = 0
PRIO_REVOKE_EST = 10  # original-direction packet of a connection no rule grants any more
PRIO_RULES_FLOOR = 100
PRIO_RULES_CEIL = 60000
# INGRESS_POLICY: a packet from a local vNIC was judged by the very same rules at egress on
# this bridge; it is committed in the destination's zone without a second look. Below
# quarantine, which stays enforced at both ends.
PRIO_CHECKED_AT_EGRESS = 60001
# Quarantine: above every operator rule (every tier), below the conntrack guards, so a
# quarantined VM's connections are checked here first and revoked like any lost grant.
PRIO_QUARANTINE_FLOOR = 60002
PRIO_QUARANTINE_ALLOW = 63000  # to/from the remediation group
PRIO_QUARANTINE_DENY = 62000  # everything else to/from a quarantined VM
PRIO_QUARANTINE_CEIL = 63998
PRIO_CT_ALLOW_REPLY = 64000
PRIO_CT_GUARD = 65000

TIER_ORDER: tuple[str, ...] = ("emergency", "infrastructure", "application")
TIER_SPAN = 19000  # priority room per tier
MAX_POSITION = 9000  # positions 1..MAX_POSITION; each takes two priorities


def rule_priority(tier: str, position: int) -> int:
    """Higher tiers first, lower positions first. Each rule owns `p` and `p - 1`."""
    if tier not in TIER_ORDER:
        raise ValueError(f"unknown tier {tier!r}")
    if not 1 <= position <= MAX_POSITION:
        raise ValueError(f"position {position} out of range 1-{MAX_POSITION}")
    return PRIO_RULES_CEIL - TIER_ORDER.index(tier) * TIER_SPAN - 2 * position


# ---- the check -------------------------------------------------------------------------------

_DECLARED_REGS = {r.field for r in REGISTERS}
_PREREQS: dict[str, tuple[tuple[str, int], ...]] = {
    "arp_op": (("eth_type", ETH_TYPE_ARP),),
    "arp_spa": (("eth_type", ETH_TYPE_ARP),),
    "arp_tpa": (("eth_type", ETH_TYPE_ARP),),
    "arp_sha": (("eth_type", ETH_TYPE_ARP),),
    "arp_tha": (("eth_type", ETH_TYPE_ARP),),
    "ip_proto": (("eth_type", ETH_TYPE_IP),),
    "ipv4_src": (("eth_type", ETH_TYPE_IP),),
    "ipv4_dst": (("eth_type", ETH_TYPE_IP),),
    "tcp_dst": (("eth_type", ETH_TYPE_IP), ("ip_proto", IP_PROTO_TCP)),
    "udp_dst": (("eth_type", ETH_TYPE_IP), ("ip_proto", IP_PROTO_UDP)),
    "icmpv4_type": (("eth_type", ETH_TYPE_IP), ("ip_proto", IP_PROTO_ICMP)),
}


class PipelineViolation(ValueError):
    pass


def check_flow(flow: FlowSpec) -> None:
    """Raise PipelineViolation if `flow` steps outside the declared pipeline."""
    where = f"flow {flow.origin or '?'} (table {flow.table}, priority {flow.priority})"
    try:
        table = Table(flow.table)
    except ValueError:
        raise PipelineViolation(f"{where}: undeclared table {flow.table}") from None
    if not 0 <= flow.priority <= 0xFFFF:
        raise PipelineViolation(f"{where}: priority out of range")
    if flow.cookie & COOKIE_PREFIX_MASK != COOKIE_PREFIX or cookie_kind(flow.cookie) is None:
        raise PipelineViolation(f"{where}: cookie {flow.cookie:#x} is not a Goldilocks cookie")
    for mf in flow.match.fields:
        if mf.name.startswith("reg") and mf.name not in _DECLARED_REGS:
            raise PipelineViolation(f"{where}: matches undeclared register {mf.name}")
        for pre_field, pre_value in _PREREQS.get(mf.name, ()):
            pre = flow.match.get(pre_field)
            if pre is None or pre.value != pre_value or pre.mask is not None:
                raise PipelineViolation(f"{where}: {mf.name} needs {pre_field}={pre_value:#x}")
    _check_actions(flow, table, where)


def _check_actions(flow: FlowSpec, table: Table, where: str) -> None:
    conj = [a for a in flow.actions if isinstance(a, Conjunction)]
    if conj and len(conj) != len(flow.actions):
        raise PipelineViolation(f"{where}: conjunction actions cannot mix with other actions")
    for i, action in enumerate(flow.actions):
        if isinstance(action, GotoTable):
            if i != len(flow.actions) - 1:
                raise PipelineViolation(f"{where}: goto_table must come last")
            _check_forward(where, table, action.table)
        elif isinstance(action, Ct):
            _check_register_field(where, action.zone_field)
            ip = flow.match.get("eth_type")
            if ip is None or ip.value != ETH_TYPE_IP or ip.mask is not None:
                # OVS refuses ct() without its prerequisite (OFPBAC_MATCH_INCONSISTENT).
                raise PipelineViolation(f"{where}: ct() needs eth_type=0x0800 in the match")
            if action.table is not None:
                _check_forward(where, table, action.table)
            if action.set_mark is not None and not action.commit:
                raise PipelineViolation(f"{where}: ct_mark can only be set on commit")
        elif isinstance(action, SetField):
            _check_writable(where, action.field)
            if action.value >> FIELD_BITS[action.field]:
                raise PipelineViolation(f"{where}: value too wide for {action.field}")
        elif isinstance(action, Move):
            _check_writable(where, action.dst)
            if FIELD_BITS[action.src] != FIELD_BITS[action.dst]:
                raise PipelineViolation(f"{where}: move between fields of unequal width")
        elif isinstance(action, Conjunction):
            if not 1 <= action.clause <= action.n_clauses or action.n_clauses < 2:
                raise PipelineViolation(f"{where}: bad conjunction clause {action.clause}/{action.n_clauses}")
        elif not isinstance(action, (Output, OutputInPort)):
            raise PipelineViolation(f"{where}: unknown action {action!r}")


def _check_forward(where: str, table: Table, target: int) -> None:
    try:
        Table(target)
    except ValueError:
        raise PipelineViolation(f"{where}: jumps to undeclared table {target}") from None
    if target <= table:
        raise PipelineViolation(f"{where}: jumps backwards to table {target}")


def _check_register_field(where: str, name: str) -> None:
    if name not in _DECLARED_REGS:
        raise PipelineViolation(f"{where}: uses undeclared register {name}")


def _check_writable(where: str, name: str) -> None:
    if name.startswith("reg"):
        _check_register_field(where, name)
    elif name not in ("eth_src", "eth_dst", "arp_op", "arp_sha", "arp_spa", "arp_tha", "arp_tpa"):
        raise PipelineViolation(f"{where}: writes field {name} that the pipeline never writes")
