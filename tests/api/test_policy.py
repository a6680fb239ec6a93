"""Draft, validate, what-if, publish, history with diffs, revert."""

from __future__ import annotations

from tests.api.conftest import Api, audit_count, policy_document, snapshot

SSH = {"id": "desktops-ssh-ledger", "tier": "application", "position": 30, "source": {"group": "desktops"},
       "destination": {"group": "ledger"}, "services": ["tcp/22"], "action": "allow"}


def draft_with_ssh() -> dict:
    doc = policy_document()
    return {"document": {"groups": doc["groups"], "rules": [*doc["rules"], SSH]}, "comment": "ssh for desktops"}


def test_publish_history_revert(api: Api) -> None:
    r = api.put("/policy/draft", draft_with_ssh(), role="operator")
    assert r.status_code == 200 and r.json()["state"] == "draft" and r.json()["based_on"] == 1
    assert api.post("/policy/draft/validate").json() == {"valid": True, "problems": []}
    # What-if changes nothing yet.
    whatif = api.post("/policy/draft/whatif", role="auditor").json()
    allowed = {(c["src"], c["dst"], c["service"]) for c in whatif["newly_allowed"]}
    assert {("fin-desk1", "ledger-db", "tcp/22"), ("fin-desk2", "ledger-db", "tcp/22"),
            ("eng-desk1", "ledger-db", "tcp/22")} <= allowed
    assert whatif["newly_denied"] == []
    assert any(f["change"] > 0 for f in whatif["flows"])
    assert api.verdict("fin-desk2", "ledger-db", "tcp", 22) == "deny"
    assert api.get("/policy").json()["number"] == 1
    r = api.post("/policy/draft/publish", role="operator")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "active" and r.json()["published_by"] == "operator"
    number = r.json()["number"]
    assert api.get("/policy").json()["number"] == number
    assert api.verdict("fin-desk2", "ledger-db", "tcp", 22) == "allow"
    assert api.get("/policy/draft").status_code == 404
    history = api.get("/policy/history").json()
    assert [h["number"] for h in history] == [number, 1]
    assert history[0]["diff"] == {"against": 1, "rules": {"added": ["desktops-ssh-ledger"], "removed": [], "changed": []},
                                  "groups": {"added": [], "removed": [], "changed": []}}
    assert history[1]["diff"]["against"] is None and history[1]["state"] == "archived"
    r = api.post("/policy/revert", {"revision": 1})
    assert r.status_code == 200 and r.json()["based_on"] == 1
    reverted = r.json()["number"]
    assert reverted > number and api.get("/policy").json()["number"] == reverted
    assert api.verdict("fin-desk2", "ledger-db", "tcp", 22) == "deny"
    diff = api.get("/policy/history").json()[0]["diff"]
    assert diff["against"] == number and diff["rules"]["removed"] == ["desktops-ssh-ledger"]
    assert api.get(f"/policy/revisions/{number}").json()["state"] == "archived"
    assert api.get("/policy/revisions/999").status_code == 404


def test_draft_edit_and_discard_touch_nothing_live(api: Api) -> None:
    doc = policy_document()
    changed = {"groups": {**doc["groups"], "ledger": "tag.app == 'nothing'"}, "rules": doc["rules"]}
    assert api.put("/policy/draft", {"document": changed}).status_code == 200
    assert api.verdict("fin-desk1", "ledger-db") == "allow"
    whatif = api.post("/policy/draft/whatif").json()
    assert ("fin-desk1", "ledger-db", "tcp/5432") in {(c["src"], c["dst"], c["service"]) for c in whatif["newly_denied"]}
    assert api.get("/policy/draft").json()["document"]["groups"]["ledger"] == "tag.app == 'nothing'"
    assert api.delete("/policy/draft").json()["state"] == "discarded"
    assert api.get("/policy/draft").status_code == 404
    assert api.post("/policy/draft/publish").status_code == 404


BROKEN_RULES = [
    {"id": "bad-cidr", "tier": "application", "position": 40, "source": {"group": "desktops"},
     "destination": {"cidr": "10.0.0.1/8"}, "action": "allow"},
    {"id": "bad-group", "tier": "application", "position": 50, "source": {"group": "nosuch"},
     "destination": {"group": "ledger"}, "action": "allow"},
    {"id": "bad-port", "tier": "application", "position": 60, "source": {"group": "desktops"},
     "destination": {"group": "ledger"}, "services": ["tcp/70000"], "action": "allow"},
]


def test_publish_with_problems_is_refused_with_every_problem(api: Api) -> None:
    doc = policy_document()
    broken = {"groups": doc["groups"], "rules": [*doc["rules"], *BROKEN_RULES]}
    assert api.put("/policy/draft", {"document": broken}).status_code == 200
    validation = api.post("/policy/draft/validate").json()
    assert validation["valid"] is False
    locations = {p["location"] for p in validation["problems"]}
    assert {"rules[4].destination.cidr", "rules[5].source.group", "rules[6].services[0]"} <= locations
    before, audits = snapshot(api.store), audit_count(api.store)
    r = api.post("/policy/draft/publish")
    assert r.status_code == 422
    body = r.json()
    assert {p["location"] for p in body["problems"]} == locations
    assert "did you mean 10.0.0.0/8" in body["message"] and "unknown group 'nosuch'" in body["message"]
    assert "port 70000 out of range" in body["message"]
    assert ["body", "rules", 6, "services", 0] in [d["loc"] for d in body["detail"]]
    assert snapshot(api.store) == before
    assert audit_count(api.store) == audits + 1  # the refusal is audited, nothing else
    assert api.store.audit_log(limit=1)[0].outcome.startswith("rejected")
    assert api.verdict("fin-desk1", "ledger-db") == "allow"
    r = api.post("/policy/draft/whatif")
    assert r.status_code == 422 and {p["location"] for p in r.json()["problems"]} == locations
