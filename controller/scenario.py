"""Scenario files: a whole world (hypervisors, VMs and their context, directory, groups, policy)
in one YAML document, for examples, simulation and tests. See docs/scenario.md.

Everything wrong with a file is reported in one ScenarioError, each fault with its location,
so a user fixes a file in one round rather than one error at a time.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from controller.identity.groups import GroupDef
from controller.identity.selector import Term
from controller.model import (
    VM,
    Attr,
    Fact,
    Gateway,
    Hypervisor,
    Inventory,
    Port,
    Provenance,
    VNic,
    format_port_list,
    normalize_ipv4,
    normalize_mac,
    parse_port,
)
from controller.policy.load import (
    at,
    index,
    int_field,
    list_field,
    mapping_fields,
    parse_policy,
    str_field,
    type_name,
)
from controller.policy.schema import Policy
from controller.policy.validate import Problem

__all__ = ["Scenario", "ScenarioError", "default_vm_uuid", "load_scenario", "parse_scenario"]

_TOP_KEYS = ("now", "gateway", "hypervisors", "directory", "vms", "groups", "policy")
_HV_KEYS = ("uplink", "dpid")
_VM_KEYS = ("uuid", "tags", "vnics", "context", "authoritative")
_VNIC_KEYS = ("ips", "ofport", "name")
_CONTEXT_KEYS = ("observed_at", "users", "apps", "os", "labels", "posture")
_POSTURE_VALUES = ("pass", "fail")

OFPP_MAX = 0xFFFFFF00  # highest physical port number in OpenFlow 1.3+; above are reserved ports
DPID_MAX = (1 << 64) - 1


@dataclass(frozen=True)
class Scenario:
    inventory: Inventory
    directory: Mapping[str, frozenset[str]]  # user -> directory groups
    policy: Policy
    groups: Mapping[str, GroupDef]
    now: float


class ScenarioError(ValueError):
    """Every problem found in a scenario; str() lists them one per line."""

    def __init__(self, problems: Iterable[Problem], source: str = "<scenario>") -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        self.source = source
        count = len(self.problems)
        header = f"{source}: {count} problem{'s' if count != 1 else ''}"
        super().__init__("\n".join([header, *(f"  {p}" for p in self.problems)]))


def default_vm_uuid(name: str) -> str:
    # Stable across runs, so flows, cookies and expected results in tests do not churn.
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "goldilocks:vm:" + name))


# ---- entry points ---------------------------------------------------------------------------


def load_scenario(path: str | os.PathLike[str]) -> Scenario:
    """Read and parse a YAML scenario file."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError([Problem(source, f"cannot read file: {exc}")], source) from exc
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ScenarioError([yaml_problem(source, exc)], source) from exc
    return parse_scenario(data, source)


def load_yaml(text: str) -> Any:
    """YAML as plain data; a duplicate mapping key is an error, not a silent overwrite."""
    return yaml.load(text, Loader=_StrictLoader)


def parse_scenario(data: object, source: str = "<scenario>") -> Scenario:
    """Build a Scenario from plain data; raise ScenarioError listing every problem."""
    problems: list[Problem] = []
    if data is None:
        raise ScenarioError([Problem(source, "the scenario is empty")], source)
    top = mapping_fields(data, "", (), _TOP_KEYS, problems)
    if top is None:
        raise ScenarioError(problems, source)
    now = _number(top.get("now", 0), "now", problems) or 0.0
    gateway = _parse_gateway(top.get("gateway"), problems)
    hypervisors = _parse_hypervisors(top.get("hypervisors"), problems)
    directory = _parse_directory(top.get("directory"), problems)
    vms = _parse_vms(top.get("vms"), now, problems)
    problems.extend(_check_inventory(hypervisors, vms, gateway))
    policy, groups, policy_problems = parse_policy(top.get("policy"), top.get("groups"))
    problems.extend(policy_problems)
    if problems or policy is None:
        raise ScenarioError(problems, source)
    inventory = Inventory(
        hypervisors={h.hypervisor.name: h.hypervisor for h in hypervisors if h.hypervisor},
        vms={d.vm.uuid: d.vm for d in vms if d.vm},
        gateway=gateway,
    )
    return Scenario(inventory, directory, policy, groups, now)


