"""Alembic environment, driven from code: `controller.store.database.migrate` hands over an
open connection in `config.attributes["connection"]`, so no alembic.ini is needed at run time.

For developers writing a new revision, the alembic CLI also works:
    GOLDILOCKS_DB_URL=sqlite:///dev.db alembic -c controller/store/migrations/alembic.ini revision --autogenerate -m "..."
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection, create_engine

from controller.store.schema import Base

config = context.config


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copies tables
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_from_url() -> None:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("GOLDILOCKS_DB_URL")
    if not url:
        raise RuntimeError("set GOLDILOCKS_DB_URL (or sqlalchemy.url) to run alembic by hand")
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline (--sql) migrations are not supported: run them against a database")

given = config.attributes.get("connection")
if given is not None:
    _run(given)
else:
    _run_from_url()
