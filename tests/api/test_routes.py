"""Happy paths: each route does its job, and the engine sees every committed change."""

from __future__ import annotations

from tests.api.conftest import NOW, Api

NEW_VM = {"name": "fin-desk3", "hypervisor": "hv1", "tags": {"role": "desktop"},
          "vnics": [{"mac": "02:00:00:00:01:03", "ips": ["10.0.0.13"], "name": "tap-fin3"}]}


def names(items: list[dict]) -> list[str]:
    return [i["name"] for i in items]


def test_auth_errors_are_clear(api: Api) -> None:
    r = api.get("/vms", role=None)
    assert r.status_code == 401 and r.json() == {"detail": "missing bearer token"}
    assert r.headers["www-authenticate"] == "Bearer"
    r = api.get("/vms", role="nonsense")
    assert r.status_code == 401 and r.json() == {"detail": "invalid or revoked token"}
    r = api.put("/policy/draft", {"rules": []}, role="auditor")
    assert r.status_code == 403 and "it needs role admin or operator" in r.json()["detail"]
    assert api.get("/health", role=None).json() == {"status": "ok"}


def test_vm_lifecycle_reaches_the_engine(api: Api) -> None:
    r = api.post("/vms", NEW_VM, role="operator")
    assert r.status_code == 201, r.text
    vm = r.json()
    assert vm["name"] == "fin-desk3" and vm["tags"] == {"role": "desktop"}
    assert vm["vnics"] == [{"mac": "02:00:00:00:01:03", "ips": ["10.0.0.13"], "name": "tap-fin3", "ofport": None}]
    assert api.store.get_vm("fin-desk3") is not None
    assert api.controller.vm("fin-desk3") is not None
    assert names(api.get("/vms", params={"name": "fin-*"}).json()) == ["fin-desk1", "fin-desk2", "fin-desk3"]
    assert names(api.get("/vms", params={"hypervisor": "hv2"}).json()) == ["eng-desk1", "ledger-db"]
    assert names(api.get("/vms", params={"tag": "app=ledger"}).json()) == ["ledger-db"]
    # No finance user yet: not in finance-desktops; the identity provider logs alice in.
    assert api.verdict("fin-desk3", "ledger-db") == "deny"
    r = api.post("/vms/fin-desk3/context/authoritative", {"users": ["alice"]}, role="operator")
    assert r.status_code == 200, r.text
    assert r.json()["provenance"] == "authoritative"
    assert api.verdict("fin-desk3", "ledger-db") == "allow"
    members = api.get("/groups/finance-desktops").json()["members"]
    assert [m["name"] for m in members] == ["fin-desk1", "fin-desk3"]
    # Re-tag: no longer a desktop, so neither the ping rule nor the finance rule applies.
    r = api.put("/vms/fin-desk3/tags", {"tags": {"role": "server"}})
    assert r.status_code == 200 and r.json()["tags"] == {"role": "server"}
    assert api.verdict("fin-desk3", "ledger-db") == "deny"
    assert api.verdict("fin-desk3", "ledger-db", "icmp", 0) == "deny"
    # Replace the whole record: tags and a second IP.
    body = {**NEW_VM, "vnics": [{"mac": "02:00:00:00:01:03", "ips": ["10.0.0.13", "10.0.0.14"]}]}
    r = api.put("/vms/fin-desk3", body)
    assert r.status_code == 200 and r.json()["vnics"][0]["ips"] == ["10.0.0.13", "10.0.0.14"]
    seen = api.get("/vms/fin-desk3").json()["engine"]
    assert seen["vnics"][0]["ips"] == ["10.0.0.13", "10.0.0.14"]
    assert {"attr": "user", "key": "", "value": "alice", "provenance": "authoritative", "observed_at": NOW} in seen["facts"]
    assert api.verdict("fin-desk3", "ledger-db") == "allow"
    r = api.delete("/vms/fin-desk3")
    assert r.status_code == 200 and r.json()["name"] == "fin-desk3"
    assert api.store.get_vm("fin-desk3") is None and api.controller.vm("fin-desk3") is None
    assert api.get("/vms/fin-desk3").status_code == 404


def test_guest_logout_via_relay_denies(api: Api) -> None:
    assert api.verdict("fin-desk1", "ledger-db") == "allow"
    r = api.post("/vms/fin-desk1/context/guest", {"users": [], "os": "linux", "apps": {"sshd": ["tcp/22"]},
                                                  "ttl_seconds": 60}, role="relay")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["provenance"] == "guest" and body["reported_by"] == "relay-hv1"
    assert body["expires_at"] == NOW + 60
    assert api.verdict("fin-desk1", "ledger-db") == "deny"
    records = {rec["provenance"]: rec for rec in api.get("/vms/fin-desk1/context", role="auditor").json()["records"]}
    assert {(f["attr"], f["key"], f["value"]) for f in records["guest"]["facts"]} == {
        ("os", "", "linux"), ("app", "sshd", "tcp/22")}
    why = api.get("/groups/finance-desktops/members/fin-desk1").json()
    assert why["member"] is False
    assert [(t["term"], t["satisfied"]) for t in why["tests"]] == [
        ("tag.role == 'desktop'", True), ("usergroup == 'finance'", False)]


