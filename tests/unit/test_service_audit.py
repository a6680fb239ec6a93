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
    finally:
        service.stop()
