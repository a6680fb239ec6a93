"""Engines and migrations: open a SQLite file or a PostgreSQL database, create it if it is
missing, and bring its schema to the newest Alembic revision."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from sqlalchemy import URL, Connection, Engine, create_engine, event, inspect, make_url, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import StaticPool

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version"  # Alembic's default; env.py keeps it
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
    head = script_head()
    if head is not None:
        with engine.connect() as connection:
            if stored_revisions(connection) == [head]:
                # Every restart: nothing to upgrade, so neither load Alembic nor run its
                # environment (a quarter of a second before the controller can listen).
                return
    _upgrade(engine)


def _upgrade(engine: Engine) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    writer = engine.execution_options(**{SQLITE_BEGIN: "IMMEDIATE"})
    with writer.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Several controllers may start at once against one database (DESIGN.md §7).
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def stored_revisions(connection: Connection) -> list[str]:
    """The revisions Alembic recorded in the database ([] for a new one)."""
    if not inspect(connection).has_table(VERSION_TABLE):
        return []
    return sorted(connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars())


def script_head() -> str | None:
    """The newest migration's revision, read from the scripts' source without importing them
    (nor Alembic). None unless there is exactly one head and every script says plainly what
    it revises: then Alembic decides."""
    revisions: set[str] = set()
    revised: set[str] = set()
    for path in sorted((MIGRATIONS / "versions").glob("*.py")):
        if path.name == "__init__.py":
            continue
        found = _revision_of(path)
        if found is None:
            return None
        revision, down = found
        revisions.add(revision)
        revised.update(down)
    heads = revisions - revised
    return next(iter(heads)) if len(heads) == 1 and revised <= revisions else None


def _revision_of(path: Path) -> tuple[str, tuple[str, ...]] | None:
    """(revision, the revisions it revises) of one migration script, from its module-level
    `revision` and `down_revision` literals; None if either is missing or not a literal."""
    try:
        body = ast.parse(path.read_text(), str(path)).body
    except (OSError, UnicodeDecodeError, SyntaxError):
        return None  # Alembic, importing it, says what is wrong
    values: dict[str, Any] = {}
    for node in body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id in ("revision", "down_revision") and node.value is not None:
            try:
                values[target.id] = ast.literal_eval(node.value)
            except (ValueError, TypeError):
                return None
    revision, down = values.get("revision"), values.get("down_revision", ...)
    if not isinstance(revision, str) or down is ...:
        return None
    downs = () if down is None else (down,) if isinstance(down, str) else tuple(down)
    return (revision, downs) if all(isinstance(d, str) for d in downs) else None


MIGRATION_LOCK = 0x60_1D_10C5  # arbitrary, fixed: advisory-lock keys for this application
WRITE_LOCK = 0x60_1D_10C6
