"""What-if: a draft policy against the active one, before anything reaches a switch.

Which VM pairs and services become allowed or denied, and how each hypervisor's flow count
changes. Pure: it compiles and explains both worlds side by side.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from controller.flows.compile import World, compile_bridge
from controller.identity.groups import GroupDef, compute_members
from controller.model import VM, Port
from controller.policy.explain import explain
from controller.policy.schema import AppService, GroupEndpoint, Policy, Rule

MAX_PAIRS = 20_000  # VM pairs × services checked before narrowing to the changed rules' VMs


@dataclass(frozen=True)
class PairChange:
    src: str  # VM name
    dst: str  # VM name
    service: str  # "tcp/5432", "udp/53", "icmp"
    before: str  # verdict under the active policy: allow | deny | reject
    after: str  # verdict under the draft


@dataclass(frozen=True)
class FlowCountChange:
    hypervisor: str
    before: int
    after: int


@dataclass(frozen=True)
class WhatIf:
    newly_allowed: tuple[PairChange, ...]
    newly_denied: tuple[PairChange, ...]  # includes allow -> reject
    flows: tuple[FlowCountChange, ...]
    pairs_checked: int
    truncated: bool = False  # too many pairs: only VMs the changed rules name were checked


def policy_probes(policies: Iterable[Policy], vms: Iterable[VM]) -> list[tuple[str, int]]:
    """One (protocol, port) probe per service the policies name; app ports resolved on every VM."""
    vms = list(vms)
    probes: set[tuple[str, int]] = set()
    for policy in policies:
        for rule in policy.rules:
            for svc in rule.services:
                ports: list[Port] = [p for vm in vms for p in vm.app_ports(svc.app)] if isinstance(svc, AppService) else [svc]
                for p in ports:
                    if p.protocol in ("tcp", "udp"):
                        probes.add((p.protocol, p.low))
                    elif p.protocol == "icmp":
                        probes.add(("icmp", 0))
    return sorted(probes) or [("icmp", 0)]


def _changed_rules(active: Policy, draft: Policy) -> list[Rule]:
    before = {r.id: r for r in active.rules}
    after = {r.id: r for r in draft.rules}
    return [r for rid in before.keys() | after.keys() for r in (before.get(rid), after.get(rid))
            if r is not None and before.get(rid) != after.get(rid)]


def _focus(world: World, draft_members: Mapping[str, frozenset[str]], changed: list[Rule]) -> set[str] | None:
    """VMs the changed rules name (None: a changed rule names `any` or a CIDR, so everyone)."""
    out: set[str] = set()
    for rule in changed:
        for ep in (rule.source, rule.destination):
            if not isinstance(ep, GroupEndpoint):
                return None
            out |= world.members.get(ep.group, frozenset()) | draft_members.get(ep.group, frozenset())
    return out


def whatif(world: World, groups: Mapping[str, GroupDef], draft: Policy, draft_groups: Mapping[str, GroupDef],
           *, max_pairs: int = MAX_PAIRS) -> WhatIf:
    vms = sorted(world.inventory.vms.values(), key=lambda v: v.name)
    draft_members = compute_members(draft_groups, vms)
    draft_world = replace(world, members=draft_members, policy=draft)  # quarantine stays
    flows = tuple(FlowCountChange(hv, len(compile_bridge(world, hv, check=False)), len(compile_bridge(draft_world, hv)))
                  for hv in sorted(world.inventory.hypervisors))
    probes = policy_probes((world.policy, draft), vms)
    focus: set[str] | None = None
    if len(vms) * (len(vms) - 1) * len(probes) > max_pairs:
        focus = _focus(world, draft_members, _changed_rules(world.policy, draft))
    allowed: list[PairChange] = []
    denied: list[PairChange] = []
    checked = 0
    for src in vms:
        for dst in vms:
            if src is dst or (focus is not None and src.uuid not in focus and dst.uuid not in focus):
                continue
            for proto, port in probes:
                checked += 1
                before = explain(world, groups, src, dst, proto, port).verdict
                after = explain(draft_world, draft_groups, src, dst, proto, port).verdict
                if before == after:
                    continue
                change = PairChange(src.name, dst.name, proto if proto == "icmp" else f"{proto}/{port}", before, after)
                if after == "allow":
                    allowed.append(change)
                elif before == "allow":
                    denied.append(change)
    return WhatIf(tuple(allowed), tuple(denied), flows, checked, focus is not None)
