"""Flows as values: a frozen, hashable `FlowSpec` and its match and action parts.

Every match value is an integer (MACs, IPv4 addresses and ct_state flags included) with an
optional mask, so equality is exact, hashing is cheap, and the evaluator, the ovs-ofctl renderer
and the os-ken encoder all read the same thing. Provenance (`origin`) is kept out of equality:
two rules producing the same flow produce one flow.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Union

# ct_state bits, as OVS defines them (ovs-fields(7), "Connection Tracking Fields").
CT_NEW = 0x01
CT_EST = 0x02
CT_REL = 0x04
CT_RPL = 0x08
CT_INV = 0x10
CT_TRK = 0x20
CT_FLAG_NAMES: tuple[tuple[int, str], ...] = (
    (CT_NEW, "new"), (CT_EST, "est"), (CT_REL, "rel"), (CT_RPL, "rpl"), (CT_INV, "inv"), (CT_TRK, "trk"),
)

ETH_TYPE_IP = 0x0800
ETH_TYPE_ARP = 0x0806
IP_PROTO_ICMP = 1
IP_PROTO_TCP = 6
IP_PROTO_UDP = 17

# The OVS match fields Goldilocks can use, in canonical order, with their width in bits.
# Names are the OXM/NXM names os-ken uses; the renderer maps them to ovs-ofctl's.
FIELD_BITS: dict[str, int] = {
    "conj_id": 32,
    "in_port": 32,
    # OVS's 32-bit registers; which ones mean what is declared in pipeline.REGISTERS only.
    **{f"reg{i}": 32 for i in range(16)},
    "ct_state": 32,
    "ct_mark": 32,
    "eth_src": 48,
    "eth_dst": 48,
    "eth_type": 16,
    "arp_op": 16,
    "arp_spa": 32,
    "arp_tpa": 32,
    "arp_sha": 48,
    "arp_tha": 48,
    "ip_proto": 8,
    "ipv4_src": 32,
    "ipv4_dst": 32,
    "tcp_dst": 16,
    "udp_dst": 16,
    "icmpv4_type": 8,
}
FIELD_ORDER: dict[str, int] = {name: i for i, name in enumerate(FIELD_BITS)}


@lru_cache(maxsize=1 << 16)
def mac_to_int(mac: str) -> int:
    return int(mac.replace(":", "").replace("-", ""), 16)


def int_to_mac(value: int) -> str:
    raw = f"{value:012x}"
    return ":".join(raw[i : i + 2] for i in range(0, 12, 2))


@lru_cache(maxsize=1 << 16)
def ip_to_int(ip: str) -> int:
    return int(ipaddress.IPv4Address(ip))


def int_to_ip(value: int) -> str:
    return str(ipaddress.IPv4Address(value))


def cidr_to_masked(cidr: str) -> tuple[int, int | None]:
    """'10.0.0.0/8' -> (value, mask); a /32 has no mask."""
    net = ipaddress.IPv4Network(cidr, strict=False)
    if net.prefixlen == 32:
        return int(net.network_address), None
    return int(net.network_address), int(net.netmask)


@dataclass(frozen=True, order=True)
class MatchField:
    name: str
    value: int
    mask: int | None = None  # None: exact match on all bits

    def __post_init__(self) -> None:
        if self.name not in FIELD_BITS:
            raise ValueError(f"undeclared match field {self.name!r}")
        full = (1 << FIELD_BITS[self.name]) - 1
        if self.mask is not None and self.mask == full:
            object.__setattr__(self, "mask", None)
        if self.mask is not None and self.value & ~self.mask:
            # OVS stores value&mask; keep the canonical form so decode(encode(f)) == f.
            object.__setattr__(self, "value", self.value & self.mask)

    def matches(self, packet_value: int) -> bool:
        if self.mask is None:
            return packet_value == self.value
        return packet_value & self.mask == self.value


MatchValue = Union[int, str, tuple[int, int], tuple[str, str]]


def _coerce(name: str, value: MatchValue) -> tuple[int, int | None]:
    """Accept convenient Python forms: MAC/IP strings, CIDRs, (value, mask) pairs."""
    if isinstance(value, tuple):
        v, m = value
        return _scalar(name, v), _scalar(name, m)
    if isinstance(value, str) and name in ("ipv4_src", "ipv4_dst", "arp_spa", "arp_tpa") and "/" in value:
        return cidr_to_masked(value)
    return _scalar(name, value), None


def _scalar(name: str, value: int | str) -> int:
    if isinstance(value, int):
        return value
    if name in ("eth_src", "eth_dst", "arp_sha", "arp_tha"):
        return mac_to_int(value)
    if name in ("ipv4_src", "ipv4_dst", "arp_spa", "arp_tpa"):
        return ip_to_int(value)
    return int(value, 0)


@dataclass(frozen=True, order=True)
class Match:
    fields: tuple[MatchField, ...] = ()

    # Flows are hashed over and over (diffs, sets, counters): compute once. The cache is
    # per process (str hashes are salted), so it never travels in a pickle.
    def __getstate__(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

    def __hash__(self) -> int:
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(self.fields)
            object.__setattr__(self, "_hash", cached)
        return cached

    @staticmethod
    def of(**kwargs: MatchValue | None) -> Match:
        """Match.of(in_port=1, eth_type=ETH_TYPE_IP, ipv4_dst="10.0.0.0/24"); None values are skipped."""
        fields = []
        for name, value in kwargs.items():
            if value is None:
                continue
            v, m = _coerce(name, value)
            fields.append(MatchField(name, v, m))
        return Match.from_fields(fields)

    @staticmethod
    def from_fields(fields: list[MatchField] | tuple[MatchField, ...]) -> Match:
        names = [f.name for f in fields]
        if len(names) != len(set(names)):
            raise ValueError(f"field matched twice in {names}")
        return Match(tuple(sorted(fields, key=lambda f: FIELD_ORDER[f.name])))

    def get(self, name: str) -> MatchField | None:
        return next((f for f in self.fields if f.name == name), None)

    def names(self) -> frozenset[str]:
        return frozenset(f.name for f in self.fields)


# ---- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Output:
    port: int


@dataclass(frozen=True, order=True)
class OutputInPort:
    """Send back out of the port the packet came in on (ARP responder)."""


@dataclass(frozen=True, order=True)
class SetField:
    field: str  # a FIELD_BITS name
    value: int


@dataclass(frozen=True, order=True)
class Move:
    src: str  # whole-field copy between two FIELD_BITS names of equal width
    dst: str


@dataclass(frozen=True, order=True)
class Ct:
    """Send through conntrack in the zone held in `zone_field` (low 16 bits)."""

    zone_field: str
    commit: bool = False
    table: int | None = None  # recirculate to this table with ct_state filled in
    set_mark: int | None = None  # with commit: store this ct_mark on the connection


@dataclass(frozen=True, order=True)
class Conjunction:
    id: int
    clause: int  # 1-based
    n_clauses: int


@dataclass(frozen=True, order=True)
class GotoTable:
    table: int


Action = Union[Output, OutputInPort, SetField, Move, Ct, Conjunction, GotoTable]


@dataclass(frozen=True, order=True)
class FlowSpec:
    """One OpenFlow flow. Empty actions mean drop."""

    table: int
    priority: int
    match: Match
    actions: tuple[Action, ...]
    cookie: int
    origin: str = field(default="", compare=False, hash=False)

    def __getstate__(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_hash", "_key")}

    def __hash__(self) -> int:
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.table, self.priority, self.match, self.actions, self.cookie))
            object.__setattr__(self, "_hash", cached)
        return cached

    @property
    def key(self) -> tuple[int, int, Match]:
        """What OpenFlow uses to tell two flows apart (strict match)."""
        cached = self.__dict__.get("_key")
        if cached is None:
            cached = (self.table, self.priority, self.match)
            object.__setattr__(self, "_key", cached)
        return cached