# ---- YAML -------------------------------------------------------------------------------------


# libyaml's parser when PyYAML has it: the pure-Python one needs seconds for a 1000-VM scenario.
_SafeLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_SafeLoader):  # type: ignore[misc, valid-type]
    """SafeLoader that refuses duplicate mapping keys, which PyYAML would silently overwrite."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[object, object]:
    loader.flatten_mapping(node)
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, (str, int, float, bool)):
            continue  # unhashable keys are PyYAML's own error to report
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def yaml_problem(source: str, exc: yaml.YAMLError) -> Problem:
    mark = getattr(exc, "problem_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    reason = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    return Problem(where, f"YAML syntax error: {reason}" + (f" ({context})" if context else ""))


# ---- small values -----------------------------------------------------------------------------


def _number(value: object, loc: str, problems: list[Problem]) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        problems.append(Problem(loc, f"expected a time in epoch seconds, got {type_name(value)} {value!r}"))
        return None
    if value < 0:
        problems.append(Problem(loc, f"time {value} is negative"))
        return None
    return float(value)


def _mac(value: object, loc: str, problems: list[Problem]) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML 1.1 reads an unquoted 10:00:00:00:00:01 as a base-60 number.
        problems.append(Problem(loc, f"MAC address read as the number {value}; quote it, e.g. \"02:00:00:00:00:01\""))
        return None
    text = str_field(value, loc, problems)
    return None if text is None else _convert(normalize_mac, text, loc, problems)


def _ipv4(value: object, loc: str, problems: list[Problem]) -> str | None:
    text = str_field(value, loc, problems)
    return None if text is None else _convert(normalize_ipv4, text, loc, problems)


def _convert(fn: Callable[[str], str], text: str, loc: str, problems: list[Problem]) -> str | None:
    try:
        return fn(text)
    except ValueError as exc:
        problems.append(Problem(loc, str(exc)))
        return None


def _ofport(value: object, loc: str, problems: list[Problem]) -> int | None:
    return int_field(value, loc, problems, 1, OFPP_MAX)


def _key(attr: Attr, value: object, loc: str, problems: list[Problem]) -> str | None:
    """A tag or posture key, held to the rules a selector's `tag.KEY` obeys so it stays selectable."""
    text = str_field(value, loc, problems)
    if text is None:
        return None
    try:
        Term(attr, text)
    except ValueError as exc:
        problems.append(Problem(loc, str(exc)))
        return None
    return text


def _str_list(value: object, loc: str, problems: list[Problem]) -> tuple[str, ...]:
    items = list_field(value, loc, problems, lambda item, where: str_field(item, where, problems))
    return tuple(i for i in items or () if i is not None)


# ---- gateway, hypervisors, directory ---------------------------------------------------------


def _parse_gateway(data: object, problems: list[Problem]) -> Gateway | None:
    if data is None:
        return None
    fields = mapping_fields(data, "gateway", ("ip", "mac"), (), problems)
    if fields is None or "ip" not in fields or "mac" not in fields:
        return None
    ip = _ipv4(fields["ip"], "gateway.ip", problems)
    mac = _mac(fields["mac"], "gateway.mac", problems)
    return Gateway(ip, mac) if ip and mac else None


@dataclass(frozen=True)
class _HvDraft:
    location: str
    name: str | None
    hypervisor: Hypervisor | None


def _parse_hypervisors(data: object, problems: list[Problem]) -> tuple[_HvDraft, ...]:
    if data is None:
        return ()
    drafts = list_field(data, "hypervisors", problems, lambda item, loc: _parse_hypervisor(item, loc, problems))
    return tuple(d for d in drafts or () if d is not None)


