from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

from conftest import BACKENDS, create_pg_database, drop_pg_database
from mailbot import db, store
from mailbot.models import ImapSeen, Message


def test_migrations_create_exactly_the_models(db_url):
    """A model changed without its migration would break every existing install."""
    engine = db.get_engine(db_url)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), SQLModel.metadata)
    assert diff == []


def test_upgrade_twice_is_harmless(db_url):
    db.upgrade(db_url)
    db.ping(db.get_engine(db_url))


def test_plain_postgresql_urls_use_psycopg3():
    assert db.normalise_url("postgresql://u@h/d").startswith("postgresql+psycopg://")
    assert db.normalise_url("sqlite:///x.db") == "sqlite:///x.db"


@pytest.fixture(params=BACKENDS)
def url_at_0002(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database as an install before 0003 left it: raw bytes on the message row."""
    url = f"sqlite:///{tmp_path / 'old.db'}" if request.param == "sqlite" else create_pg_database()
    command.upgrade(db.alembic_config(url), "0002")
    yield url
    if request.param == "sqlite":
        db.dispose_engines()
    else:
        drop_pg_database(url)


# The message table of 0001/0002, raw bytes included.
_OLD_MESSAGE = sa.table(
    "message", sa.column("id"), sa.column("sha256"), sa.column("message_id"), sa.column("raw", sa.LargeBinary),
    sa.column("size"), sa.column("origin"), sa.column("received_at", Message.__table__.c.received_at.type),
    sa.column("state"), sa.column("attempts"),
)


def test_upgrade_from_0002_keeps_the_archived_bytes(url_at_0002):
    mails = [b"From: a@example.com\r\n\r\n" + bytes(range(256)) * 1024, "نص\r\n".encode() + b"\x00" * 7]
    engine = db.get_engine(url_at_0002)
    with engine.begin() as connection:
        ids = [
            connection.execute(sa.insert(_OLD_MESSAGE).values(
                sha256=hashlib.sha256(raw).hexdigest(), message_id=f"<{number}@example.com>", raw=raw,
                size=len(raw), origin="imap", received_at=db.utcnow(), state="processed", attempts=0,
            ).returning(_OLD_MESSAGE.c.id)).scalar_one()
            for number, raw in enumerate(mails)
        ]
        connection.execute(sa.insert(ImapSeen.__table__).values(
            mailbox="INBOX", uidvalidity=1, uid=5, message=ids[1], moved=True))
    db.dispose_engines()

    db.upgrade(url_at_0002)

    engine = db.get_engine(url_at_0002)
    with engine.connect() as connection:
        assert [store.read_raw(connection, message) for message in ids] == mails
        assert connection.execute(
            sa.select(Message.__table__.c.id, Message.__table__.c.message_id, Message.__table__.c.state)
            .order_by(Message.__table__.c.id)
        ).all() == [(ids[0], "<0@example.com>", "processed"), (ids[1], "<1@example.com>", "processed")]
        assert connection.execute(sa.select(ImapSeen.__table__.c.message)).scalars().all() == [ids[1]]
        diff = compare_metadata(MigrationContext.configure(connection), SQLModel.metadata)
        if db.is_sqlite(engine):
            assert connection.exec_driver_sql("PRAGMA foreign_key_check").all() == []
    assert diff == []
    # New mail still gets a fresh id after the migration.
    assert store.store_raw(engine, b"Subject: new\r\n\r\nnew\r\n", origin="smtp").id not in ids


def test_downgrade_to_0002_puts_the_bytes_back(db_url):
    raw = b"Subject: back\r\n\r\n" + bytes(range(256)) * 64
    stored = store.store_raw(db.get_engine(db_url), raw, origin="smtp")
    db.dispose_engines()
    command.downgrade(db.alembic_config(db_url), "0002")
    with db.get_engine(db_url).connect() as connection:
        back = connection.execute(sa.select(_OLD_MESSAGE.c.raw).where(_OLD_MESSAGE.c.id == stored.id)).scalar_one()
        assert not sa.inspect(connection).has_table("message_raw")
    assert bytes(back) == raw
