"""A VM joining or leaving a group recomputes its own clauses of the group's rules, not the
rule whole: the work of a membership change must not grow with the size of the group."""

from __future__ import annotations

from dataclasses import replace

import pytest

from controller.engine import Engine
from controller.events import VmUpserted
from controller.flows.compile import compile_bridge
from controller.identity.groups import GroupDef
from controller.identity.selector import parse_selector
from controller.model import VM, Attr, Fact, Gateway, Hypervisor, Inventory, Port, Provenance, VNic
from controller.policy.schema import Action, GroupEndpoint, Policy, Rule

TIERS = ("web", "app", "db")


def tier_vm(i: int, tier: str, hv: str = "hv1") -> VM:
    nic = VNic(f"02:00:00:00:{i >> 8:02x}:{i & 0xFF:02x}", (f"10.1.{i >> 8}.{i & 0xFF}",), i + 1, f"vnet{i}")
    return VM(f"vm-{i}", f"vm-{i}", hv, (nic,), frozenset({Fact(Attr.TAG, "tier", tier, Provenance.PLATFORM)}))


def tier_engine(n: int, hvs: tuple[str, ...] = ("hv1",)) -> Engine:
    vms = {vm.uuid: vm for vm in (tier_vm(i, TIERS[i % 3], hvs[i % len(hvs)]) for i in range(n))}
    inventory = Inventory({hv: Hypervisor(hv, 65000, k + 1) for k, hv in enumerate(hvs)}, vms,
                          Gateway("10.1.255.254", "02:ff:00:00:00:01"))
    texts = {t: f"tag.tier == '{t}'" for t in TIERS}
    groups = {g: GroupDef(g, parse_selector(t), t) for g, t in texts.items()}
    rules = (Rule("web-app", "application", 1, GroupEndpoint("web"), GroupEndpoint("app"), (Port("tcp", 8080, 8080),), Action.ALLOW),
             Rule("app-db", "application", 2, GroupEndpoint("app"), GroupEndpoint("db"), (Port("tcp", 5432, 5432),), Action.ALLOW))
    return Engine(inventory, {}, Policy(rules, texts), groups)


def retier(engine: Engine, uuid: str, tier: str) -> None:
    vm = engine.world().inventory.vms[uuid]
    engine.handle(VmUpserted(replace(vm, facts=frozenset({Fact(Attr.TAG, "tier", tier, Provenance.PLATFORM)}))))


def test_a_join_replaces_only_the_joining_vms_parts() -> None:
    engine = tier_engine(60)
    before = dict(engine._bridges["hv1"].parts)
    retier(engine, "vm-0", "app")  # web -> app: leaves web, joins app
    after = engine._bridges["hv1"].parts
    # The gateway part is recomputed on every event (one constant flow pair).
    replaced = {k for k in before.keys() | after.keys() if before.get(k) is not after.get(k)} - {("gateway",)}
    own = {("address", "02:00:00:00:00:00"), ("port", "02:00:00:00:00:00"),
           ("rule", "web-app", "vm-0"), ("rule", "app-db", "vm-0")}
    assert replaced and replaced <= own, f"parts rebuilt beyond vm-0's own: {sorted(replaced - own)}"
    assert engine.desired("hv1") == compile_bridge(engine.world(), "hv1")


@pytest.mark.parametrize("hvs", [("hv1",), ("hv1", "hv2")])
def test_the_last_local_member_leaving_withdraws_the_rule_and_the_first_brings_it_back(hvs: tuple[str, ...]) -> None:
    engine = tier_engine(6, hvs)
    for uuid in ("vm-0", "vm-3"):  # every web VM becomes db: web-app has no source left
        retier(engine, uuid, "db")
    for hv in hvs:
        assert engine.desired(hv) == compile_bridge(engine.world(), hv)
        assert not any(f.origin == "rule:web-app" for f in engine.desired(hv))
    retier(engine, "vm-3", "web")
    for hv in hvs:
        assert engine.desired(hv) == compile_bridge(engine.world(), hv)
    local = engine.world().inventory.vms["vm-3"].hypervisor
    assert any(f.origin == "rule:web-app" for f in engine.desired(local))