def _parse_hypervisor(data: object, loc: str, problems: list[Problem]) -> _HvDraft | None:
    fields = mapping_fields(data, loc, ("name",), _HV_KEYS, problems)
    if fields is None:
        return None
    before = len(problems)
    name = str_field(fields["name"], at(loc, "name"), problems) if "name" in fields else None
    uplink = _ofport(fields["uplink"], at(loc, "uplink"), problems) if fields.get("uplink") is not None else None
    dpid = int_field(fields["dpid"], at(loc, "dpid"), problems, 0, DPID_MAX) if fields.get("dpid") is not None else None
    ok = name is not None and len(problems) == before
    return _HvDraft(loc, name, Hypervisor(name, uplink, dpid) if ok and name else None)


def _parse_directory(data: object, problems: list[Problem]) -> dict[str, frozenset[str]]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        problems.append(Problem("directory", f"expected a mapping of user to list of groups, got {type_name(data)}"))
        return {}
    directory: dict[str, frozenset[str]] = {}
    for user, groups in data.items():
        loc = at("directory", str(user))
        if str_field(user, loc, problems) is not None:
            directory[str(user)] = frozenset(_str_list(groups if groups is not None else [], loc, problems))
    return directory


# ---- VMs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _VnicDraft:
    location: str
    vnic: VNic | None
    mac: str | None
    ips: tuple[tuple[str, str], ...]  # (location, ip) of each address that parsed
    ofport: int | None


@dataclass(frozen=True)
class _VmDraft:
    location: str
    name: str | None
    uuid: str | None
    hypervisor: str | None
    vnics: tuple[_VnicDraft, ...]
    vm: VM | None  # only when every field parsed


def _parse_vms(data: object, now: float, problems: list[Problem]) -> tuple[_VmDraft, ...]:
    if data is None:
        return ()
    drafts = list_field(data, "vms", problems, lambda item, loc: _parse_vm(item, loc, now, problems))
    return tuple(d for d in drafts or () if d is not None)


def _parse_vm(data: object, loc: str, now: float, problems: list[Problem]) -> _VmDraft | None:
    fields = mapping_fields(data, loc, ("name", "hypervisor"), _VM_KEYS, problems)
    if fields is None:
        return None
    before = len(problems)
    name = str_field(fields["name"], at(loc, "name"), problems) if "name" in fields else None
    hypervisor = str_field(fields["hypervisor"], at(loc, "hypervisor"), problems) if "hypervisor" in fields else None
    vm_uuid = _parse_uuid(fields.get("uuid"), name, at(loc, "uuid"), problems)
    vnics = _parse_vnics(fields.get("vnics"), at(loc, "vnics"), problems)
    facts = _parse_tags(fields.get("tags"), at(loc, "tags"), now, problems)
    facts |= _parse_context(fields.get("context"), at(loc, "context"), Provenance.GUEST, now, problems)
    facts |= _parse_context(fields.get("authoritative"), at(loc, "authoritative"), Provenance.AUTHORITATIVE, now, problems)
    vm = None
    if len(problems) == before and name and hypervisor and vm_uuid:
        vm = VM(vm_uuid, name, hypervisor, tuple(d.vnic for d in vnics if d.vnic), frozenset(facts))
    return _VmDraft(loc, name, vm_uuid, hypervisor, vnics, vm)


def _parse_uuid(value: object, name: str | None, loc: str, problems: list[Problem]) -> str | None:
    if value is None:
        return default_vm_uuid(name) if name else None
    text = str_field(value, loc, problems)
    if text is None:
        return None
    try:
        return str(uuid.UUID(text.strip()))
    except ValueError:
        problems.append(Problem(loc, f"not a UUID: {text!r}"))
        return None


def _parse_vnics(data: object, loc: str, problems: list[Problem]) -> tuple[_VnicDraft, ...]:
    if data is None:
        return ()
    drafts = list_field(data, loc, problems, lambda item, where: _parse_vnic(item, where, problems))
    return tuple(d for d in drafts or () if d is not None)


