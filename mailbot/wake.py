"""Wake on work, not on a timer: PostgreSQL LISTEN/NOTIFY on channel ``mailbot``.

Triggers (migration 0006) notify 'mail' when mail is stored or released from quarantine,
'outbox' when an outgoing mail is queued and 'status' when a transaction's status changes -
whoever wrote it, a daemon on another machine or the back-office's own UPDATE.  A listener
thread hands each payload to a callback (a worker's wake event, the daemon's jobs).  Polling
stays as the fallback: a listener that loses its connection says so and connects again, and
until then the timers still run.  SQLite has no listener: one daemon, and its timers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psycopg
from sqlalchemy.engine import make_url

from mailbot import db

log = logging.getLogger(__name__)

CHANNEL = "mailbot"
RECONNECT_SECONDS = 2.0


def _conninfo(url: str) -> str | None:
    parsed = make_url(db.normalise_url(url))
    if parsed.get_backend_name() != "postgresql":
        return None
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def listen(url: str, on_wake: Callable[[str], None], stop: threading.Event, name: str) -> threading.Thread | None:
    """Start a thread that calls ``on_wake(payload)`` for each notification until ``stop``;
    None on SQLite."""
    conninfo = _conninfo(url)
    if conninfo is None:
        return None

    def run() -> None:
        while not stop.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True) as connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    while not stop.is_set():
                        for notice in connection.notifies(timeout=1.0):
                            on_wake(notice.payload)
            except psycopg.Error as error:
                log.warning("%s: not listening for work (polling goes on), again in %.0f s: %s",
                            name, RECONNECT_SECONDS, f"{error.__class__.__name__}: {error}".splitlines()[0])
                stop.wait(RECONNECT_SECONDS)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread
