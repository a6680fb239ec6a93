"""The identity model: immutable values describing hypervisors, VMs, vNICs and their context.

Every attribute that policy can select on is a `Fact` carrying its provenance and the time it
was observed, so that explanations can say *who* claimed it and the trust rule can tell
hypervisor-verified facts from what a guest merely reported.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum


class Provenance(str, Enum):
    PLATFORM = "platform"  # inventory, OVSDB: verified by the hypervisor
    GUEST = "guest"  # the in-guest agent: the guest's administrator could lie
    AUTHORITATIVE = "authoritative"  # identity provider, EDR, through the API

    def __str__(self) -> str:
        return self.value


class Attr(str, Enum):
    """Attributes a selector can test. Multi-valued ones hold one Fact per value."""

    NAME = "name"
    HYPERVISOR = "hypervisor"
    TAG = "tag"  # key = tag name
    OS = "os"
    USER = "user"  # logged-in user names
    USERGROUP = "usergroup"  # directory groups of logged-in users
    APP = "app"  # running apps; key = app name, value = "tcp/5432,udp/53" style port list
    LABEL = "label"  # data-classification labels
    POSTURE = "posture"  # key = check name, value = "pass" | "fail"

    def __str__(self) -> str:
        return self.value


# Attributes that only the hypervisor can assert. Tags are set through inventory.
PLATFORM_ATTRS: frozenset[Attr] = frozenset({Attr.NAME, Attr.HYPERVISOR, Attr.TAG})


@dataclass(frozen=True, order=True)
class Fact:
    """One observed attribute value of a VM."""

    attr: Attr
    key: str  # tag name, app name, posture check; "" for unkeyed attributes
    value: str
    provenance: Provenance
    observed_at: float = 0.0  # seconds since the epoch; the core never reads a clock

    def describe(self) -> str:
        name = f"{self.attr}.{self.key}" if self.key else str(self.attr)
        when = datetime.fromtimestamp(self.observed_at, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"{name}={self.value} ({self.provenance}, observed {when})"


@dataclass(frozen=True, order=True)
class Port:
    """A transport service: protocol plus an inclusive port range (0-0 for icmp/any)."""

    protocol: str  # "tcp" | "udp" | "icmp" | "any"
    low: int = 0
    high: int = 0

    def __str__(self) -> str:
        if self.protocol in ("icmp", "any"):
            return self.protocol
        if self.low == self.high:
            return f"{self.protocol}/{self.low}"
        return f"{self.protocol}/{self.low}-{self.high}"

    def covers(self, protocol: str, port: int) -> bool:
        if self.protocol == "any":
            return True
        if self.protocol != protocol:
            return False
        if protocol == "icmp":
            return True
        return self.low <= port <= self.high


@dataclass(frozen=True, order=True)
class VNic:
    mac: str  # lower-case, colon separated
    ips: tuple[str, ...]  # IPv4 addresses, dotted quad
    ofport: int | None  # OpenFlow port on its hypervisor's bridge; None = not bound yet
    name: str = ""  # interface name, for humans


@dataclass(frozen=True)
class Hypervisor:
    name: str
    uplink_ofport: int | None = None  # port towards the other hypervisors (fabric)
    dpid: int | None = None


@dataclass(frozen=True)
class _FactIndex:
    """A VM's facts, sorted, by (attribute, key) and by attribute."""

    by_key: Mapping[tuple[Attr, str], tuple[Fact, ...]]
    by_attr: Mapping[Attr, tuple[Fact, ...]]

    @staticmethod
    def of(facts: Iterable[Fact]) -> _FactIndex:
        by_key: dict[tuple[Attr, str], list[Fact]] = {}
        by_attr: dict[Attr, list[Fact]] = {}
        for f in sorted(facts):
            by_key.setdefault((f.attr, f.key), []).append(f)
            by_attr.setdefault(f.attr, []).append(f)
        return _FactIndex({k: tuple(v) for k, v in by_key.items()}, {k: tuple(v) for k, v in by_attr.items()})


