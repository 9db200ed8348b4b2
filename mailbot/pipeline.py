"""Run the stages for each stored mail; the one place that catches an unexpected error for a mail.

A mail that fails anywhere is quarantined with the error and its traceback,
never dropped, and the worker goes on to the next one.  Operators look at the
quarantine with ``mailbot quarantine list|show`` and put a mail back with
``retry`` once the cause is fixed.
"""

from __future__ import annotations

import logging
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Iterator

from sqlalchemy import select, text
from sqlalchemy.engine import Connection, Engine

from mailbot import parse, store
from mailbot.models import QUARANTINED, RECEIVED, Message
from mailbot.rules import Rules

log = logging.getLogger(__name__)

_table = Message.__table__
# First key of the two-key PostgreSQL advisory lock, so our locks never collide
# with another application's locks on message ids.
_LOCK_SPACE = 0x6D61696C  # "mail"
_CANDIDATES = 20
SUMMARY_HEADERS = ("From", "To", "Cc", "Subject", "Date", "Message-ID")
# Everything but the raw bytes, which can be tens of megabytes per mail.
_SUMMARY_COLUMNS = (
    _table.c.id, _table.c.received_at, _table.c.message_id, _table.c.origin,
    _table.c.size, _table.c.attempts, _table.c.reason,
)


@dataclass(frozen=True)
class Pending:
    """A stored mail taken for processing."""

    id: int
    message_id: str | None
    raw: bytes


@dataclass(frozen=True)
class Outcome:
    """What the stages found out, recorded on the message row."""

    subject: str
    sender: str | None
    sent_date: datetime | None


@dataclass(frozen=True)
class Quarantined:
    id: int
    received_at: datetime
    message_id: str | None
    origin: str
    size: int
    attempts: int
    reason: str
    headers: tuple[tuple[str, str], ...] = ()  # From, Subject, ... (only from find_quarantined)

    @property
    def reason_line(self) -> str:
        return self.reason.splitlines()[0] if self.reason else ""


def run_stages(rules: Rules, raw: bytes) -> Outcome:
    """The stages in order; later issues add understand -> route -> reply here."""
    mail = parse.parse_mail(raw)
    return Outcome(subject=_storable(mail.subject), sender=_storable(mail.sender or "")[:998] or None,
                   sent_date=mail.date)


def _storable(value: str) -> str:
    # PostgreSQL text cannot hold NUL, and broken clients do put it in headers.
    return value.replace("\x00", "")


def describe_error(error: BaseException) -> str:
    """The quarantine reason: ``Class: message`` first, then the traceback."""
    head = f"{error.__class__.__name__}: {error}"
    trace = "".join(traceback.format_exception(error))
    return f"{head}\n\n{trace}"


def process_message(engine: Engine, rules: Rules, mail: Pending) -> bool:
    """Run the stages for one mail; True when processed, False when quarantined."""
    try:
        outcome = run_stages(rules, mail.raw)
        store.mark_processed(
            engine, mail.id, subject=outcome.subject, sender=outcome.sender, sent_date=outcome.sent_date
        )
    except parse.ParseError as error:
        # Expected for junk: the reason (with traceback) is in the quarantine, the log needs one line.
        log.warning("message_id=%s mail=%s unparseable: %s", mail.message_id, mail.id, error)
        store.quarantine(engine, mail.id, describe_error(error))
        return False
    except Exception as error:  # noqa: BLE001 - the mail is kept with the reason, the worker goes on
        log.exception("message_id=%s mail=%s failed: %s: %s", mail.message_id, mail.id,
                      error.__class__.__name__, error)
        store.quarantine(engine, mail.id, describe_error(error))
        return False
    log.info("message_id=%s mail=%s processed", mail.message_id, mail.id)
    return True


def process_pending(engine: Engine, rules: Rules, limit: int | None = None) -> int:
    """Process ``received`` mail in id order, at most ``limit``; returns how many were taken.

    Each mail is tried at most once per call, so a mail whose quarantine cannot
    be written (database down) does not spin the worker.
    """
    done = 0
    after = 0
    while limit is None or done < limit:
        with _claim_next(engine, after) as mail:
            if mail is None:
                break
            after = mail.id
            process_message(engine, rules, mail)
            done += 1
    return done