def _parse_vnic(data: object, loc: str, problems: list[Problem]) -> _VnicDraft | None:
    fields = mapping_fields(data, loc, ("mac",), _VNIC_KEYS, problems)
    if fields is None:
        return None
    before = len(problems)
    mac = _mac(fields["mac"], at(loc, "mac"), problems) if "mac" in fields else None
    ip_items = list_field(fields.get("ips", []), at(loc, "ips"), problems,
                          lambda item, where: _ipv4(item, where, problems)) or ()
    ips = tuple((index(at(loc, "ips"), i), ip) for i, ip in enumerate(ip_items) if ip is not None)
    ofport = _ofport(fields["ofport"], at(loc, "ofport"), problems) if fields.get("ofport") is not None else None
    name = str_field(fields.get("name", ""), at(loc, "name"), problems, nonempty=False)
    ok = len(problems) == before and mac is not None and name is not None
    vnic = VNic(mac, tuple(ip for _, ip in ips), ofport, name) if ok and mac and name is not None else None
    return _VnicDraft(loc, vnic, mac, ips, ofport)


# ---- facts ------------------------------------------------------------------------------------


def _parse_tags(data: object, loc: str, now: float, problems: list[Problem]) -> frozenset[Fact]:
    if data is None:
        return frozenset()
    if not isinstance(data, Mapping):
        problems.append(Problem(loc, f"expected a mapping of tag name to value, got {type_name(data)}"))
        return frozenset()
    facts: set[Fact] = set()
    for key, value in data.items():
        where = at(loc, str(key))
        name = _key(Attr.TAG, key, where, problems)
        # No coercion: YAML 1.1 reads yes/no/on/off as booleans, and 'yes' must not become 'true'.
        text = str_field(value, where, problems, nonempty=False)
        if name is not None and text is not None:
            facts.add(Fact(Attr.TAG, name, text, Provenance.PLATFORM, now))
    return frozenset(facts)


def _parse_context(data: object, loc: str, provenance: Provenance, now: float, problems: list[Problem]) -> frozenset[Fact]:
    if data is None:
        return frozenset()
    fields = mapping_fields(data, loc, (), _CONTEXT_KEYS, problems)
    if fields is None:
        return frozenset()
    observed = now if fields.get("observed_at") is None else _number(fields["observed_at"], at(loc, "observed_at"), problems)
    when = now if observed is None else observed
    facts: set[Fact] = set()
    for user in _str_list(fields.get("users", []), at(loc, "users"), problems):
        facts.add(Fact(Attr.USER, "", user, provenance, when))
    for label in _str_list(fields.get("labels", []), at(loc, "labels"), problems):
        facts.add(Fact(Attr.LABEL, "", label, provenance, when))
    if fields.get("os") is not None:
        os_name = str_field(fields["os"], at(loc, "os"), problems)
        if os_name is not None:
            facts.add(Fact(Attr.OS, "", os_name, provenance, when))
    facts |= _parse_apps(fields.get("apps"), at(loc, "apps"), provenance, when, problems)
    facts |= _parse_posture(fields.get("posture"), at(loc, "posture"), provenance, when, problems)
    return frozenset(facts)


def _parse_apps(data: object, loc: str, provenance: Provenance, when: float, problems: list[Problem]) -> set[Fact]:
    if data is None:
        return set()
    if not isinstance(data, Mapping):
        problems.append(Problem(loc, f"expected a mapping of app name to its ports, got {type_name(data)}"))
        return set()
    facts: set[Fact] = set()
    for app, ports in data.items():
        where = at(loc, str(app))
        name = str_field(app, where, problems)
        items = list_field(ports if ports is not None else [], where, problems,
                           lambda item, at_: _app_port(item, at_, problems))
        if name is not None and items is not None and None not in items:
            facts.add(Fact(Attr.APP, name, format_port_list(p for p in items if p), provenance, when))
    return facts


def _app_port(value: object, loc: str, problems: list[Problem]) -> Port | None:
    text = str_field(value, loc, problems)
    if text is None:
        return None
    try:
        port = parse_port(text)
    except ValueError as exc:
        problems.append(Problem(loc, str(exc)))
        return None
    if port.protocol not in ("tcp", "udp"):
        # app:NAME services open exactly these ports; 'any' would open everything.
        problems.append(Problem(loc, f"an app listens on tcp or udp ports, not {port}"))
        return None
    return port


