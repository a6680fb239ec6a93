"""Bad input of every kind: a clear 4xx naming the field, and nothing changed in the store."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.api.conftest import MAX_BODY, Api, audit_count, snapshot

GOOD_VM = {"name": "new-vm", "hypervisor": "hv1", "vnics": [{"mac": "02:00:00:00:09:09", "ips": ["10.0.9.9"]}]}


def refused(api: Api, method: str, path: str, body: Any, status: int, role: str = "admin") -> dict[str, Any]:
    before, audits = snapshot(api.store), audit_count(api.store)
    r = api.call(role, method, path, json=body)
    assert r.status_code == status, r.text
    assert snapshot(api.store) == before
    assert audit_count(api.store) == audits
    return dict(r.json())


@pytest.mark.parametrize("body, field, words", [
    ({**GOOD_VM, "name": 5}, "body.name", "valid string"),
    ({**GOOD_VM, "colour": "red"}, "body.colour", "unknown field 'colour'"),
    ({"hypervisor": "hv1"}, "body.name", "missing required field"),
    ({**GOOD_VM, "vnics": [{"mac": "02:00:00:00:09"}]}, "body.vnics[0].mac", "not a MAC address"),
    ({**GOOD_VM, "vnics": [{"mac": "02:00:00:00:09:09", "ips": ["10.0.9.300"]}]}, "body.vnics[0].ips[0]", "not an IPv4 address"),
    ({**GOOD_VM, "vnics": [{"mac": "02:00:00:00:09:09", "ofport": "1"}]}, "body.vnics[0].ofport", "valid integer"),
    ({**GOOD_VM, "vnics": [{"mac": "02:00:00:00:09:09", "ofport": 0}]}, "body.vnics[0].ofport", "greater than or equal to 1"),
    ({**GOOD_VM, "tags": {"bad key!": "x"}}, "body.tags.bad key!", "bad key"),
    ({**GOOD_VM, "tags": {"tier": 1}}, "body.tags.tier", "valid string"),
    ({**GOOD_VM, "uuid": "not-a-uuid"}, "body.uuid", "not a UUID"),
    ({**GOOD_VM, "name": "../etc"}, "body.name", "not a valid name"),
])
def test_vm_body_faults_name_the_field(api: Api, body: dict, field: str, words: str) -> None:
    out = refused(api, "POST", "/vms", body, 422)
    assert f"{field}: " in out["message"] and words in out["message"], out["message"]
    assert out["detail"] and all({"loc", "msg", "type"} <= set(d) for d in out["detail"])


def test_inventory_conflicts_are_409_naming_the_field(api: Api) -> None:
    dup = {**GOOD_VM, "vnics": [{"mac": "02:00:00:00:01:01"}]}
    out = refused(api, "POST", "/vms", dup, 409)
    assert out["detail"] == "mac 02:00:00:00:01:01: already used by vm fin-desk1"
    out = refused(api, "POST", "/vms", {**GOOD_VM, "vnics": [{"mac": "02:00:00:00:09:09", "ips": ["10.0.0.11"]}]}, 409)
    assert out["detail"].startswith("ip 10.0.0.11: already used by vm fin-desk1")
    out = refused(api, "POST", "/vms", {**GOOD_VM, "name": "fin-desk1"}, 409)  # its default uuid is taken
    assert out["detail"] == "uuid 41d3810e-9f3b-553b-9dfa-84bde06f3a39: already used by vm fin-desk1"
    out = refused(api, "POST", "/vms", {**GOOD_VM, "name": "fin-desk1", "uuid": "00000000-0000-0000-0000-000000000001"}, 409)
    assert out["detail"].startswith("name fin-desk1: already used")
    out = refused(api, "POST", "/vms", {**GOOD_VM, "hypervisor": "hv9"}, 409)
    assert out["detail"].startswith("hypervisor hv9")
    out = refused(api, "PUT", "/hypervisors/hv3", {"dpid": 1}, 409)
    assert out["detail"].startswith("dpid 1")
    out = refused(api, "PUT", "/vms/nope", {"name": "nope", "hypervisor": "hv1"}, 404)
    assert out["detail"] == "vm nope: no such VM"


@pytest.mark.parametrize("method, path, body, field", [
    ("PUT", "/hypervisors/hv3", {"dpid": -1}, "body.dpid"),
    ("PUT", "/hypervisors/hv3", {"uplink": 1}, "body.uplink"),
    ("PUT", "/gateway", {"ip": "10.0.0.254", "mac": "nope"}, "body.mac"),
    ("PUT", "/vms/fin-desk1/tags", {"tags": ["a"]}, "body.tags"),
    ("PUT", "/directory/bob", {"groups": "finance"}, "body.groups"),
    ("POST", "/vms/fin-desk1/context/authoritative", {"verdict": "evil"}, "body.verdict"),
    ("POST", "/vms/fin-desk1/context/authoritative", {"users": ["alice"], "ttl_seconds": -5}, "body.ttl_seconds"),
    ("POST", "/vms/fin-desk1/context/authoritative", {"observed_at": 9e10}, "body.observed_at"),
    ("PUT", "/policy/draft", {"document": {"rules": {}}}, "body.document.rules"),
    ("PUT", "/policy/draft", {"document": {"groups": {"g": 1}}}, "body.document.groups.g"),
    ("PUT", "/policy/draft", {"groups": {}, "rules": []}, "body.document"),
    ("POST", "/policy/revert", {"revision": "1"}, "body.revision"),
    ("POST", "/explain", {"src": "fin-desk1", "dst": "ledger-db", "protocol": "tcp", "port": 70000}, "body.port"),
    ("POST", "/explain", {"src": "fin-desk1", "dst": "ledger-db", "protocol": "tcp"}, "body.port"),
    ("POST", "/explain", {"src": "fin-desk1", "dst": "ledger-db", "protocol": "sctp", "port": 1}, "body.protocol"),
    ("POST", "/tokens", {"name": "r", "role": "relay"}, "body.hypervisor"),
    ("POST", "/tokens", {"name": "r", "role": "relay", "hypervisor": "hv9"}, "body.hypervisor"),
    ("POST", "/tokens", {"name": "r", "role": "root"}, "body.role"),
])
def test_other_bodies_name_the_field(api: Api, method: str, path: str, body: dict, field: str) -> None:
    out = refused(api, method, path, body, 422)
    assert f"{field}: " in out["message"], out["message"]


def test_guest_context_faults(api: Api) -> None:
    for body, field in [({"apps": {"pg": ["icmp"]}}, "body.apps.pg[0]"), ({"apps": {"pg": ["tcp/0"]}}, "body.apps.pg[0]"),
                        ({"posture": {"edr": "ok"}}, "body.posture.edr"), ({"users": "alice"}, "body.users"),
                        ({"vm": "other"}, "body.vm")]:
        out = refused(api, "POST", "/vms/fin-desk1/context/guest", body, 422, role="relay")
        assert f"{field}: " in out["message"], out["message"]


def test_relay_for_another_hypervisor_is_refused_and_audited(api: Api) -> None:
    before, audits = snapshot(api.store), audit_count(api.store)
    r = api.post("/vms/ledger-db/context/guest", {"users": ["mallory"]}, role="relay")
    assert r.status_code == 403
    assert r.json()["detail"] == "relay for hv1 may not report context for VM ledger-db on hv2"
    assert snapshot(api.store) == before
    assert audit_count(api.store) == audits + 1
    entry = api.store.audit_log(limit=1)[0]
    assert (entry.actor, entry.action, entry.outcome) == (
        "relay-hv1", "context.guest", "rejected: relay for hv1 may not report context for VM ledger-db on hv2")
    assert api.controller.membership("finance-desktops", "ledger-db") is not None
    assert "mallory" not in {f.value for f in api.controller.vm("ledger-db").facts}


def test_huge_bodies_are_413(api: Api) -> None:
    before, audits = snapshot(api.store), audit_count(api.store)
    big = {"document": {"groups": {}, "rules": [{"id": "x" * 1000}] * (MAX_BODY // 1000 + 1)}}
    r = api.put("/policy/draft", big)
    assert r.status_code == 413 and "too large" in r.json()["detail"]

    def stream() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"document": {"groups": {}, "rules": ['
        for _ in range(MAX_BODY // 50):
            yield b'{"id": "' + b"y" * 80 + b'"},'
        yield b'{}]}}'

    r = api.call("admin", "PUT", "/policy/draft", content=stream(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    assert snapshot(api.store) == before and audit_count(api.store) == audits


def test_malformed_json_and_queries(api: Api) -> None:
    r = api.call("admin", "POST", "/vms", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "body" in r.json()["message"]
    r = api.get("/vms", params={"tag": "novalue"})
    assert r.status_code == 422 and r.json()["message"].startswith("query.tag: expected KEY=VALUE")
    r = api.get("/audit", params={"limit": 0})
    assert r.status_code == 422 and r.json()["message"].startswith("query.limit:")
    r = api.get("/explain", params={"src": "fin-desk1", "dst": "ledger-db", "protocol": "udp", "port": 0})
    assert r.status_code == 422 and r.json()["message"].startswith("query.port:")
