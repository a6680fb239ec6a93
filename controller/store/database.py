"""Engines and migrations: open a SQLite file or a PostgreSQL database, create it if it is
missing, and bring its schema to the newest Alembic revision."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import URL, Engine, create_engine, event, make_url, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import StaticPool

MIGRATIONS = Path(__file__).parent / "migrations"
DEFAULT_URL = "sqlite:///goldilocks.db"

# Execution option naming how a SQLite transaction begins: IMMEDIATE for writes, so a writer
# takes the lock up front instead of failing with SQLITE_BUSY when it upgrades a read lock.
SQLITE_BEGIN = "goldilocks_sqlite_begin"
BUSY_TIMEOUT_MS = 30_000


def is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def _is_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:") or (url.query.get("mode") == "memory")


def open_engine(url: str) -> Engine:
    """One engine per Store; creates the database (file or PostgreSQL database) if missing."""
    parsed = make_url(url)
    if is_sqlite(parsed):
        return _sqlite_engine(parsed)
    if parsed.get_backend_name() == "postgresql":
        _ensure_postgres_database(parsed)
    return create_engine(parsed, pool_pre_ping=True)


def _sqlite_engine(url: URL) -> Engine:
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False}}
    if _is_memory(url):
        # Every new connection to :memory: is a new, empty database: share one.
        kwargs["poolclass"] = StaticPool
    else:
        Path(url.database or "").expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, **kwargs)
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Take transaction control from the sqlite3 module (it would BEGIN lazily, and only
    # DEFERRED); _sqlite_on_begin issues BEGIN itself.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # WAL: readers (API GETs) never wait for the writer, nor the writer for them.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")  # off by default, per connection
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable enough in WAL mode
    finally:
        cursor.close()


def _sqlite_on_begin(connection: Any) -> None:
    mode = connection.get_execution_options().get(SQLITE_BEGIN, "DEFERRED")
    connection.exec_driver_sql(f"BEGIN {mode}")


def _ensure_postgres_database(url: URL) -> None:
    """CREATE DATABASE if the URL's database does not exist yet (needs the right to create)."""
    probe = create_engine(url)
    try:
        with probe.connect():
            return
    except OperationalError as exc:
        if "does not exist" not in str(exc):
            raise
    finally:
        probe.dispose()
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": url.database}
            ).first()
            if exists is None:
                quoted = conn.dialect.identifier_preparer.quote(url.database or "")
                conn.exec_driver_sql(f"CREATE DATABASE {quoted}")
    finally:
        admin.dispose()


def migrate(engine: Engine) -> None:
    """Upgrade the schema to head; a no-op on an up-to-date database."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    writer = engine.execution_options(**{SQLITE_BEGIN: "IMMEDIATE"})
    with writer.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Several controllers may start at once against one database (DESIGN.md §7).
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


MIGRATION_LOCK = 0x60_1D_10C5  # arbitrary, fixed: advisory-lock keys for this application
WRITE_LOCK = 0x60_1D_10C6
