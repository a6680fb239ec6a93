"""Group membership: which VMs each named selector selects, kept up to date one VM at a time.

The caller passes effective VMs (identity.graph.effective_vm); the index never sees the
directory, so a directory change is, to it, just a batch of VM updates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from controller.identity.selector import Expr, matches
from controller.model import VM, Fact

__all__ = ["GroupDef", "GroupIndex", "compute_members"]


@dataclass(frozen=True)
class GroupDef:
    name: str
    selector: Expr
    text: str  # the selector as the user wrote it, for messages


def compute_members(groups: Mapping[str, GroupDef], vms: Iterable[VM]) -> dict[str, frozenset[str]]:
    """Full recompute: the reference GroupIndex must agree with."""
    vm_list = list(vms)
    return {
        name: frozenset(vm.uuid for vm in vm_list if matches(group.selector, vm))
        for name, group in groups.items()
    }


class GroupIndex:
    """Memberships in both directions, so a VM update costs one selector test per group."""

    def __init__(self, groups: Mapping[str, GroupDef]) -> None:
        self._defs: dict[str, GroupDef] = dict(groups)
        self._members: dict[str, set[str]] = {name: set() for name in groups}
        self._groups_of: dict[str, frozenset[str]] = {}
        # What each VM's memberships were last evaluated from (selectors read only these).
        self._evaluated: dict[str, tuple[frozenset[Fact], str, str]] = {}

    def update_vm(self, vm: VM) -> frozenset[str]:
        """(Re)evaluate every group for `vm`; return the groups whose membership changed."""
        seen = (vm.facts, vm.name, vm.hypervisor)
        if self._evaluated.get(vm.uuid) == seen:
            # Only where it is plugged changed (an OVSDB snapshot binds every VM after a
            # restart): no selector can tell, so skip testing every group against it.
            return frozenset()
        new = frozenset(name for name, g in self._defs.items() if matches(g.selector, vm))
        self._evaluated[vm.uuid] = seen
        return self._assign(vm.uuid, new)

    def remove_vm(self, uuid: str) -> frozenset[str]:
        self._evaluated.pop(uuid, None)
        return self._assign(uuid, frozenset())

    def set_groups(self, groups: Mapping[str, GroupDef], vms: Iterable[VM]) -> frozenset[str]:
        """Replace the definitions, re-evaluating only new groups and changed selectors.

        Returns the groups added, removed, or whose membership changed: a new or removed group
        matters to policy even when empty. A change of text alone (same selector) is silent.
        """
        self._evaluated.clear()  # memberships now come from `vms`, which the caller chose
        removed = frozenset(self._defs) - frozenset(groups)
        stale = {
            name: g
            for name, g in groups.items()
            if name not in self._defs or self._defs[name].selector != g.selector
        }
        added = frozenset(stale) - frozenset(self._defs)
        for name in removed:
            for uuid in self._members.pop(name):
                self._groups_of[uuid] = self._groups_of[uuid] - {name}
        self._defs = dict(groups)
        changed = set(removed | added)
        if stale:
            vm_list = list(vms)
            for name, members in compute_members(stale, vm_list).items():
                if self._replace_members(name, members):
                    changed.add(name)
        self._forget_empty()
        return frozenset(changed)

    def members(self, group: str) -> frozenset[str]:
        """UUIDs of the VMs in `group`; empty for an unknown group."""
        return frozenset(self._members.get(group, ()))

    def groups_of(self, uuid: str) -> frozenset[str]:
        return self._groups_of.get(uuid, frozenset())

    def _assign(self, uuid: str, new: frozenset[str]) -> frozenset[str]:
        old = self._groups_of.get(uuid, frozenset())
        for name in old - new:
            self._members[name].discard(uuid)
        for name in new - old:
            self._members[name].add(uuid)
        if new:
            self._groups_of[uuid] = new
        else:
            self._groups_of.pop(uuid, None)
        return old ^ new

    def _replace_members(self, name: str, members: frozenset[str]) -> bool:
        old = frozenset(self._members.get(name, ()))
        for uuid in old - members:
            self._groups_of[uuid] = self._groups_of[uuid] - {name}
        for uuid in members - old:
            self._groups_of[uuid] = self._groups_of.get(uuid, frozenset()) | {name}
        self._members[name] = set(members)
        return old != members

    def _forget_empty(self) -> None:
        self._groups_of = {uuid: gs for uuid, gs in self._groups_of.items() if gs}
