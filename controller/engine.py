"""The engine: the single writer. `handle(event)` updates identity, groups and the per-bridge
desired flows incrementally and returns the commands that bring each bridge there.

Incremental must equal full: after any event, `desired(hv)` is exactly what
`compile_bridge(self.world(), hv)` computes from scratch (tests/property holds this).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace

from controller.commands import Command, FlushZones, ProgramBridge
from controller.events import (
    ContextExpiry,
    ContextReported,
    DirectoryChanged,
    Event,
    GatewayChanged,
    HypervisorRemoved,
    HypervisorUpserted,
    PolicyChanged,
    PortsObserved,
    QuarantineReleased,
    QuarantineRequested,
    VmRemoved,
    VmTagsReplaced,
    VmUpserted,
)
from controller.flows.compile import (
    Flows,
    Liveness,
    PartKey,
    World,
    address_part,
    bridge_parts,
    gateway_part,
    port_part,
    quarantine_part,
    rule_groups,
    rule_liveness,
    rule_member_part,
    rule_parts,
)
from controller.flows.reconcile import FlowOp, diff, plan
from controller.flows.types import FlowSpec
from controller.identity.graph import Directory, effective_vm
from controller.identity.groups import GroupDef, GroupIndex
from controller.model import VM, Attr, Fact, Gateway, Hypervisor, Inventory, Provenance
from controller.policy.quarantine import (
    MANUAL_ONLY,
    QuarantinePolicy,
    QuarantineState,
    release,
    request,
    step,
    triggers,
)
from controller.policy.schema import AppService, Policy, Rule


@dataclass
class BridgeFlows:
    """Desired flows of one bridge, held as parts with a reference count per flow."""

    parts: dict[PartKey, Flows] = field(default_factory=dict)
    count: Counter[FlowSpec] = field(default_factory=Counter)
    rule_keys: dict[str, set[PartKey]] = field(default_factory=dict)  # rule id -> its parts' keys
    # Rule id -> the liveness its parts were compiled with; absent: unknown (recompile whole).
    live: dict[str, Liveness] = field(default_factory=dict)

    def replace(self, key: PartKey, flows: Flows) -> tuple[set[FlowSpec], set[FlowSpec]]:
        """Swap one part; return (flows that appeared, flows that disappeared)."""
        old = self.parts.pop(key, frozenset())
        if flows:
            self.parts[key] = flows
        if key[0] == "rule":
            keys = self.rule_keys.setdefault(key[1], set())
            (keys.add if flows else keys.discard)(key)
            if not keys:
                del self.rule_keys[key[1]]
        added, removed = set(), set()
        for f in old - flows:
            self.count[f] -= 1
            if self.count[f] == 0:
                del self.count[f]
                removed.add(f)
        for f in flows - old:
            self.count[f] += 1
            if self.count[f] == 1:
                added.add(f)
        return added, removed

    def flows(self) -> frozenset[FlowSpec]:
        return frozenset(self.count)


@dataclass(frozen=True)
class _Change:
    """What one event touched, to decide which parts to recompute."""

    vms: frozenset[str] = frozenset()  # uuids whose record or facts changed
    readdressed: frozenset[str] = frozenset()  # ...whose vNICs, addresses, ports or hypervisor changed
    reapped: frozenset[str] = frozenset()  # ...whose app ports changed
    old_vms: tuple[VM, ...] = ()  # their previous effective records (for vanished vNICs)
    groups: frozenset[str] = frozenset()  # groups some of `vms` joined or left
    regrouped: frozenset[str] = frozenset()  # groups redefined, or re-evaluated for every VM
    rules: frozenset[str] = frozenset()  # rule ids added, removed or changed
    everything: bool = False
    quarantine: bool = False  # the set of quarantined VMs changed
    flush: tuple[tuple[str, int], ...] = ()  # (hypervisor, zone) whose port changed hands


class Engine:
    def __init__(self, inventory: Inventory, directory: Directory, policy: Policy,
                 groups: Mapping[str, GroupDef],
                 expiries: Mapping[tuple[str, Provenance], float] | None = None,
                 quarantine: QuarantinePolicy = MANUAL_ONLY,
                 quarantined: Mapping[str, Iterable[str]] | None = None,
                 released: Mapping[str, Iterable[str]] | None = None) -> None:
        """`quarantine`: which triggers quarantine a VM (default: none, only operators' requests;
        `goldilocks run` passes the configured policy). `quarantined` (uuid -> reasons) and `released` (uuid -> trigger reasons acknowledged
        at the last release) rebuild quarantine state from the database; see `quarantined()`."""
        self.last_expired: tuple[tuple[str, str], ...] = ()  # (uuid, provenance) the last ContextExpiry dropped
        # When each source's context of each VM stops counting (epoch seconds).
        self._expires: dict[tuple[str, Provenance], float] = dict(expiries or {})
        self._hypervisors: dict[str, Hypervisor] = dict(inventory.hypervisors)
        self._gateway: Gateway | None = inventory.gateway
        self._raw: dict[str, VM] = dict(inventory.vms)  # as reported, facts from every source
        self._directory: dict[str, frozenset[str]] = {u: frozenset(g) for u, g in directory.items()}
        self._policy = policy
        self._groups: dict[str, GroupDef] = dict(groups)
        self._effective: dict[str, VM] = {u: effective_vm(vm, self._directory) for u, vm in self._raw.items()}
        self._index = GroupIndex(self._groups)
        for vm in self._effective.values():
            self._index.update_vm(vm)
        self._occupants: dict[str, dict[int, str]] = {}  # hypervisor -> ofport -> MAC seen there
        # What each hypervisor's last OVSDB snapshot shows plugged: (vm uuid, MAC) -> ofport, and
        # per VM the hypervisors that have a port of it (two during a live migration).
        self._plugged: dict[str, dict[tuple[str, str], int]] = {}
        self._plugged_at: dict[str, set[str]] = {}
        self._qpolicy = quarantine
        self._silent: set[str] = set()  # VMs whose guest context expired (agent silent)
        self._quarantine: dict[str, QuarantineState] = {}
        for uuid in set(quarantined or {}) | set(released or {}):
            state = QuarantineState(tuple((quarantined or {}).get(uuid, ())), frozenset((released or {}).get(uuid, ())))
            if state != QuarantineState():
                self._quarantine[uuid] = state
        self._quarantined = {u: st.reasons for u, st in self._quarantine.items() if st.quarantined}  # compiler reads
        self._touched: set[str] = set()  # during one event: VMs whose silence changed
        # Triggers holding at start that nobody acknowledged fire now (fail closed).
        self._step_quarantine(self._raw)
        self._bridges: dict[str, BridgeFlows] = {}
        for hv in self._hypervisors:
            self._rebuild_bridge(hv)

    # ---- reading -----------------------------------------------------------------------------

    def world(self) -> World:
        """An immutable snapshot, safe to hand to readers on other threads."""
        members = {g: self._index.members(g) for g in self._groups}
        inventory = Inventory(dict(self._hypervisors), dict(self._effective), self._gateway)
        return World(inventory, members, self._policy, quarantined=dict(self._quarantined),
                     remediation_group=self._qpolicy.remediation_group)

    def view(self) -> World:
        """The current world without copying: only for use on the engine's own thread, and only
        until the next event."""
        inventory = Inventory(self._hypervisors, self._effective, self._gateway)
        return World(inventory, _MembersView(self._index, self._groups), self._policy,
                     quarantined=self._quarantined, remediation_group=self._qpolicy.remediation_group)

    @property
    def groups(self) -> Mapping[str, GroupDef]:
        return dict(self._groups)

    @property
    def directory(self) -> Mapping[str, frozenset[str]]:
        return dict(self._directory)

    @property
    def quarantine_policy(self) -> QuarantinePolicy:
        return self._qpolicy

    def quarantined(self) -> Mapping[str, tuple[str, ...]]:
        """Quarantined VMs (uuid -> reasons, in the order they fired): persist this."""
        return dict(self._quarantined)

    def released(self) -> Mapping[str, tuple[str, ...]]:
        """Per VM, the trigger reasons an operator acknowledged by releasing it while they held:
        they quarantine again only after clearing and firing anew. Persist this too."""
        return {u: tuple(sorted(s.released)) for u, s in self._quarantine.items() if s.released}

    def desired(self, hypervisor: str) -> frozenset[FlowSpec]:
        return self._bridges[hypervisor].flows()

    def hypervisor_records(self) -> dict[str, Hypervisor]:
        return dict(self._hypervisors)

    def hypervisors(self) -> tuple[str, ...]:
        return tuple(sorted(self._hypervisors))

    # ---- writing -----------------------------------------------------------------------------

    def handle(self, event: Event) -> list[Command]:
        before = frozenset(self._quarantined)
        self._touched = set()
        change = self._apply(event)
        self._step_quarantine(self._touched | change.vms)
        if frozenset(self._quarantined) != before:
            change = replace(change, quarantine=True)
        world = self.view()
        commands: list[Command] = []
        for hv in sorted(self._hypervisors):
            ops = self._recompute(hv, change, world)
            if ops:
                commands.append(ProgramBridge(hv, ops))
        # After the new owner's flows: nothing of the old owner's connections may survive.
        for hv in sorted({hv for hv, _ in change.flush}):
            commands.append(FlushZones(hv, tuple(sorted(z for h, z in change.flush if h == hv))))
        return commands

    def _apply(self, event: Event) -> _Change:
        if isinstance(event, HypervisorUpserted):
            hv, old = event.hypervisor, self._hypervisors.get(event.hypervisor.name)
            if old is not None:
                # What OVSDB reported (dpid, uplink) stands until OVSDB says otherwise.
                hv = replace(hv, dpid=hv.dpid if hv.dpid is not None else old.dpid,
                             uplink_ofport=hv.uplink_ofport if hv.uplink_ofport is not None else old.uplink_ofport)
            self._hypervisors[hv.name] = hv
            return _Change(everything=True)
        if isinstance(event, HypervisorRemoved):
            self._hypervisors.pop(event.name, None)
            self._bridges.pop(event.name, None)
            self._occupants.pop(event.name, None)
            self._forget_snapshot(event.name, self._plugged.pop(event.name, {}))
            return _Change(everything=True)
        if isinstance(event, GatewayChanged):
            self._gateway = event.gateway
            return _Change(everything=True)
        if isinstance(event, VmUpserted):
            return self._set_vms({event.vm.uuid: _keep_binding(self._raw.get(event.vm.uuid), event.vm)})
        if isinstance(event, VmTagsReplaced):
            raw = self._raw.get(event.uuid)
            return _Change() if raw is None else self._set_vms({event.uuid: with_platform_tags(raw, event.tags)})
        if isinstance(event, VmRemoved):
            for provenance in (Provenance.GUEST, Provenance.AUTHORITATIVE):
                self._expires.pop((event.uuid, provenance), None)
            self._silent.discard(event.uuid)
            # Quarantine outlives the record: a VM deleted and re-created is still isolated.
            return self._set_vms({event.uuid: None})
        if isinstance(event, QuarantineRequested):
            if event.uuid in self._raw:
                self._set_quarantine(event.uuid, request(self._quarantine_of(event.uuid), event.reason, event.by))
            return _Change()
        if isinstance(event, QuarantineReleased):
            vm = self._raw.get(event.uuid)
            current = triggers(vm, event.uuid in self._silent, self._qpolicy) if vm is not None else ()
            self._set_quarantine(event.uuid, release(self._quarantine_of(event.uuid), current))
            return _Change()
        if isinstance(event, ContextReported):
            return self._report_context(event)
        if isinstance(event, DirectoryChanged):
            return self._change_directory(event)
        if isinstance(event, PolicyChanged):
            return self._change_policy(event.policy, event.groups)
        if isinstance(event, PortsObserved):
            return self._observe_ports(event)
        if isinstance(event, ContextExpiry):
            return self._expire(event.now)
        raise TypeError(f"unknown event {event!r}")

    def _observe_ports(self, event: PortsObserved) -> _Change:
        """OVSDB is the truth for where a vNIC is plugged: bind, unbind and move VMs."""
        hv = self._hypervisors.get(event.hypervisor)
        if hv is None:
            return _Change()
        new_hv = replace(hv, dpid=event.dpid, uplink_ofport=event.uplink_ofport)
        if new_hv != hv:
            self._hypervisors[hv.name] = new_hv
        changed = self._take_snapshot(event.hypervisor, {(p.vm_uuid.lower(), p.mac): p.ofport for p in event.ports})
        updates = {}
        for vm in self._raw.values():
            if vm.hypervisor == event.hypervisor or vm.uuid.lower() in changed:
                new = _place(vm, self._plugged, self._plugged_at.get(vm.uuid.lower(), ()))
                if new != vm:
                    updates[vm.uuid] = new
        change = self._set_vms(updates)
        occupants = {p.ofport: p.mac for p in event.ports}
        before = self._occupants.get(event.hypervisor, {})
        self._occupants[event.hypervisor] = occupants
        handed_over = tuple((event.hypervisor, port) for port, mac in before.items() if occupants.get(port) != mac)
        return replace(change, everything=new_hv != hv, flush=handed_over)

    def _take_snapshot(self, hypervisor: str, plugged: dict[tuple[str, str], int]) -> set[str]:
        """Keep `hypervisor`'s latest snapshot; return the VMs (lowercase uuids) whose ports there changed."""
        old = self._plugged.get(hypervisor, {})
        self._plugged[hypervisor] = plugged
        self._forget_snapshot(hypervisor, old)
        for uuid, _ in plugged:
            self._plugged_at.setdefault(uuid, set()).add(hypervisor)
        return {uuid for (uuid, _mac), _ofport in old.items() ^ plugged.items()}

    def _forget_snapshot(self, hypervisor: str, plugged: Mapping[tuple[str, str], int]) -> None:
        for uuid, _ in plugged:
            where = self._plugged_at.get(uuid)
            if where is not None:
                where.discard(hypervisor)
                if not where:
                    del self._plugged_at[uuid]

    def _report_context(self, event: ContextReported) -> _Change:
        vm = self._raw.get(event.uuid)
        if vm is None:
            return _Change()
        if event.provenance is Provenance.PLATFORM:
            raise ValueError("platform facts come with the VM record, not as context")
        key = (vm.uuid, event.provenance)
        if event.provenance is Provenance.GUEST and vm.uuid in self._silent:
            self._silent.discard(vm.uuid)  # the agent speaks again
            self._touched.add(vm.uuid)
        if event.expires_at is None:
            self._expires.pop(key, None)
        else:
            self._expires[key] = event.expires_at
        kept = frozenset(f for f in vm.facts if f.provenance is not event.provenance)
        old = frozenset(f for f in vm.facts if f.provenance is event.provenance)
        new = replace(vm, facts=kept | event.facts)
        if _claims(old) == _claims(event.facts):
            # A heartbeat: the same claims, newer. No flow depends on when a fact was seen.
            self._raw[vm.uuid] = new
            self._effective[vm.uuid] = effective_vm(new, self._directory)
            return _Change()
        return self._set_vms({vm.uuid: new})

    def _expire(self, now: float) -> _Change:
        due = [key for key, at in self._expires.items() if at <= now]
        self.last_expired = tuple(sorted((u, p.value) for u, p in due))
        updates: dict[str, VM | None] = {}
        for uuid, provenance in due:
            del self._expires[(uuid, provenance)]
            if provenance is Provenance.GUEST and uuid in self._raw:
                self._silent.add(uuid)
                self._touched.add(uuid)
            vm = updates.get(uuid) or self._raw.get(uuid)
            if vm is not None:
                updates[uuid] = replace(vm, facts=frozenset(f for f in vm.facts if f.provenance is not provenance))
        return self._set_vms(updates) if updates else _Change()

    def _change_directory(self, event: DirectoryChanged) -> _Change:
        if event.groups:
            self._directory[event.user] = frozenset(event.groups)
        else:
            self._directory.pop(event.user, None)
        return self._set_vms({}, rederive=True)

    def _set_vms(self, updates: Mapping[str, VM | None], rederive: bool = False) -> _Change:
        """Store raw VM records (None removes) and update effective records and groups."""
        for uuid, vm in updates.items():
            if vm is None:
                self._raw.pop(uuid, None)
            else:
                self._raw[uuid] = vm
        touched = set(self._raw) if rederive else set(updates)
        old: list[VM] = []
        changed_vms: set[str] = set()
        readdressed: set[str] = set()
        reapped: set[str] = set()
        changed_groups: set[str] = set()
        for uuid in touched:
            before = self._effective.get(uuid)
            raw = self._raw.get(uuid)
            after = effective_vm(raw, self._directory) if raw is not None else None
            if before == after:
                continue
            changed_vms.add(uuid)
            if _addressing(before) != _addressing(after):
                readdressed.add(uuid)
            if _apps(before) != _apps(after):
                reapped.add(uuid)
            if before is not None:
                old.append(before)
            if after is None:
                self._effective.pop(uuid, None)
                changed_groups |= self._index.remove_vm(uuid)
            else:
                self._effective[uuid] = after
                changed_groups |= self._index.update_vm(after)
        return _Change(vms=frozenset(changed_vms), readdressed=frozenset(readdressed), reapped=frozenset(reapped),
                       old_vms=tuple(old), groups=frozenset(changed_groups))

    def _change_policy(self, policy: Policy, groups: Mapping[str, GroupDef]) -> _Change:
        before = {r.id: r for r in self._policy.rules}
        after = {r.id: r for r in policy.rules}
        rules = {rid for rid in before.keys() | after.keys() if before.get(rid) != after.get(rid)}
        changed_groups = self._index.set_groups(groups, self._effective.values())
        redefined = {g for g in set(groups) | set(self._groups) if self._groups.get(g) != groups.get(g)}
        self._policy = policy
        self._groups = dict(groups)
        return _Change(regrouped=frozenset(changed_groups | redefined), rules=frozenset(rules))

    # ---- quarantine --------------------------------------------------------------------------

    def _quarantine_of(self, uuid: str) -> QuarantineState:
        return self._quarantine.get(uuid, QuarantineState())

    def _set_quarantine(self, uuid: str, state: QuarantineState) -> None:
        if state == QuarantineState():
            self._quarantine.pop(uuid, None)
        else:
            self._quarantine[uuid] = state
        if state.quarantined:
            self._quarantined[uuid] = state.reasons
        else:
            self._quarantined.pop(uuid, None)

    def _step_quarantine(self, uuids: Iterable[str]) -> None:
        """Step the quarantine state of `uuids` with the triggers that hold for them now."""
        for uuid in uuids:
            vm = self._raw.get(uuid)
            current = triggers(vm, uuid in self._silent, self._qpolicy) if vm is not None else ()
            old = self._quarantine_of(uuid)
            new = step(old, current)
            if new != old:
                self._set_quarantine(uuid, new)

    def _quarantine_affected(self, change: _Change, world: World) -> bool:
        """The quarantine part reads the quarantined set, the remediation group's members and the
        addresses and ports of both."""
        if change.quarantine:
            return True
        if not self._quarantined:
            return False
        group = self._qpolicy.remediation_group
        if group is not None and (group in change.groups or group in change.regrouped):
            return True
        touched = change.readdressed
        if not touched:
            return False
        helpers = world.members.get(group, frozenset()) if group is not None else frozenset()
        return bool(touched & (self._quarantined.keys() | helpers))

    # ---- recompute ---------------------------------------------------------------------------

    def _rebuild_bridge(self, hv: str, world: World | None = None) -> tuple[set[FlowSpec], set[FlowSpec]]:
        bridge = self._bridges.setdefault(hv, BridgeFlows())
        world = world or self.view()
        fresh = bridge_parts(world, hv)
        bridge.live = {rule.id: rule_liveness(rule, world, hv) for rule in self._policy.rules}
        added: set[FlowSpec] = set()
        removed: set[FlowSpec] = set()
        for key in set(bridge.parts) | set(fresh):
            a, r = bridge.replace(key, fresh.get(key, frozenset()))
            added |= a
            removed |= r
        return added, removed

    def _recompute(self, hv: str, change: _Change, world: World) -> tuple[FlowOp, ...]:
        if change.everything or hv not in self._bridges:
            added, removed = self._rebuild_bridge(hv, world)
        else:
            added, removed = self._recompute_parts(hv, change, world)
        return plan(diff(added, removed)) if (added or removed) else ()

    def _recompute_parts(self, hv: str, change: _Change, world: World) -> tuple[set[FlowSpec], set[FlowSpec]]:
        bridge = self._bridges[hv]
        hypervisor = self._hypervisors[hv]
        fresh: dict[PartKey, Flows] = {}
        for vm in change.old_vms:
            for nic in vm.vnics:
                fresh[("address", nic.mac)] = frozenset()
                fresh[("port", nic.mac)] = frozenset()
        for uuid in change.vms:
            vm = self._effective.get(uuid)
            if vm is None:
                continue
            for nic in vm.vnics:
                local = vm.hypervisor == hv
                fresh[("address", nic.mac)] = address_part(nic, local, hypervisor)
                fresh[("port", nic.mac)] = port_part(nic, hypervisor) if local else frozenset()
        for rule_id in change.rules:
            if self._policy.rule(rule_id) is None:
                self._rule_whole(bridge, rule_id, None, world, hv, fresh)
        for rule in self._policy.rules:
            self._recompute_rule(bridge, rule, change, world, hv, fresh)
        if self._quarantine_affected(change, world):
            fresh[("quarantine",)] = quarantine_part(world, hv)
        fresh.setdefault(("gateway",), gateway_part(self._gateway, hypervisor))
        added: set[FlowSpec] = set()
        removed: set[FlowSpec] = set()
        for key, flows in fresh.items():
            a, r = bridge.replace(key, flows)
            added |= a
            removed |= r
        # A flow can vanish from one part and reappear in another (a VM moving): net it out.
        return added - removed, removed - added

    def _recompute_rule(self, bridge: BridgeFlows, rule: Rule, change: _Change, world: World, hv: str,
                        fresh: dict[PartKey, Flows]) -> None:
        """A changed rule, or one whose groups were redefined, is compiled whole; otherwise only
        the parts of the VMs that changed, unless the rule stops or starts matching here."""
        groups, every_vm = rule_groups(rule)
        if rule.id in change.rules or groups & change.regrouped:
            self._rule_whole(bridge, rule.id, rule, world, hv, fresh)
            return
        vms = self._rule_touched(rule, groups, every_vm, change, world, bridge)
        if not vms:
            return
        live = rule_liveness(rule, world, hv)
        if bridge.live.get(rule.id) != live:
            self._rule_whole(bridge, rule.id, rule, world, hv, fresh)
            return
        if not any(live):
            return
        for uuid in vms:
            fresh[("rule", rule.id, uuid)] = rule_member_part(rule, live, world, hv, self._effective.get(uuid))

    def _rule_whole(self, bridge: BridgeFlows, rule_id: str, rule: Rule | None, world: World, hv: str,
                    fresh: dict[PartKey, Flows]) -> None:
        for key in bridge.rule_keys.get(rule_id, ()):
            fresh[key] = frozenset()
        if rule is None:
            bridge.live.pop(rule_id, None)
            return
        live, parts = rule_parts(rule, world, hv)
        bridge.live[rule_id] = live
        fresh.update(parts)

    def _rule_touched(self, rule: Rule, groups: frozenset[str], every_vm: bool, change: _Change, world: World,
                      bridge: BridgeFlows) -> list[str]:
        """The changed VMs whose clauses of `rule` may differ: members before or after the
        change whose membership, addresses or (app rules) app ports changed."""
        if not change.vms:
            return []
        touched = change.readdressed
        if any(isinstance(s, AppService) for s in rule.services):
            touched = touched | change.reapped
        regrouped = bool(groups & change.groups)
        if not regrouped and not touched:
            return []
        keys = bridge.rule_keys.get(rule.id, set())
        out = []
        for uuid in change.vms:
            was = ("rule", rule.id, uuid) in keys
            member = every_vm or any(uuid in world.members.get(g, frozenset()) for g in groups)
            if (was or member) and (regrouped or uuid in touched):
                out.append(uuid)
        return out