def test_edr_verdict_quarantines_and_clears(api: Api) -> None:
    r = api.post("/vms/fin-desk1/context/authoritative", {"verdict": "malicious"})
    assert r.status_code == 200
    assert [(f["attr"], f["key"], f["value"]) for f in r.json()["facts"]] == [("posture", "edr", "fail")]
    result = api.get("/explain", params={"src": "fin-desk1", "dst": "ledger-db", "protocol": "tcp", "port": 5432}).json()
    assert result["verdict"] == "deny" and result["rule"]["id"] == "quarantine-out"
    evidence = [ev for m in result["memberships"] for ev in m["evidence"] if ev["term"] == "posture.edr == 'fail'"]
    assert evidence and evidence[0]["facts"][0]["provenance"] == "authoritative"
    # A login report keeps the verdict (fields omitted are unchanged); a clean verdict lifts it.
    r = api.post("/vms/fin-desk1/context/authoritative", {"users": ["carol"]})
    assert {(f["attr"], f["value"]) for f in r.json()["facts"]} == {("posture", "fail"), ("user", "carol")}
    assert api.verdict("fin-desk1", "ledger-db") == "deny"
    api.post("/vms/fin-desk1/context/authoritative", {"verdict": "clean"})
    assert api.verdict("fin-desk1", "ledger-db") == "allow"


def test_directory_change_reaches_the_engine(api: Api) -> None:
    assert api.verdict("fin-desk2", "ledger-db") == "deny"
    r = api.put("/directory/bob", {"groups": ["engineering", "finance"]}, role="operator")
    assert r.status_code == 200 and r.json() == {"user": "bob", "groups": ["engineering", "finance"]}
    assert {"user": "bob", "groups": ["engineering", "finance"]} in api.get("/directory").json()
    assert api.verdict("fin-desk2", "ledger-db") == "allow"


def test_explain_post_and_external_address(api: Api) -> None:
    r = api.post("/explain", {"src": "fin-desk1", "dst": "ledger-db", "protocol": "tcp", "port": 5432}, role="auditor")
    assert r.status_code == 200
    body = r.json()
    assert body["verdict"] == "allow" and body["rule"] == {"id": "finance-to-ledger", "tier": "application", "position": 10}
    assert body["enforced_at"] and body["memberships"][0]["group"] == "finance-desktops"
    r = api.post("/explain", {"src": "fin-desk1", "dst": "192.0.2.1", "protocol": "udp", "port": 53})
    assert r.status_code == 200 and r.json()["verdict"] == "deny"
    r = api.post("/explain", {"src": "ghost", "dst": "ledger-db", "protocol": "icmp"})
    assert r.status_code == 404 and r.json()["detail"].startswith("src:")
    r = api.post("/explain", {"src": "fin-desk1", "dst": "nowhere", "protocol": "icmp"})
    assert r.status_code == 404 and r.json()["detail"].startswith("dst:")


def test_hypervisor_gateway_status_hits(api: Api) -> None:
    r = api.put("/hypervisors/hv3", {"uplink_ofport": 100, "dpid": 3})
    assert r.status_code == 200 and r.json() == {"name": "hv3", "uplink_ofport": 100, "dpid": 3}
    status = api.get("/status", role="auditor").json()
    assert status["healthy"] is True
    assert [h["hypervisor"] for h in status["hypervisors"]] == ["hv1", "hv2", "hv3"]
    assert all(h["desired_flows"] > 0 and h["connected"] is False for h in status["hypervisors"])
    r = api.put("/gateway", {"ip": "10.0.0.254", "mac": "02:00:00:00:00:FE"})
    assert r.status_code == 200 and r.json() == {"ip": "10.0.0.254", "mac": "02:00:00:00:00:fe"}
    assert api.get("/gateway").json()["mac"] == "02:00:00:00:00:fe"
    assert api.delete("/hypervisors/hv3").status_code == 200
    assert [h["name"] for h in api.get("/hypervisors").json()] == ["hv1", "hv2"]
    r = api.delete("/hypervisors/hv1")
    assert r.status_code == 409 and "still hosts vm" in r.json()["detail"]
    hits = api.get("/rules/hits").json()
    assert {h["rule_id"] for h in hits} == {"quarantine-out", "quarantine-in", "finance-to-ledger", "desktops-ping-ledger"}
    assert all(h["packets"] == 0 and h["last_hit"] is None for h in hits)
    assert api.delete("/gateway").status_code == 200 and api.get("/gateway").status_code == 404


def test_tokens_and_audit(api: Api) -> None:
    r = api.post("/tokens", {"name": "ci", "role": "operator"})
    assert r.status_code == 201
    token = r.json()["token"]
    assert r.json()["role"] == "operator" and token.startswith("gl_")
    listed = api.get("/tokens").json()
    assert "ci" in names(listed) and all("token" not in p for p in listed)
    assert api.post("/vms", NEW_VM, role=token).status_code == 201
    entries = api.get("/audit", role="auditor", params={"actor": "ci"}).json()
    assert [e["action"] for e in entries] == ["vm.create"]
    assert entries[0]["after"]["name"] == "fin-desk3"
    assert api.delete("/tokens/ci").json()["revoked"] is True
    r = api.get("/vms", role=token)
    assert r.status_code == 401 and r.json()["detail"] == "invalid or revoked token"
    r = api.post("/tokens", {"name": "relay-hv2", "role": "relay", "hypervisor": "hv2"})
    assert r.status_code == 201 and r.json()["hypervisor"] == "hv2"
    assert api.post("/tokens", {"name": "ci", "role": "auditor"}).status_code == 409
    actions = [e["action"] for e in api.get("/audit", params={"action": "token.", "limit": 3}).json()]
    assert actions == ["token.create", "token.revoke", "token.create"]
