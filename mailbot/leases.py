"""Jobs that one daemon does for all: who holds the IMAP inbox, who runs a period's notifications.

On PostgreSQL several daemons share one database.  A job that must run once — fetching one
inbox, telling citizens of status changes, escalating overdue inquiries — runs under a
session advisory lock named after it: the daemon that gets the lock does the job, the others
skip it (or stand by, for the inbox).  The lock lives as long as the connection that took it,
so when its daemon dies the server drops it and another daemon takes over at its next try.
SQLite has one daemon per file (db.sqlite_lock): there every job is always this daemon's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import text
from sqlalchemy.engine import Engine


def lock_key(name: str) -> int:
    """A stable 63-bit advisory lock key for ``name`` (the same in every daemon and version)."""
    return int.from_bytes(hashlib.sha256(f"mailbot:{name}".encode()).digest()[:8], "big") >> 1


@contextmanager
def held(engine: Engine, name: str) -> Iterator[bool]:
    """True inside the block when this daemon holds the job ``name`` (never waits for it).

    The lock is released when the block ends, or by the server when the connection dies."""
    if engine.dialect.name != "postgresql":
        yield True
        return
    key = lock_key(name)
    with engine.connect() as connection:
        mine = bool(connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar())
        connection.commit()
        try:
            yield mine
        finally:
            if mine and not connection.invalidated:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                connection.commit()
