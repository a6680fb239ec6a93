"""Quarantine: triggers, transitions, release and re-quarantine, compiled flows, config."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.config import ConfigError, parse_config
from controller.engine import Engine
from controller.events import (
    ContextExpiry,
    ContextReported,
    QuarantineReleased,
    QuarantineRequested,
    VmRemoved,
)
from controller.flows.compile import compile_bridge
from controller.flows.pipeline import (
    PRIO_CT_ALLOW_REPLY,
    PRIO_QUARANTINE_CEIL,
    PRIO_QUARANTINE_FLOOR,
    PRIO_RULES_CEIL,
    CookieKind,
    cookie_kind,
    quarantine_cookie,
)
from controller.identity.groups import GroupDef
from controller.identity.selector import parse_selector
from controller.model import VM, Attr, Fact, Hypervisor, Inventory, Provenance, VNic
from controller.policy.quarantine import (
    DEFAULT_QUARANTINE,
    QuarantinePolicy,
    QuarantineState,
    release,
    request,
    step,
    triggers,
)
from controller.policy.schema import Policy

A, G = Provenance.AUTHORITATIVE, Provenance.GUEST


def posture(check: str, value: str, prov: Provenance = G) -> Fact:
    return Fact(Attr.POSTURE, check, value, prov)


def vm(uuid: str = "vm-1", *facts: Fact, hv: str = "hv1", port: int = 1, role: str = "desktop") -> VM:
    tag = Fact(Attr.TAG, "role", role, Provenance.PLATFORM)
    n = int(uuid.rsplit("-", 1)[1])
    nic = VNic(f"02:00:00:00:00:{n:02x}", (f"10.0.0.{n}",), port, f"tap{n}")
    return VM(uuid, uuid.replace("-", ""), hv, (nic,), frozenset(facts) | {tag})


# ---- triggers -----------------------------------------------------------------------------


def test_edr_trigger_needs_an_authoritative_fail() -> None:
    qp = QuarantinePolicy()
    assert triggers(vm("vm-1", posture("edr", "fail", A)), False, qp) == ("edr verdict",)
    assert triggers(vm("vm-1", posture("edr", "pass", A)), False, qp) == ()
    assert triggers(vm("vm-1", posture("edr", "fail", G)), False, qp) == (), "a guest cannot fake an EDR verdict trigger"
    assert triggers(vm("vm-1", posture("edr", "fail", A)), False, QuarantinePolicy(on_edr=False)) == ()


def test_posture_trigger_watches_the_configured_checks() -> None:
    v = vm("vm-1", posture("disk_encrypted", "fail"), posture("firewall", "fail"), posture("av", "pass"))
    assert triggers(v, False, QuarantinePolicy()) == ()
    assert triggers(v, False, QuarantinePolicy(on_posture_fail=True)) == (
        "posture check disk_encrypted failed", "posture check firewall failed")
    assert triggers(v, False, QuarantinePolicy(on_posture_fail=True, posture_checks=("disk_encrypted", "av"))) == (
        "posture check disk_encrypted failed",)


def test_silent_trigger_only_when_enabled() -> None:
    assert triggers(vm(), True, QuarantinePolicy()) == ()
    assert triggers(vm(), True, QuarantinePolicy(on_agent_silent=True)) == ("agent silent",)
    assert triggers(vm(), False, QuarantinePolicy(on_agent_silent=True)) == ()


def test_state_transitions() -> None:
    s = step(QuarantineState(), ("edr verdict",))
    assert s.reasons == ("edr verdict",)
    assert step(s, ()).reasons == ("edr verdict",), "a trigger clearing does not release"
    r = release(s, ("edr verdict",))
    assert not r.quarantined and r.released == {"edr verdict"}
    assert not step(r, ("edr verdict",)).quarantined, "an acknowledged trigger does not fire again"
    again = step(step(r, ()), ("edr verdict",))
    assert again.reasons == ("edr verdict",), "a new firing after release quarantines again"
    assert step(r, ("edr verdict", "agent silent")).reasons == ("agent silent",)
    manual = request(QuarantineState(), "drill", "ops")
    assert manual.reasons == ("operator ops: drill",)
    assert request(manual, "drill", "ops") == manual


# ---- the engine ---------------------------------------------------------------------------

REMEDIATION = "tag.role == 'remediation'"


def engine(qp: QuarantinePolicy = DEFAULT_QUARANTINE, **kw: object) -> Engine:
    inv = Inventory({"hv1": Hypervisor("hv1", 100), "hv2": Hypervisor("hv2", 100)},
                    {"vm-1": vm("vm-1"), "vm-2": vm("vm-2", hv="hv2", port=2),
                     "vm-9": vm("vm-9", hv="hv2", port=9, role="remediation")})
    groups = {"remediation": GroupDef("remediation", parse_selector(REMEDIATION), REMEDIATION)}
    return Engine(inv, {}, Policy(groups={"remediation": REMEDIATION}), groups, quarantine=qp, **kw)  # type: ignore[arg-type]


def edr(verdict: str, uuid: str = "vm-1") -> ContextReported:
    return ContextReported(uuid, A, frozenset({posture("edr", verdict, A)}))


def test_edr_verdict_quarantines_until_released_and_refires_after_clearing() -> None:
    e = engine()
    assert e.quarantined() == {}
    assert e.handle(edr("fail"))
    assert e.quarantined() == {"vm-1": ("edr verdict",)}
    assert e.handle(edr("pass")) == [], "the verdict clearing changes no flow"
    assert e.quarantined() == {"vm-1": ("edr verdict",)}
    e.handle(edr("fail"))
    e.handle(QuarantineReleased("vm-1", "admin"))
    assert e.quarantined() == {} and e.released() == {"vm-1": ("edr verdict",)}
    e.handle(edr("fail", "vm-1"))  # the same verdict again (a heartbeat): acknowledged
    assert e.quarantined() == {}
    e.handle(edr("pass"))
    assert e.released() == {}
    e.handle(edr("fail"))
    assert e.quarantined() == {"vm-1": ("edr verdict",)}


def test_posture_check_turning_fail_quarantines() -> None:
    e = engine(QuarantinePolicy(on_posture_fail=True, posture_checks=("disk_encrypted",)))
    e.handle(ContextReported("vm-1", G, frozenset({posture("firewall", "fail")})))
    assert e.quarantined() == {}
    e.handle(ContextReported("vm-1", G, frozenset({posture("disk_encrypted", "fail")})))
    assert e.quarantined() == {"vm-1": ("posture check disk_encrypted failed",)}


def test_agent_silent_quarantines_when_enabled() -> None:
    for enabled in (False, True):
        e = engine(QuarantinePolicy(on_agent_silent=enabled))
        e.handle(ContextReported("vm-1", G, frozenset({Fact(Attr.OS, "", "linux", G)}), expires_at=10.0))
        e.handle(ContextExpiry(5.0))
        assert e.quarantined() == {}
        e.handle(ContextExpiry(10.0))
        assert e.quarantined() == ({"vm-1": ("agent silent",)} if enabled else {})
    # The agent speaking again clears the trigger, so after a release a new silence fires again.
    e.handle(QuarantineReleased("vm-1", "ops"))
    e.handle(ContextReported("vm-1", G, frozenset(), expires_at=20.0))
    assert e.quarantined() == {}
    e.handle(ContextExpiry(20.0))
    assert e.quarantined() == {"vm-1": ("agent silent",)}


def test_operator_quarantine_and_release() -> None:
    e = engine()
    e.handle(QuarantineRequested("vm-2", "suspicious traffic", "ops"))
    assert e.quarantined() == {"vm-2": ("operator ops: suspicious traffic",)}
    e.handle(QuarantineRequested("no-such-vm", "x", "ops"))
    assert "no-such-vm" not in e.quarantined()
    e.handle(QuarantineReleased("vm-2", "ops"))
    assert e.quarantined() == {}


def test_quarantine_outlives_the_vm_record() -> None:
    e = engine()
    e.handle(QuarantineRequested("vm-2", "x", "ops"))
    e.handle(VmRemoved("vm-2"))
    assert "vm-2" in e.quarantined()


def test_state_is_rebuilt_from_the_constructor() -> None:
    e = engine(quarantined={"vm-2": ("operator ops: x",)})
    assert e.quarantined() == {"vm-2": ("operator ops: x",)}
    assert any(cookie_kind(f.cookie) is CookieKind.QUARANTINE for f in e.desired("hv2"))


def test_unacknowledged_triggers_fire_at_start_and_acknowledged_ones_do_not() -> None:
    inv_vm = vm("vm-1", posture("edr", "fail", A))
    for released, expected in ((None, {"vm-1": ("edr verdict",)}), ({"vm-1": ("edr verdict",)}, {})):
        inv = Inventory({"hv1": Hypervisor("hv1", 100)}, {"vm-1": inv_vm})
        e = Engine(inv, {}, Policy(), {}, quarantine=QuarantinePolicy(), released=released)
        assert e.quarantined() == expected


def test_quarantine_flows_sit_in_their_band_and_compile_cleanly() -> None:
    e = engine()
    e.handle(edr("fail"))
    world = e.world()
    for hv in ("hv1", "hv2"):
        assert e.desired(hv) == compile_bridge(world, hv)  # checked against the pipeline
    q = [f for hv in ("hv1", "hv2") for f in e.desired(hv) if cookie_kind(f.cookie) is CookieKind.QUARANTINE]
    assert q
    assert all(PRIO_RULES_CEIL < PRIO_QUARANTINE_FLOOR <= f.priority <= PRIO_QUARANTINE_CEIL < PRIO_CT_ALLOW_REPLY for f in q)
    assert {f.cookie for f in q} == {quarantine_cookie("vm-1")}
    hv1 = [f for f in q if f in e.desired("hv1")]
    hv2 = [f for f in q if f in e.desired("hv2")]
    assert hv1 and hv2, "the quarantined VM's ports (hv1) and the remediation server's (hv2)"
    e.handle(QuarantineReleased("vm-1", "ops"))
    assert not any(cookie_kind(f.cookie) is CookieKind.QUARANTINE for hv in ("hv1", "hv2") for f in e.desired(hv))


# ---- config -------------------------------------------------------------------------------

HV = {"hv1": {"ovsdb": "unix:/tmp/db.sock", "bridge": "br-int"}}


def test_an_engine_without_a_quarantine_policy_only_quarantines_on_request() -> None:
    inv = Inventory({"hv1": Hypervisor("hv1", 100)}, {"vm-1": vm("vm-1")})
    e = Engine(inv, {}, Policy(), {})
    e.handle(edr("fail"))
    assert e.quarantined() == {}
    e.handle(QuarantineRequested("vm-1", "x", "ops"))
    assert e.quarantined() == {"vm-1": ("operator ops: x",)}


def test_config_quarantine_section() -> None:
    path = Path("/tmp/goldilocks.yaml")
    assert parse_config({"hypervisors": HV}, path).quarantine == QuarantinePolicy()
    cfg = parse_config({"hypervisors": HV, "quarantine": {
        "on_edr": False, "on_posture_fail": True, "posture_checks": ["disk_encrypted"],
        "on_agent_silent": True, "remediation_group": None}}, path)
    assert cfg.quarantine == QuarantinePolicy(False, True, ("disk_encrypted",), True, None)


def test_config_quarantine_problems_are_located() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"hypervisors": HV, "quarantine": {
            "on_edr": "yes", "posture_checks": [""], "remediation_group": 5, "bogus": 1}}, Path("/tmp/g.yaml"))
    where = {p.location for p in err.value.problems}
    assert where == {"quarantine.on_edr", "quarantine.posture_checks[0]", "quarantine.remediation_group",
                     "quarantine.bogus"}
    with pytest.raises(ConfigError):
        parse_config({"hypervisors": HV, "quarantine": ["on_edr"]}, Path("/tmp/g.yaml"))
