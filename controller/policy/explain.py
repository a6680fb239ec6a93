"""explain(src, dst, proto, port): the verdict, the deciding rule, and why each side is or is not
in each group that rule names — attribute by attribute, with provenance.

It reads policy semantics directly (not flows), so tests can hold the compiled datapath to it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from controller.flows.compile import World, remediation_members
from controller.identity.groups import GroupDef
from controller.identity.selector import Evidence, explain_match
from controller.model import VM
from controller.policy.schema import (
    AnyEndpoint,
    AppService,
    CidrEndpoint,
    Endpoint,
    GroupEndpoint,
    Rule,
)

DEFAULT_DENY = "default deny: no enabled rule matches"


@dataclass(frozen=True)
class Membership:
    group: str
    vm: str  # VM name
    member: bool
    selector: str
    evidence: tuple[Evidence, ...]

    def lines(self) -> list[str]:
        head = f"{self.vm} is {'' if self.member else 'NOT '}a member of group {self.group!r} ({self.selector})"
        out = [head]
        for ev in self.evidence:
            mark = "yes" if ev.satisfied else "no "
            facts = "; ".join(f.describe() for f in ev.facts) or "no such attribute"
            out.append(f"    [{mark}] {ev.term}  <- {facts}")
        return out


@dataclass(frozen=True)
class Explanation:
    src: str
    dst: str
    protocol: str
    port: int
    verdict: str  # "allow" | "deny" | "reject"
    rule: Rule | None  # the deciding rule; None = default deny or unreachable
    reason: str
    enforced_at: tuple[str, ...]  # where the verdict is enforced in the datapath
    monitored: tuple[Rule, ...]  # monitor-only rules that match: counted, not enforced
    memberships: tuple[Membership, ...]

    @property
    def allowed(self) -> bool:
        return self.verdict == "allow"

    def lines(self) -> list[str]:
        svc = self.protocol if self.protocol == "icmp" else f"{self.protocol}/{self.port}"
        out = [f"{self.src} -> {self.dst} {svc}: {self.verdict.upper()}"]
        if self.rule is not None:
            r = self.rule
            out.append(f"  decided by rule {r.id!r} (tier {r.tier}, position {r.position}, action {r.action}): "
                       f"{r.source} -> {r.destination} [{', '.join(map(str, r.services)) or 'any'}]")
        else:
            out.append(f"  {self.reason}")
        for point in self.enforced_at:
            out.append(f"  enforced {point}")
        for r in self.monitored:
            out.append(f"  monitor-only rule {r.id!r} would {r.action} this (counted, not enforced)")
        for m in self.memberships:
            out.extend("  " + line for line in m.lines())
        return out


def _ip_in(ip: str, cidr: str) -> bool:
    return ipaddress.IPv4Address(ip) in ipaddress.IPv4Network(cidr)


def _endpoint_matches(ep: Endpoint, vm: VM | None, ip: str, members: Mapping[str, frozenset[str]]) -> bool:
    if isinstance(ep, AnyEndpoint):
        return True
    if isinstance(ep, CidrEndpoint):
        return _ip_in(ip, ep.cidr)
    return vm is not None and vm.uuid in members.get(ep.group, frozenset())


def _service_matches(rule: Rule, dst: VM | None, protocol: str, port: int) -> bool:
    if not rule.services:
        return True
    for svc in rule.services:
        if isinstance(svc, AppService):
            if dst is not None and any(p.covers(protocol, port) for p in dst.app_ports(svc.app)):
                return True
        elif svc.covers(protocol, port):
            return True
    return False


def rule_matches(rule: Rule, world: World, src: VM, src_ip: str, dst: VM | None, dst_ip: str,
                 protocol: str, port: int) -> bool:
    return (
        rule.enabled
        and _endpoint_matches(rule.source, src, src_ip, world.members)
        and _endpoint_matches(rule.destination, dst, dst_ip, world.members)
        and _service_matches(rule, dst, protocol, port)
    )


def membership(group: GroupDef, vm: VM) -> Membership:
    """Whether `vm` is in `group`, test by test, with the facts that decided each."""
    member, evidence = explain_match(group.selector, vm)
    return Membership(group.name, vm.name, member, group.text, evidence)


def _memberships(rule: Rule, groups: Mapping[str, GroupDef], src: VM, dst: VM | None) -> list[Membership]:
    return [
        membership(groups[ep.group], vm)
        for ep, vm in ((rule.source, src), (rule.destination, dst))
        if isinstance(ep, GroupEndpoint) and vm is not None and ep.group in groups
    ]


def _where(vm: VM, direction: str) -> str:
    ports = ",".join(str(n.ofport) for n in vm.vnics if n.ofport is not None) or "unbound"
    return f"at {direction} of {vm.name} (hypervisor {vm.hypervisor}, port {ports})"


def _ingress_point(src: VM, dst: VM) -> str:
    if dst.hypervisor == src.hypervisor:
        # docs/pipeline.md: one bridge, one judgement; ingress only tracks the connection.
        return _where(dst, "ingress") + ": conntrack only, the same bridge's egress judged it"
    return _where(dst, "ingress")


def explain(world: World, groups: Mapping[str, GroupDef], src: VM, dst: VM | str, protocol: str, port: int) -> Explanation:
    """Why a new connection from `src` to `dst` (a VM or an IPv4 address) is allowed or not."""
    dst_vm = dst if isinstance(dst, VM) else world.inventory.vm_by_ip(dst)
    dst_ip = dst if isinstance(dst, str) else dst.ips[0]
    src_ip = src.ips[0] if src.ips else "0.0.0.0"
    dst_name = dst_vm.name if dst_vm is not None else dst_ip
    port = 0 if protocol == "icmp" else port
    points = (_where(src, "egress"),) + ((_ingress_point(src, dst_vm),) if dst_vm is not None else ())
    ordered = world.policy.ordered()
    matching = [r for r in ordered if rule_matches(r, world, src, src_ip, dst_vm, dst_ip, protocol, port)]
    monitored = tuple(r for r in matching if r.monitor)
    deciding = next((r for r in matching if not r.monitor), None)

    def result(verdict: str, rule: Rule | None, reason: str, members: list[Membership]) -> Explanation:
        return Explanation(src.name, dst_name, protocol, port, verdict, rule, reason, points, monitored, tuple(members))

    if dst_vm is None and world.inventory.gateway is None:
        return result("deny", None, f"{dst_ip} is not a VM and the fleet has no gateway: no route", [])
    isolated = quarantine_verdict(world, src, dst_vm)
    if isolated is not None:
        return result(isolated[0], None, isolated[1], [])
    if deciding is not None:
        return result(str(deciding.action), deciding, f"rule {deciding.id}", _memberships(deciding, groups, src, dst_vm))
    # Default deny: show why the rules that name this service did not apply.
    near = [r for r in ordered if r.enabled and not r.monitor and _service_matches(r, dst_vm, protocol, port)]
    members = [m for r in near for m in _memberships(r, groups, src, dst_vm)]
    return result("deny", None, DEFAULT_DENY, _unique(members))


def quarantine_verdict(world: World, src: VM, dst: VM | None) -> tuple[str, str] | None:
    """Quarantine decides before any rule: (verdict, reason), or None if neither side is
    quarantined. Only traffic between a quarantined VM and the remediation group passes."""
    held = [(vm, world.quarantined[vm.uuid]) for vm in (src, dst) if vm is not None and vm.uuid in world.quarantined]
    if not held:
        return None
    reason = "quarantined: " + "; ".join(f"{vm.name}: {', '.join(reasons)}" for vm, reasons in held)
    if len(held) == 1 and dst is not None:
        other = dst if held[0][0].uuid == src.uuid else src
        if other.uuid in {vm.uuid for vm in remediation_members(world)}:
            return "allow", f"{reason} (remediation group {world.remediation_group!r} stays reachable)"
    return "deny", reason


def _unique(items: list[Membership]) -> list[Membership]:
    seen: set[tuple[str, str]] = set()
    out = []
    for m in items:
        if (m.group, m.vm) not in seen:
            seen.add((m.group, m.vm))
            out.append(m)
    return out
