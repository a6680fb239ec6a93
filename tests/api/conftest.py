"""API tests run against a real SQLite store (seeded from examples/finance-identity.yaml) and a
real engine behind EngineFacade.local, rebuilt from that store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient

from controller.api.app import create_app
from controller.boot import engine_from_state
from controller.facade import EngineFacade
from controller.policy.quarantine import MANUAL_ONLY, QuarantinePolicy
from controller.runtime import Runtime
from controller.scenario import load_scenario
from controller.store import Store
from controller.store.records import Role

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finance-identity.yaml"
NOW = 1_700_000_100.0
MAX_BODY = 64 * 1024
ROLES = ("admin", "operator", "auditor", "relay")


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def policy_document(path: Path = EXAMPLE) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    return {"groups": data["groups"], "rules": data["policy"]["rules"]}


@dataclass
class Api:
    app: FastAPI
    client: TestClient
    store: Store
    controller: EngineFacade
    tokens: dict[str, str]
    clock: Clock

    def call(self, role: str | None, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if role is not None:
            headers["Authorization"] = f"Bearer {self.tokens.get(role, role)}"
        return self.client.request(method, "/api/v1" + path, headers=headers, **kwargs)

    def get(self, path: str, role: str = "admin", **kw: Any) -> httpx.Response:
        return self.call(role, "GET", path, **kw)

    def post(self, path: str, json: Any = None, role: str = "admin", **kw: Any) -> httpx.Response:
        return self.call(role, "POST", path, json=json, **kw)

    def put(self, path: str, json: Any = None, role: str = "admin", **kw: Any) -> httpx.Response:
        return self.call(role, "PUT", path, json=json, **kw)

    def delete(self, path: str, role: str = "admin", **kw: Any) -> httpx.Response:
        return self.call(role, "DELETE", path, **kw)

    def verdict(self, src: str, dst: str, protocol: str = "tcp", port: int = 5432) -> str:
        r = self.get("/explain", params={"src": src, "dst": dst, "protocol": protocol, "port": port})
        assert r.status_code == 200, r.text
        return str(r.json()["verdict"])


def make_api(tmp_path: Path, url: str | None = None, quarantine: QuarantinePolicy = MANUAL_ONLY) -> Api:
    clock = Clock()
    store = Store(url or f"sqlite:///{tmp_path / 'goldilocks.db'}")
    store.import_scenario(load_scenario(EXAMPLE), policy_document())
    admin = store.bootstrap_admin()
    assert admin is not None
    tokens = {"admin": admin}
    for role in ("operator", "auditor"):
        tokens[role] = store.create_principal(role, Role(role), actor="admin")[1]
    tokens["relay"] = store.create_principal("relay-hv1", Role.RELAY, "hv1", actor="admin")[1]
    controller = EngineFacade.local(Runtime(engine_from_state(store.load_state(clock()), clock(), unplugged=False, quarantine=quarantine)))
    app = create_app(store, controller, max_body_bytes=MAX_BODY, clock=clock)
    return Api(app, TestClient(app), store, controller, tokens, clock)


@pytest.fixture(params=("sqlite", "postgresql"))
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Api:
    """The API over a real SQLite file, and over a real PostgreSQL server (tests/conftest.py)."""
    if request.param == "sqlite":
        return make_api(tmp_path)
    return make_api(tmp_path, request.getfixturevalue("postgres").url())


def snapshot(store: Store) -> dict[str, Any]:
    """Everything a refused request must leave as it was (the audit log is compared apart)."""
    return {
        "vms": store.list_vms(),
        "hypervisors": store.list_hypervisors(),
        "gateway": store.gateway(),
        "draft": store.draft(),
        "active": store.active_revision(),
        "history": store.history(),
        "directory": store.directory(),
        "principals": store.list_principals(),
        "contexts": {vm.uuid: store.get_context(vm.uuid) for vm in store.list_vms()},
    }


def audit_count(store: Store) -> int:
    return len(store.audit_log(limit=1_000_000))