class _MembersView(Mapping[str, frozenset[str]]):
    """Group members read through from the index, each group copied at most once per event."""

    def __init__(self, index: GroupIndex, groups: Mapping[str, GroupDef]) -> None:
        self._index, self._groups, self._cache = index, groups, {}  # type: ignore[var-annotated]

    def __getitem__(self, group: str) -> frozenset[str]:
        if group not in self._groups:
            raise KeyError(group)
        found = self._cache.get(group)
        if found is None:
            found = self._cache[group] = self._index.members(group)
        return found

    def __iter__(self) -> Iterator[str]:
        return iter(self._groups)

    def __len__(self) -> int:
        return len(self._groups)


def _claims(facts: frozenset[Fact]) -> frozenset[tuple[object, ...]]:
    """What facts say, without when they were observed."""
    return frozenset((f.attr, f.key, f.value, f.provenance) for f in facts)


def _addressing(vm: VM | None) -> object:
    return None if vm is None else (vm.hypervisor, vm.vnics)


def _apps(vm: VM | None) -> object:
    return None if vm is None else frozenset(f for f in vm.facts if f.attr is Attr.APP)


def with_platform_tags(vm: VM, tags: frozenset[Fact]) -> VM:
    """`vm` with its platform tags replaced by `tags`; context facts stay."""
    kept = frozenset(f for f in vm.facts if not (f.attr == Attr.TAG and f.provenance == Provenance.PLATFORM))
    return replace(vm, facts=kept | tags)


