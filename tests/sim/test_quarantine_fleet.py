"""Quarantine through the compiled flows across a fleet: an EDR verdict on fin-desk1 cuts its
established ledger connection both ways, leaves only the remediation group reachable, and
agrees with `explain` for every pair; release restores access."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from controller.engine import Engine
from controller.events import ContextReported, QuarantineReleased, QuarantineRequested
from controller.flows.compile import compile_bridge
from controller.flows.fleet import Fleet, ip_packet, reply_of
from controller.flows.pipeline import CookieKind, cookie_kind
from controller.identity.groups import GroupDef
from controller.identity.selector import parse_selector
from controller.model import VM, Attr, Fact, Inventory, Provenance, VNic
from controller.policy.explain import explain
from controller.policy.quarantine import QuarantinePolicy
from controller.scenario import Scenario, load_scenario

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finance-identity.yaml"
REMEDIATION = "tag.role == 'remediation'"


def _scenario() -> Scenario:
    """finance-identity.yaml plus a remediation server on each hypervisor and a remediation group."""
    sc = load_scenario(EXAMPLE)
    vms = dict(sc.inventory.vms)
    for i, hv in enumerate(("hv2", "hv1"), start=1):
        facts = frozenset({Fact(Attr.TAG, "role", "remediation", Provenance.PLATFORM)})
        vms[f"remedy-{i}"] = VM(f"remedy-{i}", f"remedy{i}", hv,
                                (VNic(f"02:00:00:00:09:0{i}", (f"10.0.0.9{i}",), 10 + i, f"tap-remedy{i}"),), facts)
    groups = dict(sc.groups) | {"remediation": GroupDef("remediation", parse_selector(REMEDIATION), REMEDIATION)}
    policy = replace(sc.policy, groups=dict(sc.policy.groups) | {"remediation": REMEDIATION})
    return replace(sc, inventory=Inventory(sc.inventory.hypervisors, vms, sc.inventory.gateway),
                   groups=groups, policy=policy)


def _fleet(engine: Engine) -> Fleet:
    world = engine.world()
    return Fleet.of(world.inventory, {hv: compile_bridge(world, hv) for hv in world.inventory.hypervisors})


def _reprogram(fleet: Fleet, engine: Engine) -> None:
    fleet.reprogram({hv: engine.desired(hv) for hv in engine.hypervisors()})


def _packet(src: VM, dst: VM, proto: str, port: int, sport: int = 40000) -> dict[str, int]:
    return ip_packet(src.vnics[0].mac, dst.vnics[0].mac, src.ips[0], dst.ips[0], proto, port, sport)


def _edr(vm: VM, verdict: str, when: float = 1_700_000_100.0) -> ContextReported:
    return ContextReported(vm.uuid, Provenance.AUTHORITATIVE,
                           frozenset({Fact(Attr.POSTURE, "edr", verdict, Provenance.AUTHORITATIVE, when)}))


def _vms(engine: Engine) -> dict[str, VM]:
    return {vm.name: vm for vm in engine.world().inventory.vms.values()}


def _assert_flows_match_explain(engine: Engine) -> int:
    world = engine.world()
    vms = sorted(world.inventory.vms.values(), key=lambda v: v.name)
    allowed = 0
    for src in vms:
        for dst in vms:
            if src is dst:
                continue
            for proto, port in (("tcp", 5432), ("tcp", 22), ("udp", 53), ("icmp", 0)):
                verdict = explain(world, engine.groups, src, dst, proto, port)
                there = _fleet(engine).send(src, _packet(src, dst, proto, port))
                assert there.delivered == verdict.allowed, (
                    f"{src.name}->{dst.name} {proto}/{port}: explain {verdict.verdict} ({verdict.reason}), "
                    f"flows {'deliver' if there.delivered else 'drop'}")
                allowed += verdict.allowed
    return allowed


def test_edr_verdict_cuts_established_connection_both_ways_and_leaves_remediation() -> None:
    engine = Engine(*_scenario_args())
    vms = _vms(engine)
    desk, ledger, eng, r1, r2 = (vms[n] for n in ("fin-desk1", "ledger-db", "eng-desk1", "remedy1", "remedy2"))
    fleet = _fleet(engine)
    syn = _packet(desk, ledger, "tcp", 5432)
    assert fleet.send(desk, syn).delivered
    assert fleet.send(ledger, reply_of(syn)).delivered
    # Before quarantine, operator policy gives the remediation servers nothing.
    assert not fleet.send(r1, _packet(r1, desk, "tcp", 22)).delivered

    commands = engine.handle(_edr(desk, "fail"))
    assert commands, "quarantine changes flows"
    assert engine.quarantined() == {desk.uuid: ("edr verdict",)}
    _reprogram(fleet, engine)
    assert not fleet.send(desk, syn).delivered, "established original-direction packet still passes"
    assert not fleet.send(ledger, reply_of(syn)).delivered, "reply of the revoked connection still passes"
    assert not fleet.send(desk, _packet(desk, ledger, "icmp", 0)).delivered
    assert not fleet.send(eng, _packet(eng, desk, "icmp", 0)).delivered
    for helper in (r1, r2):  # one remote, one on the same hypervisor
        out = _packet(desk, helper, "tcp", 443, sport=41000 + helper.vnics[0].ofport)
        assert fleet.send(desk, out).delivered, f"{helper.name} unreachable from the quarantined VM"
        assert fleet.send(helper, reply_of(out)).delivered
        back = _packet(helper, desk, "tcp", 22, sport=42000 + helper.vnics[0].ofport)
        assert fleet.send(helper, back).delivered, f"{helper.name} cannot reach the quarantined VM"
        assert fleet.send(desk, reply_of(back)).delivered
    why = explain(engine.world(), engine.groups, _vms(engine)["fin-desk1"], ledger, "tcp", 5432)
    assert why.verdict == "deny" and why.rule is None and why.reason.startswith("quarantined: ")
    assert "edr verdict" in why.reason
    q_flows = [f for hv in engine.hypervisors() for f in engine.desired(hv) if cookie_kind(f.cookie) is CookieKind.QUARANTINE]
    assert q_flows and all(60002 <= f.priority <= 63998 for f in q_flows)

    # A clean verdict does not end the quarantine: only an operator does.
    engine.handle(_edr(desk, "pass"))
    assert desk.uuid in engine.quarantined()
    engine.handle(QuarantineReleased(desk.uuid, "admin"))
    assert engine.quarantined() == {}
    _reprogram(fleet, engine)
    assert not fleet.send(desk, syn).delivered, "a revoked connection stays dead"
    assert fleet.send(desk, _packet(desk, ledger, "tcp", 5432, sport=40002)).delivered, "release restores access"
    assert not fleet.send(r1, _packet(r1, desk, "tcp", 22, sport=43000)).delivered, "remediation access ends"


def test_every_pair_matches_explain_while_quarantined() -> None:
    engine = Engine(*_scenario_args())
    vms = _vms(engine)
    normal = _assert_flows_match_explain(engine)
    engine.handle(_edr(vms["fin-desk1"], "fail"))
    engine.handle(QuarantineRequested(vms["ledger-db"].uuid, "suspicious login", "operator"))
    quarantined = _assert_flows_match_explain(engine)
    assert quarantined > 0 and quarantined != normal
    # (The example's own emergency rules deny posture.edr=fail VMs: clear the verdict first.)
    engine.handle(_edr(vms["fin-desk1"], "pass"))
    engine.handle(QuarantineReleased(vms["fin-desk1"].uuid, "admin"))
    engine.handle(QuarantineReleased(vms["ledger-db"].uuid, "admin"))
    assert _assert_flows_match_explain(engine) == normal


def test_without_a_remediation_group_nothing_stays_reachable() -> None:
    sc = _scenario()
    engine = Engine(sc.inventory, sc.directory, sc.policy, sc.groups, quarantine=QuarantinePolicy(remediation_group=None))
    vms = _vms(engine)
    engine.handle(QuarantineRequested(vms["fin-desk1"].uuid, "drill", "operator"))
    fleet = _fleet(engine)
    desk = vms["fin-desk1"]
    for other in vms.values():
        if other is not desk:
            assert not fleet.send(desk, _packet(desk, other, "icmp", 0)).delivered
            assert not fleet.send(other, _packet(other, desk, "icmp", 0)).delivered


def _scenario_args() -> tuple[object, ...]:
    sc = _scenario()
    return (sc.inventory, sc.directory, sc.policy, sc.groups, None, QuarantinePolicy())
