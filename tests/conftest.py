"""Shared fixtures: real databases (SQLite in tmp_path, PostgreSQL in a private cluster).

PostgreSQL is required, never skipped: a run without it fails, so CI cannot
go green while testing half the product.  The suite starts its own cluster
(tests/pgcluster.py) on a free loopback port, unless MAILBOT_TEST_PG names a
server to use instead.  Each test gets its own database, so tests (and
developers running them side by side) never see each other's rows.
"""

from __future__ import annotations

import atexit
import os
import sys
import uuid
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import psycopg
import pytest
from sqlalchemy.engine import Engine

from mailbot import db, parse, pipeline, store
from mailbot.rules import Rules, load_rules
from mailbot.settings import SHIPPED_RULES, SHIPPED_TEMPLATES

from dovecot import dovecot  # noqa: E402,F401 - the private Dovecot fixture (tests/dovecot.py)
from smtpsink import smtp_sink  # noqa: E402,F401 - the relay sink fixture (tests/smtpsink.py)
from pgcluster import start_cluster


def _pg_admin() -> str:
    """MAILBOT_TEST_PG, or the URL of a private cluster started now and stopped when the run ends."""
    if os.environ.get("MAILBOT_TEST_PG"):
        return os.environ["MAILBOT_TEST_PG"]
    cluster = start_cluster()
    atexit.register(cluster.stop)
    return cluster.admin_url


PG_ADMIN = _pg_admin()
BACKENDS = ("sqlite", "postgresql")
CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus"
# The command line, whichever environment runs the tests.
MAILBOT = (sys.executable, "-m", "mailbot")


def create_pg_database() -> str:
    name = f"mailbot_test_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as error:
        pytest.fail(f"PostgreSQL at {PG_ADMIN} is required for the tests and is not reachable: {error}")
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + name


def drop_pg_database(url: str) -> None:
    db.dispose_engines()
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pytest_report_header() -> str:
    return f"postgresql: {PG_ADMIN}"


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty, migrated database URL: SQLite file, then PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'mailbot.db'}"
        db.upgrade(url)
        yield url
        db.dispose_engines()
    else:
        url = create_pg_database()
        db.upgrade(url)
        yield url
        drop_pg_database(url)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    """SQLite only, for tests of logic that does not depend on the database."""
    url = f"sqlite:///{tmp_path / 'mailbot.db'}"
    db.upgrade(url)
    yield url
    db.dispose_engines()


@pytest.fixture
def engine(db_url: str) -> Engine:
    return db.get_engine(db_url)


@pytest.fixture(scope="session")
def rules() -> Rules:
    return load_rules(SHIPPED_RULES)


@pytest.fixture
def exploding_parse(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A stage that fails: parse.parse_mail raises for a mail with Message-ID <boom@example.com>
    until ``exploding_parse.repair()`` puts the real one back."""
    real_parse = parse.parse_mail

    def exploding(raw: bytes) -> parse.ParsedMail:
        if b"<boom@example.com>" in raw:
            raise RuntimeError("stage exploded on purpose")
        return real_parse(raw)

    monkeypatch.setattr(parse, "parse_mail", exploding)
    return SimpleNamespace(repair=lambda: monkeypatch.setattr(parse, "parse_mail", real_parse))


def process_stored(engine: Engine, rules: Rules, raw: bytes, now: datetime | None = None) -> pipeline.Outcome:
    """Store ``raw`` and run the pipeline's stages on it in one transaction, as a worker does
    (without marking it processed); ``now`` is the time the stages see."""
    stored = store.store_raw(engine, raw, origin="cli")
    with db.session(engine) as session:
        return pipeline.run_stages(session, rules, pipeline.Pending(stored.id, None), now or db.utcnow(),
                                   SHIPPED_TEMPLATES)
