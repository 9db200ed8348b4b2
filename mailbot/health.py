"""What the daemons leave for `mailbot status`: heartbeats, and each intake's and the relay's last outcome.

A daemon writes its heartbeat every HEARTBEAT_SECONDS and removes it when it stops
cleanly; a row whose heartbeat is older than ALIVE_WITHIN is a daemon that died.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Connection, Engine

from mailbot import __version__, db
from mailbot.models import Daemon, IntakeState

HEARTBEAT_SECONDS = 10.0
ALIVE_WITHIN = timedelta(seconds=3 * HEARTBEAT_SECONDS + 5)
RELAY = "relay"  # the IntakeState row of the outgoing relay
_DAEMON = Daemon.__table__
_STATE = IntakeState.__table__


@dataclass(frozen=True)
class DaemonSeen:
    id: str  # host:pid
    version: str
    started_at: datetime
    heartbeat_at: datetime

    def is_alive(self, now: datetime) -> bool:
        return now - self.heartbeat_at <= ALIVE_WITHIN


def daemon_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def beat(engine: Engine, started_at: datetime) -> None:
    """Write this daemon's heartbeat (the row is made at the first beat)."""
    me, now = daemon_id(), db.utcnow()
    with engine.begin() as connection:
        connection.execute(db.insert_ignoring_duplicates(engine, _DAEMON).values(
            id=me, version=__version__, started_at=started_at, heartbeat_at=now))
        connection.execute(update(_DAEMON).where(_DAEMON.c.id == me).values(heartbeat_at=now))


def forget(engine: Engine) -> None:
    """A clean stop: this daemon no longer serves the database."""
    with engine.begin() as connection:
        connection.execute(delete(_DAEMON).where(_DAEMON.c.id == daemon_id()))


def daemons(engine: Engine) -> list[DaemonSeen]:
    """Every daemon that left a heartbeat, newest first (dead ones too, until they are forgotten)."""
    with engine.connect() as connection:
        rows = connection.execute(select(_DAEMON).order_by(_DAEMON.c.heartbeat_at.desc())).all()
    return [DaemonSeen(row.id, row.version, row.started_at, row.heartbeat_at) for row in rows]


def record_outcome(engine: Engine, name: str, error: str | None = None) -> None:
    """Note that ``name`` (an intake, the relay) just worked, or failed with ``error``."""
    with engine.connect() as connection:
        note_outcome(connection, name, error)


def note_outcome(connection: Connection, name: str, error: str | None = None) -> None:
    """record_outcome on a connection the caller holds (the outbox's batch), committed at once."""
    values = {"last_ok_at": db.utcnow()} if error is None else {"last_error_at": db.utcnow(), "last_error": error}
    connection.execute(db.insert_ignoring_duplicates(connection.engine, _STATE).values(name=name))
    connection.execute(update(_STATE).where(_STATE.c.name == name).values(**values))
    connection.commit()
