"""Every context change and its effect on flows reaches the audit sink, through the engine thread."""

from __future__ import annotations

from pathlib import Path

from controller.config import Config
from controller.engine import Engine
from controller.events import ContextExpiry, ContextReported
from controller.model import Provenance
from controller.runtime import Runtime
from controller.scenario import load_scenario
from controller.service import Service
from tests.support import logout_event

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finance-identity.yaml"


def test_context_changes_and_expiries_are_audited_with_their_effect_on_flows() -> None:
    sc = load_scenario(EXAMPLE)
    engine = Engine(sc.inventory, sc.directory, sc.policy, sc.groups)
    audited: list[tuple[str, str, dict]] = []
    service = Service(Config(EXAMPLE, None), Runtime(engine), audit=lambda *entry: audited.append(entry))
    service.start_engine()
    try:
        desk = sc.inventory.vm_by_name("fin-desk1")
        service.post(logout_event(desk))
        service.call(lambda rt: None)  # everything posted before has been handled
        action, target, details = audited[-1]
        assert (action, target) == ("context.effect", f"vm:{desk.uuid}")
        assert details["flows"] and all(sum(c.values()) > 0 for c in details["flows"].values())

        guest = frozenset(f for f in desk.facts if f.provenance is Provenance.GUEST and f.attr.value != "usergroup")
        service.post(ContextReported(desk.uuid, Provenance.GUEST, guest, expires_at=50.0))  # alice logs in again
        service.post(ContextExpiry(100.0))
        service.call(lambda rt: None)
        assert [a for a, _, _ in audited].count("context.expired") == 1
        expired = next(d for a, _, d in audited if a == "context.expired")
        assert expired["expired"] == [{"vm": desk.uuid, "provenance": "guest"}]

        # An expiry that changes no flow is a context change all the same: audited.
        bob = sc.inventory.vm_by_name("fin-desk2")
        bob_guest = frozenset(f for f in bob.facts if f.provenance is Provenance.GUEST and f.attr.value != "usergroup")
        service.post(ContextReported(bob.uuid, Provenance.GUEST, bob_guest, expires_at=150.0))
        service.post(ContextExpiry(200.0))
        service.call(lambda rt: None)
        assert [a for a, _, _ in audited].count("context.expired") == 2
    finally:
        service.stop()


def test_quarantine_is_persisted_and_a_rebuilt_engine_keeps_it() -> None:
    from controller.events import QuarantineRequested

    sc = load_scenario(EXAMPLE)
    saved: list[tuple[dict, dict]] = []
    service = Service(Config(EXAMPLE, None), Runtime(Engine(sc.inventory, sc.directory, sc.policy, sc.groups)),
                      persist_quarantine=lambda q, r: saved.append((dict(q), dict(r))))
    service.start_engine()
    try:
        desk = sc.inventory.vm_by_name("fin-desk1")
        service.post(QuarantineRequested(desk.uuid, "suspicious process", "alice-ops"))
        service.call(lambda rt: None)
    finally:
        service.stop()
    quarantined, released = saved[-1]
    assert desk.uuid in quarantined
    rebuilt = Engine(sc.inventory, sc.directory, sc.policy, sc.groups, quarantined=quarantined, released=released)
    assert desk.uuid in rebuilt.quarantined(), "a restart must not set a quarantined VM free"
