"""The engine's share of a Goldilocks change, measured in-process on the same workload.

`Engine.handle` for the membership change (the joiner's tag) and for the added rule, with every
vNIC already on its ofport: the compute part of what the API call → bridge figures include.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from bench.peer.common import Summary
from bench.peer.workload import Workload
from controller.engine import Engine
from controller.events import PolicyChanged, VmUpserted
from controller.model import Attr, Fact, Provenance
from controller.scenario import Scenario, parse_scenario


def _scenario(workload: Workload, hypervisor: str, dpid: int, *, added: bool = False) -> Scenario:
    data = workload.goldilocks_scenario(hypervisor, dpid)
    for vm, spec in zip(workload.vms, data["vms"], strict=True):
        spec["vnics"][0]["ofport"] = vm.ofport
    data["policy"]["rules"] = workload.goldilocks_rules(added=added)
    return parse_scenario(data, source="bench.peer")


def _timed(engine: Engine, events: list[Any]) -> list[float]:
    out = []
    for event in events:
        start = time.perf_counter()
        engine.handle(event)
        out.append(time.perf_counter() - start)
    return out


def engine_split(workload: Workload, hypervisor: str, dpid: int, reps: int) -> dict[str, Any]:
    """Median ms of the engine build and of `Engine.handle` for each change (change and undo alternate)."""
    sc, bigger = _scenario(workload, hypervisor, dpid), _scenario(workload, hypervisor, dpid, added=True)
    start = time.perf_counter()
    engine = Engine(sc.inventory, sc.directory, sc.policy, sc.groups)
    build = time.perf_counter() - start
    vm = sc.inventory.vm_by_name(workload.joiner.name)
    assert vm is not None
    joined = replace(vm, facts=vm.facts | {Fact(Attr.TAG, "tier", workload.join_tier, Provenance.PLATFORM)})
    join = _timed(engine, [VmUpserted(joined if k % 2 == 0 else vm) for k in range(2 * reps)])[0::2]
    rule = _timed(engine, [PolicyChanged(bigger.policy if k % 2 == 0 else sc.policy, sc.groups)
                           for k in range(2 * reps)])[0::2]
    return {"build_ms": round(build * 1000, 1), "membership_change_ms": Summary.of(join).ms()["median_ms"],
            "rule_added_ms": Summary.of(rule).ms()["median_ms"]}
