"""First start: seed from the scenario, print the admin token once; rebuilds fail closed."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import pytest

from controller.boot import ADMIN_TOKEN_ENV, engine_from_state, open_store
from controller.store.records import PolicyRevision, RevisionState

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finance-identity.yaml"


def test_first_start_seeds_and_prints_the_admin_token_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    url = f"sqlite:///{tmp_path / 'g.db'}"
    out = io.StringIO()
    store = open_store(url, EXAMPLE, out)
    printed = out.getvalue()
    token = printed.strip().rsplit(" ", 1)[-1]
    assert "admin API token" in printed and store.authenticate(token) is not None
    assert [vm.name for vm in store.list_vms()] and store.active_revision().number == 1
    store.close()
    again = io.StringIO()
    store = open_store(url, EXAMPLE, again)
    assert again.getvalue() == "", "the token is shown only at the first start"
    assert store.active_revision().number == 1, "a second start does not re-import"
    store.close()


def test_admin_token_from_the_environment_is_not_printed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "a-long-operator-chosen-token-0001")
    out = io.StringIO()
    store = open_store(f"sqlite:///{tmp_path / 'g.db'}", None, out)
    assert out.getvalue() == ""
    assert store.authenticate("a-long-operator-chosen-token-0001") is not None
    store.close()


def test_a_stored_policy_that_no_longer_loads_fails_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    store = open_store(f"sqlite:///{tmp_path / 'g.db'}", EXAMPLE, io.StringIO())
    state = store.load_state(0)
    broken = PolicyRevision(9, RevisionState.ACTIVE, {"groups": {}, "rules": [{"id": "x"}]}, "admin", 0.0)
    engine = engine_from_state(replace(state, policy=broken), 0)
    assert engine.world().policy.rules == (), "default deny, not a half-loaded policy"
    good = engine_from_state(state, 0)
    assert good.world().policy.rules
    assert all(n.ofport is None for vm in good.world().inventory.vms.values() for n in vm.vnics)
    store.close()
