"""The database itself: created on first open, migrated to head, idempotent on restart,
SQLite in WAL mode with foreign keys on, the audit log append-only at the SQL level."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, make_url, text
from sqlalchemy.exc import DBAPIError

from controller.model import Hypervisor
from controller.store import Store, database
from controller.store.database import MIGRATIONS, open_engine, script_head
from controller.store.schema import Base
from tests.store.postgres import PostgresServer

TABLES = {
    "hypervisors", "vms", "vnics", "vnic_ips", "tags", "settings", "directory_users",
    "directory_memberships", "contexts", "principals", "policy_revisions", "audit_log",
    "alembic_version",
}


def _head() -> str:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def test_fresh_database_gets_every_table_at_head(store: Store) -> None:
    engine = create_engine(store.url)
    try:
        assert TABLES <= set(inspect(engine).get_table_names())
        with engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == _head()
    finally:
        engine.dispose()


def test_models_match_the_migrations(store: Store) -> None:
    # A model changed without a new migration would show up here, not in production.
    engine = create_engine(store.url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_reopening_is_idempotent_and_keeps_data(url: str) -> None:
    first = Store(url)
    first.upsert_hypervisor(Hypervisor("hv1", 100, 1), actor="alice")
    first.close()
    second = Store(url)  # migrations run again: nothing to do, nothing lost
    try:
        assert second.list_hypervisors() == [Hypervisor("hv1", 100, 1)]
        engine = create_engine(url)
        with engine.connect() as conn:
            versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        engine.dispose()
        assert versions == [_head()]
    finally:
        second.close()


def test_the_head_read_from_the_scripts_is_alembics() -> None:
    # migrate() skips Alembic when the database is at this revision: it must be the real head.
    assert script_head() == _head()


def test_reopening_an_up_to_date_database_does_not_load_alembic(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/db.db"
    Store(url).close()
    probe = (f"import sys; from controller.store import Store; Store({url!r}).close(); "
             "print('alembic' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False"


def test_a_database_at_an_unknown_revision_still_fails_to_open(url: str) -> None:
    # E.g. written by a newer controller: Alembic refuses, as it did before the head check.
    Store(url).close()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))
    engine.dispose()
    with pytest.raises(Exception, match="ffff"):
        Store(url)


def test_a_database_behind_the_head_is_upgraded(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    first = Store(url)
    first.upsert_hypervisor(Hypervisor("hv1", 100, 1), actor="alice")
    first.close()
    upgraded: list[str] = []
    newer = f"{int(_head()) + 1:04d}"
    monkeypatch.setattr(database, "script_head", lambda: newer)  # as if a newer migration existed
    monkeypatch.setattr(database, "_upgrade", lambda engine: upgraded.append(engine.url.render_as_string()))
    Store(url).close()
    assert len(upgraded) == 1


def test_a_database_of_the_first_schema_gains_flow_snapshots_and_keeps_its_data(url: str) -> None:
    from alembic import command

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    engine = open_engine(url)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        connection.execute(text("INSERT INTO hypervisors (name, uplink_ofport, dpid) VALUES ('hv1', 100, '1')"))
    engine.dispose()
    store = Store(url)  # 0001 -> head
    try:
        assert store.list_hypervisors() == [Hypervisor("hv1", 100, 1)]
        assert store.snapshot_stamp(0.0, 5.0) == (0, None)
        store.upsert_hypervisor(Hypervisor("hv2", 100, 2), actor="alice")
        assert store.snapshot_stamp(0.0, 5.0) == (1, None)
    finally:
        store.close()


@pytest.mark.parametrize(("scripts", "head"), [
    ({"a.py": 'revision: str = "0001"\ndown_revision = None\n'}, "0001"),
    ({"a.py": 'revision = "0001"\ndown_revision = None\n',
      "b.py": 'revision = "0002"\ndown_revision: str | None = "0001"\n'}, "0002"),
    ({"a.py": 'revision = "0001"\ndown_revision = None\n', "b.py": 'revision = "0002"\ndown_revision = None\n'},
     None),  # two heads: Alembic decides
    ({"a.py": 'revision = "0001"\ndown_revision = None\n', "b.py": 'revision = "0003"\ndown_revision = ("0001", "0002")\n'},
     None),  # revises a script that is not there
    ({"a.py": 'revision = "0001"\ndown_revision = None\n', "b.py": 'revision = make()\ndown_revision = "0001"\n'},
     None),  # not a literal
    ({"a.py": 'revision = "0001"\n'}, None),  # no down_revision
    ({"a.py": 'revision = "0001"\ndown_revision = None\n', "b.py": "def broken(:\n"}, None),
    ({}, None),
])
def test_the_script_head_is_read_conservatively(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                scripts: dict[str, str], head: str | None) -> None:
    (tmp_path / "versions").mkdir()
    (tmp_path / "versions" / "__init__.py").write_text("")
    for name, source in scripts.items():
        (tmp_path / "versions" / name).write_text(source)
    monkeypatch.setattr(database, "MIGRATIONS", tmp_path)
    assert script_head() == head


def test_sqlite_file_is_wal_with_foreign_keys(tmp_path: object) -> None:
    url = f"sqlite:///{tmp_path}/wal.db"
    Store(url).close()
    raw = sqlite3.connect(make_url(url).database or "")
    try:
        # journal_mode=WAL is a property of the file: any later connection sees it.
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        raw.close()
    engine = open_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert (conn.exec_driver_sql("PRAGMA busy_timeout").scalar() or 0) > 0
    finally:
        engine.dispose()


def test_full_64_bit_dpid_round_trips(store: Store) -> None:
    hv = Hypervisor("big", 4294967040, (1 << 64) - 1)
    store.upsert_hypervisor(hv, actor="alice")
    assert store.list_hypervisors() == [hv]


@pytest.mark.parametrize("statement", [
    "UPDATE audit_log SET actor = 'mallory'",
    "DELETE FROM audit_log",
])
def test_audit_log_rejects_update_and_delete(store: Store, statement: str) -> None:
    store.upsert_hypervisor(Hypervisor("hv1"), actor="alice")
    engine = create_engine(store.url)
    try:
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(text(statement))
        with engine.connect() as conn:
            actors = conn.execute(text("SELECT actor FROM audit_log")).scalars().all()
    finally:
        engine.dispose()
    assert actors == ["alice"]


def test_postgres_audit_log_rejects_truncate(postgres: PostgresServer) -> None:
    # SQLite has no TRUNCATE; on PostgreSQL row triggers do not fire for it.
    store = Store(postgres.url())
    store.upsert_hypervisor(Hypervisor("hv1"), actor="alice")
    engine = create_engine(store.url)
    try:
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(text("TRUNCATE audit_log"))
    finally:
        engine.dispose()
        store.close()
