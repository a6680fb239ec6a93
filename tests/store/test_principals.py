"""Principals and their tokens: shown once, stored only as salted hashes, revocable."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text

from controller.store import Conflict, NotFound, Store
from controller.store.records import Principal, Role


def _database_text(store: Store) -> str:
    """Everything the database holds, as text: the SQLite files' bytes, or every row on PostgreSQL."""
    url = make_url(store.url)
    if url.get_backend_name() == "sqlite":
        base = Path(url.database or "")
        files = [p for p in base.parent.iterdir() if p.name.startswith(base.name)]  # db, -wal, -shm
        return "".join(p.read_bytes().decode("latin-1") for p in files)
    engine = create_engine(store.url)
    try:
        with engine.connect() as conn:
            tables = conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars().all()
            return "\n".join(
                row for t in tables for row in conn.execute(text(f'SELECT t::text FROM "{t}" t')).scalars()
            )
    finally:
        engine.dispose()


def test_bootstrap_creates_admin_once(store: Store) -> None:
    token = store.bootstrap_admin()
    assert token
    assert store.bootstrap_admin() is None  # principals exist: nothing new, no token shown
    assert store.authenticate(token) == Principal("admin", Role.ADMIN, None, store.list_principals()[0].created_at)


def test_bootstrap_with_a_chosen_token(store: Store) -> None:
    assert store.bootstrap_admin("correct horse battery staple") == "correct horse battery staple"
    who = store.authenticate("correct horse battery staple")
    assert who is not None and who.name == "admin" and who.role == Role.ADMIN
    assert store.authenticate("correct horse battery stapler") is None


def test_tokens_are_stored_hashed_never_in_plaintext(store: Store) -> None:
    admin = store.bootstrap_admin("env-supplied-admin-token")
    assert admin is not None
    _, relay = store.create_principal("relay-hv1", Role.RELAY, "hv1", actor="admin")
    _, operator = store.create_principal("ops", Role.OPERATOR, actor="admin")
    stored = _database_text(store)
    assert "relay-hv1" in stored  # the search itself works
    for token in (admin, relay, operator):
        assert token not in stored
        # not even the secret part: gl_<id>_<secret>, and the secret is base64url, "_" included
        assert token.split("_", 2)[-1] not in stored


def test_authenticate_and_revoke(store: Store) -> None:
    store.bootstrap_admin()
    principal, token = store.create_principal("relay-hv1", Role.RELAY, "hv1", actor="admin")
    assert principal.role == Role.RELAY and principal.hypervisor == "hv1" and not principal.revoked
    assert store.authenticate(token) == principal
    assert store.authenticate(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert store.authenticate("gl_0000000000000000_" + "x" * 43) is None
    assert store.authenticate("") is None

    revoked = store.revoke_principal("relay-hv1", actor="admin")
    assert revoked.revoked
    assert store.authenticate(token) is None
    assert [p.name for p in store.list_principals() if p.revoked] == ["relay-hv1"]


def test_principal_arguments(store: Store) -> None:
    with pytest.raises(ValueError, match="relay principal needs the hypervisor"):
        store.create_principal("r", Role.RELAY, actor="admin")
    with pytest.raises(ValueError, match="only relay principals have a hypervisor"):
        store.create_principal("o", Role.OPERATOR, "hv1", actor="admin")
    store.create_principal("o", Role.OPERATOR, actor="admin")
    with pytest.raises(Conflict, match="name o: already used"):
        store.create_principal("o", Role.AUDITOR, actor="admin")
    with pytest.raises(NotFound):
        store.revoke_principal("nobody", actor="admin")


def test_the_last_admin_cannot_be_revoked(store: Store) -> None:
    store.bootstrap_admin()
    with pytest.raises(Conflict, match="last admin"):
        store.revoke_principal("admin", actor="admin")
    store.create_principal("root2", Role.ADMIN, actor="admin")
    assert store.revoke_principal("admin", actor="root2").revoked


def test_token_writes_are_audited_without_secrets(store: Store) -> None:
    store.bootstrap_admin()
    _, token = store.create_principal("aud", Role.AUDITOR, actor="admin")
    store.revoke_principal("aud", actor="admin")
    entries = store.audit_log(action_prefix="token.")
    assert [(e.action, e.actor, e.target) for e in entries] == [
        ("token.revoke", "admin", "principal:aud"),
        ("token.create", "admin", "principal:aud"),
        ("token.bootstrap", "system", "principal:admin"),
    ]
    assert entries[0].before == {"name": "aud", "role": "auditor", "hypervisor": None, "revoked": False}
    assert entries[0].after == {"name": "aud", "role": "auditor", "hypervisor": None, "revoked": True}
    assert token not in repr(entries)