def _keep_binding(old: VM | None, new: VM) -> VM:
    """An inventory record says what a VM is; OVSDB says where it is plugged. A new record
    without ofports keeps the VM where OVSDB put it."""
    if old is None or any(n.ofport is not None for n in new.vnics):
        return new
    bound = {n.mac: n.ofport for n in old.vnics if n.ofport is not None}
    if not bound:
        return new
    return replace(new, hypervisor=old.hypervisor,
                   vnics=tuple(replace(n, ofport=bound.get(n.mac)) for n in new.vnics))


def _place(vm: VM, plugged: Mapping[str, Mapping[tuple[str, str], int]], plugged_at: Iterable[str]) -> VM:
    """Where `vm` is, from the last OVSDB snapshot of every hypervisor that has a port of it.
    While several have (a live migration: the destination's port appears before the source's
    goes, and the guest runs on the source until the switchover) it stays where it is, so
    neither the order of snapshots nor unrelated changes on either side move it back and forth;
    it moves when its port is gone from where it was. A hypervisor that has reported nothing
    yet keeps the ofports the VM record gives."""
    uuid = vm.uuid.lower()

    def ports_on(hv: str) -> dict[str, int]:
        if hv not in plugged:
            return {n.mac: n.ofport for n in vm.vnics if n.ofport is not None} if hv == vm.hypervisor else {}
        seen = plugged[hv]
        return {n.mac: seen[(uuid, n.mac)] for n in vm.vnics if (uuid, n.mac) in seen}

    claims = {hv: ports for hv in {vm.hypervisor, *plugged_at} if (ports := ports_on(hv))}
    target = vm.hypervisor if vm.hypervisor in claims or not claims else min(claims)
    ports = claims.get(target, {})
    return replace(vm, hypervisor=target, vnics=tuple(replace(n, ofport=ports.get(n.mac)) for n in vm.vnics))


def initial_commands(engine: Engine, installed: Mapping[str, Iterable[FlowSpec]]) -> list[Command]:
    """Commands to bring bridges from what they hold to what the engine wants."""
    out: list[Command] = []
    for hv in engine.hypervisors():
        ops = plan(diff(engine.desired(hv), installed.get(hv, ())))
        if ops:
            out.append(ProgramBridge(hv, ops))
    return out