@dataclass(frozen=True)
class VM:
    uuid: str
    name: str
    hypervisor: str
    vnics: tuple[VNic, ...] = ()
    facts: frozenset[Fact] = frozenset()  # everything but name/hypervisor (those are fields)

    @property
    def ips(self) -> tuple[str, ...]:
        return tuple(ip for nic in self.vnics for ip in nic.ips)

    def all_facts(self) -> frozenset[Fact]:
        """Facts including the platform attributes held as fields."""
        return self.facts | {
            Fact(Attr.NAME, "", self.name, Provenance.PLATFORM),
            Fact(Attr.HYPERVISOR, "", self.hypervisor, Provenance.PLATFORM),
        }

    def values(self, attr: Attr, key: str = "") -> tuple[Fact, ...]:
        """The facts of one attribute (and key), sorted."""
        return self._indexed_facts().by_key.get((attr, key), ())

    def facts_of(self, attr: Attr) -> tuple[Fact, ...]:
        """Every fact of one attribute whatever its key, sorted."""
        return self._indexed_facts().by_attr.get(attr, ())

    # Every group's selector asks every VM for its facts (11 groups x 1000 VMs at boot): the VM
    # is a frozen value, so its facts are sorted and grouped once, kept beside its fields (not
    # one of them: equality, hashing and repr ignore it, and a replace() starts without it).
    def _indexed_facts(self) -> _FactIndex:
        index = self.__dict__.get("_facts_index")
        if index is None:
            index = _FactIndex.of(self.all_facts())
            object.__setattr__(self, "_facts_index", index)
        return index  # type: ignore[no-any-return]

    def __getstate__(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "_facts_index"}

    def app_ports(self, app: str) -> tuple[Port, ...]:
        """Ports `app` listens on here, from the APP facts (value "tcp/5432,udp/53")."""
        ports: set[Port] = set()
        for f in self.values(Attr.APP, app):
            for port in _lenient_port_list(f.value):
                # A guest may only say which tcp/udp ports an app listens on: a claimed
                # "any" must never widen an allow to every service.
                if port.protocol in ("tcp", "udp"):
                    ports.add(port)
        return tuple(sorted(ports))


@dataclass(frozen=True)
class Gateway:
    """The fabric's router: where traffic for external CIDRs leaves, reached over the uplink."""

    ip: str
    mac: str


@dataclass(frozen=True)
class Inventory:
    """Where everything is. An immutable snapshot; the engine builds new ones."""

    hypervisors: Mapping[str, Hypervisor] = field(default_factory=dict)
    vms: Mapping[str, VM] = field(default_factory=dict)  # by uuid
    gateway: Gateway | None = None

    def vms_on(self, hypervisor: str) -> tuple[VM, ...]:
        return tuple(vm for vm in self.vms.values() if vm.hypervisor == hypervisor)

    def vm_by_name(self, name: str) -> VM | None:
        return next((vm for vm in self.vms.values() if vm.name == name), None)

    def vm_by_ip(self, ip: str) -> VM | None:
        return next((vm for vm in self.vms.values() if ip in vm.ips), None)


def normalize_mac(mac: str) -> str:
    parts = mac.strip().lower().replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdef" for c in p) for p in parts):
        raise ValueError(f"not a MAC address: {mac!r}")
    return ":".join(parts)


def normalize_ipv4(ip: str) -> str:
    try:
        return str(ipaddress.IPv4Address(ip.strip()))
    except (ipaddress.AddressValueError, ValueError, AttributeError) as exc:
        raise ValueError(f"not an IPv4 address: {ip!r}") from exc


PROTOCOLS = ("tcp", "udp", "icmp", "any")
_PORT_RANGE = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")


def parse_port(text: str) -> Port:
    """Parse "tcp/5432", "udp/1000-2000", "icmp", "any". Raises ValueError naming the fault."""
    text = str(text).strip().lower()
    proto, _, ports = text.partition("/")
    if proto not in PROTOCOLS:
        raise ValueError(f"unknown protocol {proto!r} (use one of {', '.join(PROTOCOLS)})")
    if proto in ("icmp", "any"):
        if ports:
            raise ValueError(f"{proto} takes no port, got {text!r}")
        return Port(proto)
    if not ports:
        raise ValueError(f"{proto} needs a port or range, e.g. {proto}/443 or {proto}/8000-8080")
    found = _PORT_RANGE.fullmatch(ports)
    if found is None:
        raise ValueError(f"port {ports!r} is not a number or range (e.g. 443 or 8000-8080)")
    low = int(found.group(1))
    high = int(found.group(2)) if found.group(2) else low
    for p in (low, high):
        if not 1 <= p <= 65535:
            raise ValueError(f"port {p} out of range (1-65535)")
    if low > high:
        raise ValueError(f"port range {low}-{high} is reversed")
    return Port(proto, low, high)


def _lenient_port_list(text: str) -> list[Port]:
    """Guest-reported port lists: skip what does not parse rather than fail the whole VM."""
    out = []
    for part in text.split(","):
        try:
            out.append(parse_port(part))
        except ValueError:
            continue
    return out


def parse_port_list(text: str) -> tuple[Port, ...]:
    return tuple(parse_port(p) for p in text.split(",") if p.strip())


def format_port_list(ports: Iterable[Port]) -> str:
    return ",".join(str(p) for p in sorted(set(ports)))
