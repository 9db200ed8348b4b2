from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

import mailbot.models  # noqa: F401 - registers tables
from mailbot import db


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