def _parse_posture(data: object, loc: str, provenance: Provenance, when: float, problems: list[Problem]) -> set[Fact]:
    if data is None:
        return set()
    if not isinstance(data, Mapping):
        problems.append(Problem(loc, f"expected a mapping of check name to pass or fail, got {type_name(data)}"))
        return set()
    facts: set[Fact] = set()
    for check, verdict in data.items():
        where = at(loc, str(check))
        name = _key(Attr.POSTURE, check, where, problems)
        if verdict not in _POSTURE_VALUES:
            problems.append(Problem(where, f"expected pass or fail, got {type_name(verdict)} {verdict!r}"))
        elif name is not None:
            facts.add(Fact(Attr.POSTURE, name, str(verdict), provenance, when))
    return facts


# ---- inventory-wide checks --------------------------------------------------------------------


def _check_inventory(hvs: tuple[_HvDraft, ...], vms: tuple[_VmDraft, ...], gateway: Gateway | None) -> list[Problem]:
    problems: list[Problem] = []
    problems += _duplicates("hypervisor name", ((at(h.location, "name"), h.name) for h in hvs))
    problems += _duplicates("datapath id", (
        (at(h.location, "dpid"), h.hypervisor.dpid) for h in hvs if h.hypervisor and h.hypervisor.dpid is not None
    ))
    problems += _duplicates("VM name", ((at(v.location, "name"), v.name) for v in vms))
    problems += _duplicates("VM uuid", ((at(v.location, "uuid"), v.uuid) for v in vms))
    problems += _duplicates("MAC address", _macs(vms, gateway))
    problems += _duplicates("IP address", _ips(vms, gateway))
    problems += _unknown_hypervisors(hvs, vms)
    problems += _ofport_clashes(hvs, vms)
    return problems


def _macs(vms: tuple[_VmDraft, ...], gateway: Gateway | None) -> Iterable[tuple[str, str | None]]:
    if gateway is not None:
        yield "gateway.mac", gateway.mac
    for vm in vms:
        for nic in vm.vnics:
            yield at(nic.location, "mac"), nic.mac


def _ips(vms: tuple[_VmDraft, ...], gateway: Gateway | None) -> Iterable[tuple[str, str | None]]:
    if gateway is not None:
        yield "gateway.ip", gateway.ip
    for vm in vms:
        for nic in vm.vnics:
            yield from nic.ips


def _duplicates(what: str, items: Iterable[tuple[str, object]]) -> list[Problem]:
    first: dict[object, str] = {}
    problems: list[Problem] = []
    for loc, value in items:
        if value is None:
            continue
        if value in first:
            problems.append(Problem(loc, f"duplicate {what} {value!r} (already used at {first[value]})"))
        else:
            first[value] = loc
    return problems


def _unknown_hypervisors(hvs: tuple[_HvDraft, ...], vms: tuple[_VmDraft, ...]) -> list[Problem]:
    known = sorted({h.name for h in hvs if h.name})
    return [
        Problem(at(vm.location, "hypervisor"), f"unknown hypervisor {vm.hypervisor!r} (known: {', '.join(known) or 'none'})")
        for vm in vms if vm.hypervisor is not None and vm.hypervisor not in known
    ]


def _ofport_clashes(hvs: tuple[_HvDraft, ...], vms: tuple[_VmDraft, ...]) -> list[Problem]:
    # One bridge per hypervisor: an OpenFlow port number names one interface on it.
    users: dict[tuple[str, int], str] = {}
    for hv in hvs:
        if hv.hypervisor and hv.hypervisor.uplink_ofport is not None:
            users.setdefault((hv.hypervisor.name, hv.hypervisor.uplink_ofport), f"the uplink ({at(hv.location, 'uplink')})")
    problems: list[Problem] = []
    for vm in vms:
        for nic in vm.vnics:
            if vm.hypervisor is None or nic.ofport is None:
                continue
            key = (vm.hypervisor, nic.ofport)
            loc = at(nic.location, "ofport")
            if key in users:
                problems.append(Problem(loc, f"ofport {nic.ofport} on hypervisor {vm.hypervisor!r} is already used by {users[key]}"))
            else:
                users[key] = f"vNIC {nic.location} of VM {vm.name!r}"
    return problems
