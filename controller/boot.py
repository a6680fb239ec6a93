"""Start-up from the store: the database is the source of truth, the engine is rebuilt from it.

On first start an empty database is seeded from the config's scenario file (if any) and the
first admin token is created and printed once (or taken from GOLDILOCKS_ADMIN_TOKEN).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from controller.engine import Engine
from controller.identity.groups import GroupDef
from controller.model import VM, Fact, Inventory
from controller.policy.load import parse_policy
from controller.policy.quarantine import MANUAL_ONLY, QuarantinePolicy
from controller.policy.schema import Policy
from controller.policy.validate import Problem
from controller.scenario import load_scenario, load_yaml
from controller.store import Store, StoredState
from controller.store.records import ContextRecord

LOG = logging.getLogger("goldilocks.boot")
ADMIN_TOKEN_ENV = "GOLDILOCKS_ADMIN_TOKEN"


def policy_document_of(path: str | Path) -> dict[str, Any]:
    """The {groups, rules} document of a scenario file (or of a bare policy file)."""
    data = load_yaml(Path(path).read_text()) or {}
    rules = data.get("rules", (data.get("policy") or {}).get("rules", []))
    return {"groups": dict(data.get("groups") or {}), "rules": list(rules or [])}


def parse_document(document: Mapping[str, Any]) -> tuple[Policy | None, dict[str, GroupDef], list[Problem]]:
    """A stored document `{"groups": {...}, "rules": [...]}` as a Policy (None if any problem);
    problem locations point into the document (`rules[4].destination.cidr`)."""
    problems = [Problem(str(k), f"unknown key {k!r} (expected groups, rules)")
                for k in document if k not in ("groups", "rules")]
    policy, groups, found = parse_policy({"rules": document.get("rules") or []}, document.get("groups") or {}, where="")
    problems += found
    return (policy if not problems else None), groups, problems


def check_document(document: Mapping[str, Any]) -> list[Problem]:
    return parse_document(document)[2]


def live_facts(records: Iterable[ContextRecord], now: float) -> frozenset[Fact]:
    return frozenset(f for r in records if r.expires_at is None or r.expires_at > now for f in r.facts)


def engine_vm(store_vm: VM, records: Iterable[ContextRecord], now: float, seen: VM | None = None) -> VM:
    """The engine's raw VM: the store's platform record plus every live context fact. A vNIC
    the store has no ofport for keeps the one the engine learnt from OVSDB (same MAC, same
    hypervisor), so an inventory edit does not unplug it until the next OVSDB snapshot."""
    vm = replace(store_vm, facts=store_vm.facts | live_facts(records, now))
    if seen is None or seen.hypervisor != vm.hypervisor:
        return vm
    bound = {n.mac: n.ofport for n in seen.vnics}
    return replace(vm, vnics=tuple(n if n.ofport is not None else replace(n, ofport=bound.get(n.mac))
                                   for n in vm.vnics))


def unbound(inventory: Inventory) -> Inventory:
    """Inventory with every vNIC unplugged: in a live fleet only OVSDB says what is plugged where."""
    vms = {u: replace(vm, vnics=tuple(replace(n, ofport=None) for n in vm.vnics)) for u, vm in inventory.vms.items()}
    hvs = {n: replace(h, dpid=None, uplink_ofport=None) for n, h in inventory.hypervisors.items()}
    return Inventory(hvs, vms, inventory.gateway)


def engine_from_state(state: StoredState, now: float, *, unplugged: bool = True,
                      quarantine: QuarantinePolicy = MANUAL_ONLY,
                      quarantined: Mapping[str, Iterable[str]] | None = None,
                      released: Mapping[str, Iterable[str]] | None = None) -> Engine:
    """The engine as the database describes the world (DESIGN.md §7). With `unplugged`, vNICs
    start without ofports and hypervisors without dpids: in a live fleet OVSDB says where they
    are. A stored policy that no longer parses fails closed (default deny) and says so."""
    policy, groups = Policy(), {}
    if state.policy is not None:
        parsed, parsed_groups, problems = parse_document(state.policy.document)
        if parsed is None:
            LOG.error("active policy revision %d does not load (%s); enforcing default deny",
                      state.policy.number, "; ".join(map(str, problems)))
        else:
            policy, groups = parsed, parsed_groups
    by_vm: dict[str, list[ContextRecord]] = {}
    for record in state.contexts:
        by_vm.setdefault(record.vm_uuid, []).append(record)
    vms = {u: engine_vm(vm, by_vm.get(u, ()), now) for u, vm in state.inventory.vms.items()}
    inventory = Inventory(state.inventory.hypervisors, vms, state.inventory.gateway)
    if unplugged:
        inventory = unbound(inventory)
    expiries = {(r.vm_uuid, r.provenance): r.expires_at for r in state.contexts if r.expires_at is not None}
    return Engine(inventory, state.directory, policy, groups, expiries,
                  quarantine=quarantine, quarantined=quarantined, released=released)


def open_store(url: str, scenario: Path | None, out: TextIO = sys.stdout) -> Store:
    store = Store(url)
    if scenario is not None and store.active_revision() is None and not store.list_vms():
        store.import_scenario(load_scenario(scenario), policy_document_of(scenario))
        LOG.info("seeded the database from %s", scenario)
    env_token = os.environ.get(ADMIN_TOKEN_ENV)
    token = store.bootstrap_admin(env_token)
    if token is not None and not env_token:
        # Shown once: only its hash is stored.
        print(f"Goldilocks first start: admin API token (shown only now): {token}", file=out, flush=True)
    return store
