"""Quarantine through the API: by hand and by EDR verdict, listing, release, 409, roles, audit."""

from __future__ import annotations

from pathlib import Path

from controller.policy.quarantine import QuarantinePolicy
from tests.api.conftest import Api, make_api


def listed(api: Api, role: str = "admin") -> dict[str, list[str]]:
    r = api.get("/quarantine", role=role)
    assert r.status_code == 200, r.text
    return {q["vm"]: q["reasons"] for q in r.json()}


def test_quarantine_by_hand_then_release(api: Api) -> None:
    assert api.verdict("fin-desk1", "ledger-db") == "allow"
    r = api.post("/vms/fin-desk1/quarantine", {"reason": "incident 42"}, role="operator")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["vm"] == "fin-desk1" and body["quarantined"] is True
    assert len(body["reasons"]) == 1 and "incident 42" in body["reasons"][0]
    assert listed(api, "auditor") == {"fin-desk1": body["reasons"]}
    why = api.get("/explain", params={"src": "fin-desk1", "dst": "ledger-db", "protocol": "tcp", "port": 5432}).json()
    assert why["verdict"] == "deny" and why["rule"] is None and why["reason"].startswith("quarantined: ")
    assert api.verdict("eng-desk1", "fin-desk1", "icmp", 0) == "deny"

    r = api.post("/vms/fin-desk1/release", role="operator")
    assert r.status_code == 200, r.text
    assert r.json()["quarantined"] is False and r.json()["reasons"] == []
    assert listed(api) == {}
    assert api.verdict("fin-desk1", "ledger-db") == "allow"

    again = api.post("/vms/fin-desk1/release")
    assert again.status_code == 409
    assert "not quarantined" in again.json()["detail"]
    actions = [e.action for e in api.store.audit_log(limit=10, target=f"vm:{body['uuid']}")]
    assert {"vm.quarantine", "vm.release"} <= set(actions)


def test_without_configured_triggers_an_edr_verdict_does_not_quarantine(api: Api) -> None:
    api.post("/vms/fin-desk2/context/authoritative", {"verdict": "malicious"})
    assert listed(api) == {}


def test_edr_verdict_quarantines_and_a_clean_verdict_does_not_release(
        tmp_path: Path) -> None:
    # As `goldilocks run` builds it: the engine with the configured (default) quarantine policy.
    api = make_api(tmp_path, quarantine=QuarantinePolicy())
    r = api.post("/vms/fin-desk2/context/authoritative", {"verdict": "malicious"})
    assert r.status_code == 200, r.text
    assert listed(api) == {"fin-desk2": ["edr verdict"]}
    api.post("/vms/fin-desk2/context/authoritative", {"verdict": "clean"})
    assert listed(api) == {"fin-desk2": ["edr verdict"]}, "only an operator releases"
    assert api.post("/vms/fin-desk2/release").status_code == 200
    assert listed(api) == {}


def test_roles_and_bad_requests(api: Api) -> None:
    for role in ("auditor", "relay"):
        assert api.post("/vms/fin-desk1/quarantine", {"reason": "x"}, role=role).status_code == 403
        assert api.post("/vms/fin-desk1/release", role=role).status_code == 403
    assert api.get("/quarantine", role="relay").status_code == 403
    assert listed(api) == {}, "refused requests change nothing"
    assert api.post("/vms/no-such-vm/quarantine", {"reason": "x"}).status_code == 404
    assert api.post("/vms/no-such-vm/release").status_code == 404
    assert api.post("/vms/fin-desk1/quarantine", {}).status_code == 422
    assert api.post("/vms/fin-desk1/quarantine", {"reason": ""}).status_code == 422
    assert api.post("/vms/fin-desk1/quarantine", {"reason": "x", "extra": 1}).status_code == 422
