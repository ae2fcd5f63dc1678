"""Alembic environment.  Connection, in this order: one handed over by ``Store.migrate()``
(``config.attributes["connection"]``), ``-x url=...`` on the alembic command line, the service settings."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from service.config import get_settings
from service.models import Base
from service.store.db import Database, normalise_url

config = context.config
target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # ALTER TABLE on SQLite goes through a copy
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        url = get_settings().database_url
    if not url:
        raise RuntimeError("no database URL: -x url=…, sqlalchemy.url, or VOXELDOSE_DATABASE_URL")
    return normalise_url(url)


def run_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    conn = config.attributes.get("connection")
    if conn is not None:
        _configure(conn)
        return
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    db = Database(_url())  # same engine set-up (WAL, busy timeout) as the service
    try:
        with db.begin_writing() as connection:
            _configure(connection)
    finally:
        db.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
