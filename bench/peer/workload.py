"""The one workload both systems run, described once.

N VMs on one hypervisor, each in one of K tier groups (VM i is in tier ``t{i % K}``), except
the *joiner* (the last VM), which starts in no group; one admin VM per 100 (indices K, K+100,
...), also in its tier. Rules: ``t{i} -> t{i+1}`` on tcp/8000+i for i < min(6, K-1), and the
admins to every VM on tcp/22. Everything else is denied. The membership change makes the joiner
join tier ``t{K//2}``; the added rule is ``t{K-3} -> t{K-2}`` on tcp/9000.

Goldilocks gets it as a scenario (tags ``tier`` and ``role``, the admins' login as authoritative
context, group ``admins`` = ``tag.role == 'admin' && usergroup == 'admins'``); OVN as one
logical switch with port security, one port group per tier plus ``pg_admins`` and ``pg_all``,
and to-lport ACLs: one allow-related per rule and a default drop for ``ip`` on ``pg_all``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

ADMIN_USER = "root-admin"
ADMIN_GROUP = "admins"
ADMIN_PORT = 22
BASE_PORT = 8000
ADDED_PORT = 9000
MAX_TIER_RULES = 6
ADMIN_EVERY = 100


@dataclass(frozen=True)
class Vm:
    index: int
    name: str
    mac: str
    ip: str
    tier: str | None
    admin: bool

    @property
    def ofport(self) -> int:
        return self.index + 1


@dataclass(frozen=True)
class TierRule:
    """An allow from one tier group to another on one TCP port."""

    rule_id: str
    src: str
    dst: str
    port: int


@dataclass(frozen=True)
class Workload:
    n: int
    k: int = 10

    def __post_init__(self) -> None:
        if self.k < 4 or self.n < self.k + 2:
            raise ValueError(f"need K >= 4 and N >= K + 2, got N={self.n} K={self.k}")

    # ---- the world

    @cached_property
    def vms(self) -> tuple[Vm, ...]:
        return tuple(self._vm(i) for i in range(self.n))

    def _vm(self, i: int) -> Vm:
        tier = None if i == self.n - 1 else f"t{i % self.k}"
        admin = i >= self.k and (i - self.k) % ADMIN_EVERY == 0 and i != self.n - 1
        return Vm(i, f"vm{i:04d}", f"02:00:00:00:{i // 256:02x}:{i % 256:02x}",
                  f"10.0.{i // 250}.{i % 250 + 1}", tier, admin)

    @property
    def tiers(self) -> tuple[str, ...]:
        return tuple(f"t{t}" for t in range(self.k))

    @property
    def rules(self) -> tuple[TierRule, ...]:
        return tuple(TierRule(f"t{i}-to-t{i + 1}", f"t{i}", f"t{i + 1}", BASE_PORT + i)
                     for i in range(min(MAX_TIER_RULES, self.k - 1)))

    @property
    def added_rule(self) -> TierRule:
        return TierRule("added-rule", f"t{self.k - 3}", f"t{self.k - 2}", ADDED_PORT)

    @property
    def joiner(self) -> Vm:
        return self.vms[-1]

    @property
    def join_tier(self) -> str:
        return f"t{self.k // 2}"

    @property
    def admins(self) -> tuple[Vm, ...]:
        return tuple(vm for vm in self.vms if vm.admin)

    def members(self, tier: str) -> tuple[Vm, ...]:
        return tuple(vm for vm in self.vms if vm.tier == tier)

    # ---- the traffic check: (source, destination, port or None for ping, allowed)

    @property
    def probes(self) -> tuple[Vm, ...]:
        """VMs that get a real network namespace: a t0 member, a t1 member, an admin."""
        return (self.vms[0], self.vms[1], self.vms[self.k])

    @property
    def checks(self) -> tuple[tuple[Vm, Vm, int | None, bool], ...]:
        t0, t1, admin = self.probes
        return ((t0, t1, BASE_PORT, True), (t1, t0, BASE_PORT, False), (admin, t1, ADMIN_PORT, True),
                (t0, t1, ADMIN_PORT, False), (t0, t1, None, False), (admin, t0, BASE_PORT, False))

    @property
    def servers(self) -> dict[str, tuple[int, ...]]:
        t0, t1, _ = self.probes
        return {t0.name: (BASE_PORT,), t1.name: (BASE_PORT, ADMIN_PORT)}

    # ---- Goldilocks

    def goldilocks_groups(self) -> dict[str, str]:
        groups = {t: f"tag.tier == '{t}'" for t in self.tiers}
        groups[ADMIN_GROUP] = f"tag.role == 'admin' && usergroup == '{ADMIN_GROUP}'"
        return groups

    def goldilocks_rules(self, *, added: bool = False, empty: bool = False) -> list[dict[str, Any]]:
        if empty:
            return []
        tier_rules = [*self.rules, *([self.added_rule] if added else [])]
        rules = [{"id": r.rule_id, "tier": "application", "position": 10 * (n + 1), "source": {"group": r.src},
                  "destination": {"group": r.dst}, "services": [f"tcp/{r.port}"], "action": "allow"}
                 for n, r in enumerate(tier_rules)]
        rules.append({"id": "admins-ssh", "tier": "infrastructure", "position": 10, "source": {"group": ADMIN_GROUP},
                      "destination": "any", "services": [f"tcp/{ADMIN_PORT}"], "action": "allow"})
        return rules

    def goldilocks_policy(self, *, added: bool = False, empty: bool = False) -> dict[str, Any]:
        """The API's policy document (PUT /policy/draft)."""
        return {"groups": self.goldilocks_groups(), "rules": self.goldilocks_rules(added=added, empty=empty)}

    def goldilocks_scenario(self, hypervisor: str, dpid: int) -> dict[str, Any]:
        return {"hypervisors": [{"name": hypervisor, "dpid": dpid}],
                "directory": {ADMIN_USER: [ADMIN_GROUP]},
                "vms": [self._scenario_vm(vm, hypervisor) for vm in self.vms],
                "groups": self.goldilocks_groups(),
                "policy": {"rules": self.goldilocks_rules()}}

    @staticmethod
    def _scenario_vm(vm: Vm, hypervisor: str) -> dict[str, Any]:
        tags = {"tier": vm.tier} if vm.tier else {}
        out: dict[str, Any] = {"name": vm.name, "hypervisor": hypervisor,
                               "vnics": [{"mac": vm.mac, "ips": [vm.ip]}]}
        if vm.admin:
            tags["role"] = "admin"
            out["authoritative"] = {"users": [ADMIN_USER]}
        out["tags"] = tags
        return out

    # ---- OVN (ovn-nbctl argument lists; each inner list is one command)

    @staticmethod
    def pg(group: str) -> str:
        return f"pg_{group}"

    def ovn_topology(self, switch: str) -> list[list[str]]:
        cmds: list[list[str]] = [["ls-add", switch]]
        for vm in self.vms:
            addr = f"{vm.mac} {vm.ip}"
            cmds += [["lsp-add", switch, vm.name], ["lsp-set-addresses", vm.name, addr],
                     ["lsp-set-port-security", vm.name, addr]]
        cmds.append(["pg-add", self.pg("all"), *(vm.name for vm in self.vms)])
        for tier in self.tiers:
            cmds.append(["pg-add", self.pg(tier), *(vm.name for vm in self.members(tier))])
        cmds.append(["pg-add", self.pg(ADMIN_GROUP), *(vm.name for vm in self.admins)])
        return cmds

    def ovn_acls(self, *, added_only: bool = False) -> list[list[str]]:
        """acl-add commands: one allow-related per rule and the default drop."""
        if added_only:
            return [self._acl(self.added_rule)]
        cmds = [self._acl(r) for r in self.rules]
        cmds.append(["acl-add", self.pg("all"), "to-lport", "1002",
                     f"outport == @{self.pg('all')} && ip4.src == ${self.pg(ADMIN_GROUP)}_ip4 && tcp.dst == {ADMIN_PORT}",
                     "allow-related"])
        cmds.append(["acl-add", self.pg("all"), "to-lport", "1000", f"outport == @{self.pg('all')} && ip", "drop"])
        return cmds

    def _acl(self, r: TierRule) -> list[str]:
        return ["acl-add", self.pg(r.dst), "to-lport", "1002",
                f"outport == @{self.pg(r.dst)} && ip4.src == ${self.pg(r.src)}_ip4 && tcp.dst == {r.port}",
                "allow-related"]

    def ovn_acl_groups(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(cmd[1] for cmd in self.ovn_acls()))
