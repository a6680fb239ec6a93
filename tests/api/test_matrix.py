"""Every route × every role (and no token, a bad token): 401, 403 or allowed, as the table says.

The table is enumerated against app.routes, so a new route cannot escape it."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.routing import APIRoute

from tests.api.conftest import ROLES, Api

R = {"admin", "operator", "auditor"}  # read
W = {"admin", "operator"}  # write
A = {"admin"}
AU = {"admin", "auditor"}
REL = {"relay"}
PUBLIC = None

DRAFT = {"document": {"groups": {"g": "tag.role == 'desktop'"}, "rules": []}}
VM = {"name": "m-vm", "hypervisor": "hv1", "vnics": [{"mac": "02:00:00:00:09:01", "ips": ["10.0.9.1"]}]}

# (method, route path) -> (allowed roles, concrete path, JSON body)
TABLE: dict[tuple[str, str], tuple[set[str] | None, str, Any]] = {
    ("GET", "/api/v1/hypervisors"): (R, "/hypervisors", None),
    ("GET", "/api/v1/hypervisors/{name}"): (R, "/hypervisors/hv1", None),
    ("PUT", "/api/v1/hypervisors/{name}"): (W, "/hypervisors/hv9", {"dpid": 9}),
    ("DELETE", "/api/v1/hypervisors/{name}"): (W, "/hypervisors/hv-none", None),
    ("GET", "/api/v1/gateway"): (R, "/gateway", None),
    ("PUT", "/api/v1/gateway"): (W, "/gateway", {"ip": "10.0.0.254", "mac": "02:00:00:00:00:fe"}),
    ("DELETE", "/api/v1/gateway"): (W, "/gateway", None),
    ("GET", "/api/v1/vms"): (R, "/vms", None),
    ("POST", "/api/v1/vms"): (W, "/vms", VM),
    ("GET", "/api/v1/vms/{vm}"): (R, "/vms/fin-desk1", None),
    ("PUT", "/api/v1/vms/{vm}"): (W, "/vms/eng-desk1", {"name": "eng-desk1", "hypervisor": "hv2", "tags": {"role": "desktop"}}),
    ("DELETE", "/api/v1/vms/{vm}"): (W, "/vms/no-such-vm", None),
    ("PUT", "/api/v1/vms/{vm}/tags"): (W, "/vms/eng-desk1/tags", {"tags": {"role": "desktop"}}),
    ("GET", "/api/v1/vms/{vm}/context"): (R, "/vms/fin-desk1/context", None),
    ("POST", "/api/v1/vms/{vm}/context/guest"): (REL, "/vms/fin-desk1/context/guest", {"users": ["alice"], "os": "linux"}),
    ("POST", "/api/v1/vms/{vm}/context/guest/rejected"): (REL, "/vms/fin-desk1/context/guest/rejected", {"reason": "replayed"}),
    ("POST", "/api/v1/vms/{vm}/context/authoritative"): (W, "/vms/fin-desk2/context/authoritative", {"verdict": "clean"}),
    ("GET", "/api/v1/quarantine"): (R, "/quarantine", None),
    ("POST", "/api/v1/vms/{vm}/quarantine"): (W, "/vms/eng-desk1/quarantine", {"reason": "matrix"}),
    ("POST", "/api/v1/vms/{vm}/release"): (W, "/vms/fin-desk2/release", None),  # 409 when allowed: not quarantined
    ("GET", "/api/v1/directory"): (R, "/directory", None),
    ("PUT", "/api/v1/directory/{user}"): (W, "/directory/dave", {"groups": ["staff"]}),
    ("GET", "/api/v1/policy"): (R, "/policy", None),
    ("GET", "/api/v1/policy/draft"): (R, "/policy/draft", None),
    ("PUT", "/api/v1/policy/draft"): (W, "/policy/draft", DRAFT),
    ("DELETE", "/api/v1/policy/draft"): (W, "/policy/draft", None),
    ("POST", "/api/v1/policy/draft/validate"): (R, "/policy/draft/validate", None),
    ("POST", "/api/v1/policy/draft/whatif"): (R, "/policy/draft/whatif", None),
    ("POST", "/api/v1/policy/draft/publish"): (W, "/policy/draft/publish", None),
    ("POST", "/api/v1/policy/revert"): (W, "/policy/revert", {"revision": 1}),
    ("GET", "/api/v1/policy/history"): (R, "/policy/history", None),
    ("GET", "/api/v1/policy/revisions/{number}"): (R, "/policy/revisions/1", None),
    ("GET", "/api/v1/groups"): (R, "/groups", None),
    ("GET", "/api/v1/groups/{name}"): (R, "/groups/desktops", None),
    ("GET", "/api/v1/groups/{name}/members/{vm}"): (R, "/groups/desktops/members/fin-desk1", None),
    ("GET", "/api/v1/explain"): (R, "/explain?src=fin-desk1&dst=ledger-db&protocol=tcp&port=5432", None),
    ("POST", "/api/v1/explain"): (R, "/explain", {"src": "fin-desk1", "dst": "ledger-db", "protocol": "icmp"}),
    ("GET", "/api/v1/status"): (R, "/status", None),
    ("GET", "/api/v1/health"): (PUBLIC, "/health", None),
    ("GET", "/api/v1/rules/hits"): (R, "/rules/hits", None),
    ("POST", "/api/v1/tokens"): (A, "/tokens", {"name": "new-op", "role": "operator"}),
    ("GET", "/api/v1/tokens"): (A, "/tokens", None),
    ("DELETE", "/api/v1/tokens/{name}"): (A, "/tokens/nobody", None),
    ("GET", "/api/v1/audit"): (AU, "/audit?limit=5", None),
}


def api_routes(api: Api) -> set[tuple[str, str]]:
    return {(m, r.path) for r in api.app.routes if isinstance(r, APIRoute) for m in r.methods}


def test_table_covers_every_route(api: Api) -> None:
    assert api_routes(api) == set(TABLE), "add the new route to TABLE with the roles that may call it"


def _call(api: Api, who: str | None, method: str, path: str, body: Any) -> int:
    kwargs = {"json": body} if body is not None else {}
    return api.call(who, method, path, **kwargs).status_code


@pytest.mark.parametrize("key", sorted(TABLE), ids=lambda k: f"{k[0]} {k[1]}")
def test_route_by_role(api: Api, key: tuple[str, str]) -> None:
    allowed, path, body = TABLE[key]
    method = key[0]
    api.put("/policy/draft", DRAFT)  # so draft routes have something to act on
    if allowed is PUBLIC:
        for who in (None, "not-a-token", *ROLES):
            assert _call(api, who, method, path, body) == 200
        return
    assert _call(api, None, method, path, body) == 401
    assert _call(api, "gl_0123456789abcdef_" + "x" * 43, method, path, body) == 401
    for role in ROLES:
        status = _call(api, role, method, path, body)
        if role in allowed:
            assert status not in (401, 403), (role, status)
            assert status < 500
        else:
            assert status == 403, (role, status)
