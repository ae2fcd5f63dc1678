"""The database under the store: one engine per URL, short sessions, migrations.

SQLite by default, PostgreSQL by URL.  Every state change is one short transaction.  Writers on SQLite take the
database lock up front (``BEGIN IMMEDIATE``; WAL journal, busy timeout), so a read-then-write such as claiming
jobs is atomic across threads and processes; on PostgreSQL a claim is ``SELECT … FOR UPDATE SKIP LOCKED`` and
job creation takes a transaction-scoped advisory lock on the input hash.  Error texts never carry bound values
(``hide_parameters``): they may be patient IDs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, CursorResult, Engine, Result, make_url
from sqlalchemy.orm import Session

from ..models import UTCDateTime

log = logging.getLogger("service.store")

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def normalise_url(url: str) -> str:
    """``postgresql://`` and ``postgres://`` mean psycopg 3 here (psycopg2 is not a dependency)."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _sqlite_engine(url: str) -> Engine:
    u = make_url(url)
    if u.database and u.database != ":memory:":
        Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    # hide_parameters: error texts (logged) must not carry bound values such as patient IDs
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, hide_parameters=True)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _rec: Any) -> None:
        dbapi_conn.isolation_level = None  # pysqlite must not emit BEGIN itself: we do (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA temp_store=MEMORY")  # sorts and temp tables never go to a file in /tmp (issue 14)
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def affected(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE changed (SQLAlchemy types ``execute`` as a plain Result)."""
    return cast(CursorResult[Any], result).rowcount


class Database:
    """One database: its engine, read and write sessions, migrations."""

    def __init__(self, database_url: str) -> None:
        self.url = normalise_url(database_url)
        self.dialect = make_url(self.url).get_backend_name()
        if self.dialect == "sqlite":
            self.engine = _sqlite_engine(self.url)
        else:
            self.engine = create_engine(
                self.url, pool_pre_ping=True, pool_size=5, max_overflow=10, hide_parameters=True
            )
        # Writers: BEGIN IMMEDIATE on SQLite (the lock first, so read-then-write cannot deadlock/race).
        self._writer = self.engine.execution_options(sqlite_begin="IMMEDIATE")

    def __repr__(self) -> str:  # never print a password
        return f"Database({self.safe_url!r})"

    @property
    def safe_url(self) -> str:
        """The URL without its password."""
        return make_url(self.url).render_as_string(hide_password=True)

    def dispose(self) -> None:
        self.engine.dispose()

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session in a transaction that only reads."""
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            yield s

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session in a writing transaction (committed at the end of the block, rolled back on an error)."""
        with Session(self._writer, expire_on_commit=False) as s, s.begin():
            yield s

    def begin_writing(self) -> AbstractContextManager[Connection]:
        """A connection in a writing transaction (SQLite: ``BEGIN IMMEDIATE``), for migrations."""
        return self._writer.begin()

    def lock_input(self, s: Session, input_hash: str) -> None:
        """Serialise job creation for one input set (PostgreSQL; SQLite's writer lock does it already)."""
        if self.dialect == "postgresql":
            s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": int(input_hash[:15], 16)})

    def insert(self, table: Any) -> Any:
        """The dialect's ``INSERT`` (with ``on_conflict_do_update``) for ``table``."""
        return postgresql.insert(table) if self.dialect == "postgresql" else sqlite.insert(table)

    def as_utc(self, v: datetime | str | None) -> datetime | None:
        """An aggregate's date-time (SQLite gives aggregates back without their column type) as aware UTC."""
        if v is None or isinstance(v, datetime) and v.tzinfo is not None:
            return v
        if isinstance(v, str):
            v = datetime.fromisoformat(v)
        return UTCDateTime().process_result_value(v, self.engine.dialect)

    def migrate(self) -> None:
        """``alembic upgrade head`` on this database (the scripts ship inside the package)."""
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self.begin_writing() as conn:
            if self.dialect == "postgresql":  # two replicas starting at once migrate one after the other
                conn.execute(text("SELECT pg_advisory_xact_lock(7418230941)"))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            log.warning("database ping failed", exc_info=True)
            return False
