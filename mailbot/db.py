"""Engine, sessions and migrations; the one place that knows SQLite from PostgreSQL."""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from alembic import command
from alembic.config import Config
from sqlalchemy import Column, Insert, Table, event
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


def _tune_sqlite(dbapi_connection, _record) -> None:  # noqa: ANN001 - DBAPI types
    # WAL lets the triage command and the web pages read while the daemon
    # writes; busy_timeout makes writers from several threads or processes
    # wait for each other instead of failing with "database is locked".
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
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


def upgrade(url: str) -> None:
    """Bring the database schema to the newest migration (idempotent)."""
    command.upgrade(alembic_config(url), "head")


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
