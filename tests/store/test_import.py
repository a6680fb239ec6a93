"""Seeding a store from a scenario file, then rebuilding the engine's state from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.model import VM, Provenance
from controller.scenario import load_scenario
from controller.store import Conflict, Store
from controller.store.records import RevisionState
from tests.store.conftest import policy_check

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finance-identity.yaml"


def _policy_document(path: Path) -> dict[str, object]:
    import yaml

    data = yaml.safe_load(path.read_text())
    return {"groups": data.get("groups", {}), "rules": data.get("policy", {}).get("rules", [])}


def test_import_then_load_state_gives_back_the_scenario(store: Store) -> None:
    scenario = load_scenario(EXAMPLE)
    document = _policy_document(EXAMPLE)
    store.import_scenario(scenario, document)

    state = store.load_state(now=scenario.now)
    platform = {
        uuid: VM(vm.uuid, vm.name, vm.hypervisor, vm.vnics,
                 frozenset(f for f in vm.facts if f.provenance == Provenance.PLATFORM))
        for uuid, vm in scenario.inventory.vms.items()
    }
    assert dict(state.inventory.hypervisors) == dict(scenario.inventory.hypervisors)
    assert state.inventory.gateway == scenario.inventory.gateway
    assert dict(state.inventory.vms) == platform
    assert state.directory == dict(scenario.directory)

    # Context comes back as records, one per VM and source, with the scenario's facts.
    context = {uuid: frozenset(f for f in vm.facts if f.provenance != Provenance.PLATFORM)
               for uuid, vm in scenario.inventory.vms.items()}
    rebuilt: dict[str, set[object]] = {uuid: set() for uuid in scenario.inventory.vms}
    for record in state.contexts:
        assert all(f.provenance == record.provenance for f in record.facts)
        rebuilt[record.vm_uuid] |= record.facts
    assert {u: frozenset(f) for u, f in rebuilt.items()} == context
    assert any(r.facts for r in state.contexts)

    assert state.policy is not None
    assert (state.policy.number, state.policy.state) == (1, RevisionState.ACTIVE)
    assert state.policy.document == document
    assert policy_check(state.policy.document) == []
    assert store.audit_log(limit=1)[0].action == "scenario.import"


def test_import_only_seeds_an_empty_store(store: Store) -> None:
    scenario = load_scenario(EXAMPLE)
    store.import_scenario(scenario, _policy_document(EXAMPLE))
    with pytest.raises(Conflict, match="already has VMs"):
        store.import_scenario(scenario, _policy_document(EXAMPLE))


def test_import_refuses_a_store_with_a_policy(store: Store) -> None:
    store.save_draft({"groups": {}, "rules": []}, actor="ops")
    with pytest.raises(Conflict, match="already has a policy"):
        store.import_scenario(load_scenario(EXAMPLE), _policy_document(EXAMPLE))
    assert store.list_hypervisors() == []  # nothing half-imported