@contextmanager
def _claim_next(engine: Engine, after: int) -> Iterator[Pending | None]:
    """The next ``received`` mail after id ``after``, held for this worker while the block runs.

    On PostgreSQL several workers may run at once.  A row lock (FOR UPDATE SKIP
    LOCKED) would make the store's own update of that row, in its own
    transaction, wait for us forever; so the claim is a transaction-scoped
    advisory lock on the id, taken with try (skip when another worker holds
    it) and released by commit, rollback or a dropped connection alike: a
    crashed worker's mail simply becomes pending again.  SQLite has one writer
    and the scheduler runs one worker job per process.
    """
    with engine.connect() as connection:
        with connection.begin():
            yield _claim(connection, after)


def _claim(connection: Connection, after: int) -> Pending | None:
    postgres = connection.dialect.name == "postgresql"
    while True:
        ids = connection.execute(
            select(_table.c.id)
            .where(_table.c.state == RECEIVED, _table.c.id > after)
            .order_by(_table.c.id)
            .limit(_CANDIDATES if postgres else 1)
        ).scalars().all()
        if not ids:
            return None
        for candidate in ids:
            if postgres and not connection.execute(
                text("SELECT pg_try_advisory_xact_lock(:space, :id)"), {"space": _LOCK_SPACE, "id": candidate}
            ).scalar_one():
                continue
            # Read again under the lock: another worker may have finished it
            # between our SELECT and the lock (READ COMMITTED sees its commit).
            row = connection.execute(
                select(_table.c.id, _table.c.message_id, _table.c.raw)
                .where(_table.c.id == candidate, _table.c.state == RECEIVED)
            ).one_or_none()
            if row is not None:
                return Pending(id=row.id, message_id=row.message_id, raw=bytes(row.raw))
        after = ids[-1]


def list_quarantined(engine: Engine) -> list[Quarantined]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(*_SUMMARY_COLUMNS).where(_table.c.state == QUARANTINED).order_by(_table.c.id)
        ).all()
    return [_quarantined(row) for row in rows]


def find_quarantined(engine: Engine, message: int) -> Quarantined | None:
    """One quarantined mail with its header summary; None when ``message`` is not in quarantine."""
    with engine.connect() as connection:
        row = connection.execute(
            select(*_SUMMARY_COLUMNS, _table.c.raw).where(_table.c.id == message, _table.c.state == QUARANTINED)
        ).one_or_none()
    if row is None:
        return None
    return replace(_quarantined(row), headers=tuple(summarise_headers(bytes(row.raw))))


def _quarantined(row) -> Quarantined:  # noqa: ANN001 - SQLAlchemy Row
    return Quarantined(
        id=row.id,
        received_at=row.received_at,
        message_id=row.message_id,
        origin=row.origin,
        size=row.size,
        attempts=row.attempts,
        reason=row.reason or "",
    )


def summarise_headers(raw: bytes) -> list[tuple[str, str]]:
    """The headers people recognise a mail by, decoded; empty when the bytes have none."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        end = raw.find(b"\n\n")
    head = raw if end < 0 else raw[:end]
    headers = BytesHeaderParser(policy=compat32).parsebytes(head[: 256 * 1024])
    # raw_items keeps 8-bit header bytes as surrogate escapes, which
    # parse.decode_header turns into text with its charset fallbacks.
    first: dict[str, str] = {}
    for name, value in headers.raw_items():
        first.setdefault(name.lower(), value)
    return [(name, parse.decode_header(first[name.lower()])) for name in SUMMARY_HEADERS if name.lower() in first]


def retry_quarantined(engine: Engine, messages: list[int] | None = None) -> list[int]:
    """Put quarantined mail back in the queue (all when ``messages`` is None); returns the ids released."""
    if messages is None:
        messages = [mail.id for mail in list_quarantined(engine)]
    released = [message for message in messages if store.release(engine, message)]
    for message in released:
        log.info("mail=%s released from quarantine", message)
    return released

