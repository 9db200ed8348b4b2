"""The archive: raw bytes saved once, before anything else happens to a mail.

A mail is identified by the sha256 of its bytes, so the same delivery seen
twice (an SMTP client retrying after a lost 250, an IMAP UID fetched again
after a crash) is one row.  Whatever happens later, the bytes stay.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.parser import BytesHeaderParser
from email.policy import compat32

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session

from mailbot import db
from mailbot.models import (
    MESSAGE_STATES, PROCESSED, QUARANTINED, RECEIVED, ImapSeen, IntakeState, Message, MessageRaw,
)

log = logging.getLogger(__name__)

# An intake failing this long without a success makes `mailbot status` exit non-zero.
INTAKE_GRACE = timedelta(minutes=10)
# A stored mail is normally processed within seconds; one waiting this long means the workers are not working.
PROCESSING_GRACE = timedelta(minutes=10)
_HEAD_BYTES = 256 * 1024  # where the Message-ID is looked for
_CHANGED = "the mail's bytes differed between two reads; not stored"
_raw_table = MessageRaw.__table__
_READ_PIECE = 256 * 1024  # bytes per query when reading a mail from PostgreSQL


@dataclass(frozen=True)
class Stored:
    id: int
    created: bool  # False when these bytes were already in the archive
    size: int


def header_message_id(raw: bytes) -> str | None:
    """The Message-ID header, read from the header block alone; None when absent or unreadable."""
    raw = raw[:_HEAD_BYTES]
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        end = raw.find(b"\n\n")
    head = raw if end < 0 else raw[:end]
    try:
        value = BytesHeaderParser(policy=compat32).parsebytes(head).get("Message-ID")
    except Exception:  # noqa: BLE001 - any header garbage just means "no Message-ID"
        return None
    if value is None:
        return None
    text = str(value).strip().replace("\r", "").replace("\n", "")
    return text[:998] or None


def store_raw(
    engine: Engine,
    raw: bytes,
    *,
    origin: str,
    peer: str | None = None,
    mailbox: str | None = None,
    uidvalidity: int | None = None,
    uid: int | None = None,
) -> Stored:
    """Commit ``raw`` to the archive (once) and return its row id.

    With ``mailbox``/``uidvalidity``/``uid`` the IMAP UID is recorded in the
    same transaction, so after a crash the UID is known exactly when the mail is.
    """
    return store_pieces(engine, lambda: (raw,), origin=origin, peer=peer, mailbox=mailbox,
                        uidvalidity=uidvalidity, uid=uid)


def store_pieces(
    engine: Engine,
    read: Callable[[], Iterable[bytes]],
    *,
    origin: str,
    peer: str | None = None,
    mailbox: str | None = None,
    uidvalidity: int | None = None,
    uid: int | None = None,
) -> Stored:
    """store_raw for a mail given as pieces: ``read()`` yields its bytes in order, and
    is called twice (hashed first, then written), so the whole mail need never be
    in memory at once.  Reading different bytes the second time raises ValueError
    and stores nothing.
    """
    with engine.begin() as connection:
        stored = _store(connection, read, origin=origin, peer=peer, mailbox=mailbox, uidvalidity=uidvalidity, uid=uid)
    _log_stored(stored, origin)
    return stored


def store_fetched(
    engine: Engine, mails: Iterable[tuple[int, bytes]], *, mailbox: str, uidvalidity: int
) -> list[Stored]:
    """Archive IMAP mails, given as (uid, bytes), in ONE transaction, each with its UID.

    The mails of one fetch are committed together (one commit, one hold of SQLite's
    write lock instead of one per mail); none is moved out of the inbox before it.
    """
    with engine.begin() as connection:
        stored = [_store(connection, lambda raw=raw: (raw,), origin="imap", peer=None, mailbox=mailbox,
                         uidvalidity=uidvalidity, uid=uid) for uid, raw in mails]
    for result in stored:
        _log_stored(result, "imap")
    return stored


def _log_stored(stored: Stored, origin: str) -> None:
    if stored.created:
        log.info("mail=%s origin=%s size=%s stored", stored.id, origin, stored.size)
    else:
        log.info("mail=%s origin=%s duplicate delivery, already stored", stored.id, origin)


# Built once, executed with parameters: SQLAlchemy then reuses their compiled form.
_INSERT_RAW = insert(_raw_table)
_INSERT_EMPTY_RAW = insert(_raw_table).values(raw=func.zeroblob(bindparam("size")))
_ID_BY_SHA256 = select(Message.__table__.c.id).where(Message.__table__.c.sha256 == bindparam("sha256"))


def _store(
    connection: Connection,
    read: Callable[[], Iterable[bytes]],
    *,
    origin: str,
    peer: str | None,
    mailbox: str | None,
    uidvalidity: int | None,
    uid: int | None,
) -> Stored:
    digest, size, head, count = _digest(read())
    message_id = connection.execute(
        db.insert_ignoring_duplicates(connection, Message.__table__, Message.__table__.c.id),
        {
            "sha256": digest, "message_id": header_message_id(head), "size": size, "origin": origin,
            "peer": peer, "imap_uidvalidity": uidvalidity, "imap_uid": uid, "received_at": db.utcnow(),
            "state": RECEIVED, "attempts": 0,
        },
    ).scalar_one_or_none()
    created = message_id is not None
    if message_id is None:
        message_id = connection.execute(_ID_BY_SHA256, {"sha256": digest}).scalar_one()
    elif connection.dialect.name == "sqlite":
        # SQLite copies a bound blob twice (the binding, which its statement
        # cache then keeps, and the record): the bytes are written into the
        # row afterwards instead, piece by piece.
        connection.execute(_INSERT_EMPTY_RAW, {"message": message_id, "size": size})
        _write_sqlite_blob(connection, message_id, read(), digest, size)
    elif count > 1:
        _copy_postgres(connection, message_id, read(), digest, size)
    else:
        # One piece (store_raw) is joined as it is, not copied.
        connection.execute(_INSERT_RAW, {"message": message_id, "raw": b"".join(_checked(read(), digest, size))})
    if mailbox is not None and uidvalidity is not None and uid is not None:
        connection.execute(
            db.insert_ignoring_duplicates(connection, ImapSeen.__table__),
            {"mailbox": mailbox, "uidvalidity": uidvalidity, "uid": uid, "message": message_id, "moved": False},
        )
    return Stored(id=message_id, created=created, size=size)


def _digest(pieces: Iterable[bytes]) -> tuple[str, int, bytes, int]:
    """(sha256 hex, size, first _HEAD_BYTES, number of pieces) of the concatenated pieces."""
    digest = hashlib.sha256()
    size = count = 0
    head = b""
    for piece in pieces:
        digest.update(piece)
        size += len(piece)
        count += 1
        if len(head) < _HEAD_BYTES:
            head += piece[: _HEAD_BYTES - len(head)]
    return digest.hexdigest(), size, head, count


def _checked(pieces: Iterable[bytes], digest: str, size: int) -> Iterator[bytes]:
    """The pieces of the second read as they come; ValueError when they are not the bytes the
    first read hashed (too many at once, or another size or sha256 at the end)."""
    check = hashlib.sha256()
    written = 0
    for piece in pieces:
        written += len(piece)
        if written > size:
            raise ValueError(_CHANGED)
        check.update(piece)
        yield piece
    if written != size or check.hexdigest() != digest:
        raise ValueError(_CHANGED)


def _write_sqlite_blob(connection: Connection, row: int, pieces: Iterable[bytes], digest: str, size: int) -> None:
    sqlite = connection.connection.driver_connection
    with sqlite.blobopen(_raw_table.name, "raw", row) as blob:
        for piece in _checked(pieces, digest, size):
            blob.write(piece)


def _copy_postgres(connection: Connection, row: int, pieces: Iterable[bytes], digest: str, size: int) -> None:
    """PostgreSQL: stream a mail that came in pieces into message_raw with COPY, piece by piece
    (bytea as hex text): bound as one parameter, libpq and psycopg held a 25 MB mail several times.
    A ValueError from the check aborts the COPY, and the transaction is rolled back."""
    cursor = connection.connection.driver_connection.cursor()
    with cursor.copy(f"COPY {_raw_table.name} (message, raw) FROM STDIN") as copy:
        copy.write(f"{row}\t\\\\x".encode())  # the field is \x<hex>: COPY text unescapes \\ to \
        for piece in _checked(pieces, digest, size):
            copy.write(piece.hex().encode())
        copy.write(b"\n")


def read_raw(connection: Connection, message: int) -> bytes:
    """The archived bytes of ``message``.  From SQLite straight into one bytes
    object: a SELECT would hold SQLite's copy and Python's at once.  From
    PostgreSQL in pieces: it sends bytea hex-encoded, and libpq and psycopg held
    about six times a 25 MB mail while reading it whole."""
    if connection.dialect.name == "sqlite":
        with connection.connection.driver_connection.blobopen(_raw_table.name, "raw", message, readonly=True) as blob:
            return blob.read()
    row = _raw_table.c.message == message
    size = connection.execute(select(func.octet_length(_raw_table.c.raw)).where(row)).scalar_one()
    # BytesIO grows its buffer in place and getvalue() hands it over without a copy.
    raw = io.BytesIO()
    for offset in range(0, size, _READ_PIECE):
        raw.write(connection.execute(select(func.substring(_raw_table.c.raw, offset + 1, _READ_PIECE)).where(row))
                  .scalar_one())
    return raw.getvalue()


@dataclass(frozen=True)
class Backlog:
    """Stored mail the workers have not processed yet (for `mailbot status`)."""

    waiting: int
    oldest_received_at: datetime | None
    stuck: int  # waiting for longer than PROCESSING_GRACE: the workers are down or cannot keep up


def processing_backlog(engine: Engine, now: datetime, grace: timedelta = PROCESSING_GRACE) -> Backlog:
    table = Message.__table__
    with engine.connect() as connection:
        waiting, oldest, stuck = connection.execute(
            select(func.count(), func.min(table.c.received_at),
                   func.count().filter(table.c.received_at < now - grace))
            .where(table.c.state == RECEIVED)
        ).one()
    return Backlog(waiting=waiting, oldest_received_at=oldest, stuck=stuck)


def mark_processed(session: Session, message: int, **fields: object) -> None:
    """Record the pipeline's outcome in the caller's transaction, so the mail is
    processed exactly when what the stages wrote (inquiry, replies) is committed.
    ``fields`` are Message columns (subject, kind, ...)."""
    session.execute(
        _MARK_PROCESSED, {"message_row": message, "state": PROCESSED, "processed_at": db.utcnow(), "reason": None,
                          **fields}
    )


# Built once (the columns to set come as parameters): this runs for every mail.
_MARK_PROCESSED = update(Message.__table__).where(Message.__table__.c.id == bindparam("message_row"))


def quarantine(engine: Engine, message: int, reason: str) -> None:
    """Keep the mail out of processing, with the reason an operator will read."""
    with engine.begin() as connection:
        connection.execute(
            update(Message.__table__)
            .where(Message.__table__.c.id == message)
            .values(state=QUARANTINED, reason=reason, processed_at=db.utcnow(),
                    attempts=Message.__table__.c.attempts + 1)
        )
    log.warning("mail=%s quarantined: %s", message, reason.splitlines()[0] if reason else "")


def release(engine: Engine, message: int) -> bool:
    """Put a quarantined mail back in the queue; False when it was not quarantined."""
    with engine.begin() as connection:
        result = connection.execute(
            update(Message.__table__)
            .where(Message.__table__.c.id == message, Message.__table__.c.state == QUARANTINED)
            .values(state=RECEIVED)
        )
    return result.rowcount == 1


def count_by_state(engine: Engine) -> dict[str, int]:
    """Every processing state with its count (zero included)."""
    counts = dict.fromkeys(MESSAGE_STATES, 0)
    with engine.connect() as connection:
        rows = connection.execute(
            select(Message.__table__.c.state, func.count()).group_by(Message.__table__.c.state)
        )
        counts.update({state: count for state, count in rows})
    return counts


@dataclass(frozen=True)
class IntakeHealth:
    name: str
    last_ok_at: datetime | None
    last_error_at: datetime | None
    last_error: str | None

    def is_failing(self, now: datetime, grace: timedelta = INTAKE_GRACE) -> bool:
        """Failing now, and no success for ``grace`` (a passing reconnect is not worth a page)."""
        if self.last_error_at is None or (self.last_ok_at is not None and self.last_ok_at >= self.last_error_at):
            return False
        return self.last_ok_at is None or now - self.last_ok_at > grace


def intake_health(engine: Engine) -> list[IntakeHealth]:
    """What each intake (IMAP) last reported, for `mailbot status`."""
    with engine.connect() as connection:
        rows = connection.execute(select(IntakeState.__table__).order_by(IntakeState.__table__.c.name)).all()
    return [IntakeHealth(row.name, row.last_ok_at, row.last_error_at, row.last_error) for row in rows]
