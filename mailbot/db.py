"""Engine, sessions and migrations; the one place that knows SQLite from PostgreSQL."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from contextlib import contextmanager
from functools import lru_cache
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Iterator

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Insert, Table, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, make_url
from sqlmodel import Session, create_engine

from mailbot.settings import shipped

MIGRATIONS = shipped("db")
_engines: dict[str, Engine] = {}


def utcnow() -> datetime:
    """Aware UTC, the form every datetime column takes and gives back."""
    return datetime.now(timezone.utc)


def normalise_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs (psycopg2 is not a dependency)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


_TUNE_SECONDS = 30.0


def _tune_sqlite(dbapi_connection, _record) -> None:  # noqa: ANN001 - DBAPI types
    # WAL lets the triage command and the web pages read while the daemon
    # writes; busy_timeout makes writers from several threads or processes
    # wait for each other instead of failing with "database is locked".
    cursor = dbapi_connection.cursor()
    deadline = time.monotonic() + _TUNE_SECONDS
    pause = 0.01
    while True:
        try:
            cursor.execute("PRAGMA busy_timeout=30000")
            # Setting the journal mode takes a lock for which SQLite does not call its busy
            # handler: while another process migrates or commits, it fails at once with
            # "database is locked".  Once the file is in WAL mode (it stays so) it need not be set.
            if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.5)
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def get_engine(url: str) -> Engine:
    """One engine per URL per process (engines own connection pools)."""
    url = normalise_url(url)
    engine = _engines.get(url)
    if engine is None:
        if url.startswith("sqlite"):
            database = make_url(url).database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            event.listen(engine, "connect", _tune_sqlite)
        else:
            engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)
        _engines[url] = engine
    return engine


def dispose_engines() -> None:
    for engine in _engines.values():
        engine.dispose()
    _engines.clear()


@contextmanager
def session(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with Session(engine, expire_on_commit=False) as db:
        try:
            yield db
            db.commit()
        except BaseException:
            db.rollback()
            raise


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return config


# The PostgreSQL advisory lock every migration runs under ("mailbot" in ASCII, shortened).
MIGRATION_LOCK = 0x6D61696C626F74


def upgrade(url: str) -> bool:
    """Bring the database schema to the newest migration (idempotent); True when it first
    waited for another daemon's migration.

    On PostgreSQL the migration runs under a session advisory lock, so daemons started
    together on an empty or older database take turns: the first migrates, the others
    wait, then find nothing left to do.  SQLite has one file and one daemon (sqlite_lock).
    """
    if make_url(normalise_url(url)).get_backend_name() != "postgresql":
        command.upgrade(alembic_config(url), "head")
        return False
    with get_engine(url).connect() as connection:
        waited = not connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": MIGRATION_LOCK}).scalar()
        if waited:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
        connection.commit()
        try:
            command.upgrade(alembic_config(url), "head")
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
            connection.commit()
    return waited


class DatabaseInUse(Exception):
    """Another daemon serves this SQLite file."""


def sqlite_lock(url: str) -> IO[str] | None:
    """Hold ``<file>.lock`` for the life of this daemon when ``url`` is an SQLite file: SQLite
    has one writer, and a second daemon on the same file would only fight the first for it.

    Raises DatabaseInUse naming the holder's pid.  The kernel drops the lock when the process
    ends, however it ends, so a daemon restarted after a crash is never refused.
    """
    parsed = make_url(normalise_url(url))
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    path = Path(f"{parsed.database}.lock")
    handle = path.open("a+", encoding="ascii")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise DatabaseInUse(
            f"another mailbot run (pid {holder}) serves {parsed.database}: one daemon per SQLite file "
            "(stop it first; several daemons need PostgreSQL)") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def missing_sqlite_file(url: str) -> Path | None:
    """The file of an SQLite URL when it does not exist yet (connecting would create it)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    path = Path(parsed.database)
    return None if path.exists() else path


def schema_problem(url: str) -> str | None:
    """Why a command other than ``run``/``db upgrade`` may not use the database now; None when
    its schema is the one this mailbot's migrations end at.

    Reads only: a command must never create a database by looking at it, nor run a
    migration beside a daemon that is running one (the two would collide halfway).
    """
    missing = missing_sqlite_file(url)
    if missing is not None:
        return (f"database file {missing} does not exist: start the daemon (`mailbot run`) or create it "
                "with `mailbot db upgrade` (is MAILBOT_DB right?)")
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    with get_engine(url).connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    if current == head:
        return None
    if current is None:
        return ("the database has no mailbot schema yet (a daemon starting now may be creating it): "
                "try again in a moment, or run `mailbot db upgrade`")
    return (f"the database schema is at revision {current} and this mailbot needs {head}: "
            "run `mailbot db upgrade` (the daemon does it at start)")


def ping(engine: Engine) -> None:
    """Raise when the database cannot be reached."""
    with engine.connect() as connection:
        connection.exec_driver_sql("SELECT 1")


def insert_ignoring_duplicates(bind: Engine | Connection, table: Table, *returning: Column) -> Insert:
    """``INSERT ... ON CONFLICT DO NOTHING [RETURNING ...]`` in the bind's dialect.

    Both databases support it natively; it lets concurrent deliveries of the
    same mail race without an IntegrityError aborting a PostgreSQL transaction.
    The statement is built once per dialect and table: executed with its values
    as parameters, SQLAlchemy reuses its compiled form instead of building and
    keying a new statement for every mail.
    """
    return _insert_ignoring(bind.dialect.name, table, returning)


@lru_cache(maxsize=None)
def _insert_ignoring(dialect: str, table: Table, returning: tuple[Column, ...]) -> Insert:
    insert = sqlite.insert if dialect == "sqlite" else postgresql.insert
    statement = insert(table).on_conflict_do_nothing()
    return statement.returning(*returning) if returning else statement
