"""The archive: raw bytes saved once, before anything else happens to a mail.

A mail is identified by the sha256 of its bytes, so the same delivery seen
twice (an SMTP client retrying after a lost 250, an IMAP UID fetched again
after a crash) is one row.  Whatever happens later, the bytes stay.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.parser import BytesHeaderParser
from email.policy import compat32

from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine
from sqlmodel import Session

from mailbot import db
from mailbot.models import MESSAGE_STATES, PROCESSED, QUARANTINED, RECEIVED, ImapSeen, IntakeState, Message

log = logging.getLogger(__name__)

# An intake failing this long without a success makes `mailbot status` exit non-zero.
INTAKE_GRACE = timedelta(minutes=10)


@dataclass(frozen=True)
class Stored:
    id: int
    created: bool  # False when these bytes were already in the archive


def header_message_id(raw: bytes) -> str | None:
    """The Message-ID header, read from the header block alone; None when absent or unreadable."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        end = raw.find(b"\n\n")
    head = raw if end < 0 else raw[:end]
    try:
        value = BytesHeaderParser(policy=compat32).parsebytes(head[:256 * 1024]).get("Message-ID")
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
    digest = hashlib.sha256(raw).hexdigest()
    with engine.begin() as connection:
        inserted = connection.execute(
            db.insert_ignoring_duplicates(engine, Message.__table__)
            .values(
                sha256=digest,
                message_id=header_message_id(raw),
                raw=raw,
                size=len(raw),
                origin=origin,
                peer=peer,
                imap_uidvalidity=uidvalidity,
                imap_uid=uid,
                received_at=db.utcnow(),
                state=RECEIVED,
                attempts=0,
            )
            .returning(Message.__table__.c.id)
        ).scalar_one_or_none()
        created = inserted is not None
        message_id = inserted
        if message_id is None:
            message_id = connection.execute(
                select(Message.__table__.c.id).where(Message.__table__.c.sha256 == digest)
            ).scalar_one()
        if mailbox is not None and uidvalidity is not None and uid is not None:
            connection.execute(
                db.insert_ignoring_duplicates(engine, ImapSeen.__table__).values(
                    mailbox=mailbox, uidvalidity=uidvalidity, uid=uid, message=message_id, moved=False
                )
            )
    if created:
        log.info("mail=%s origin=%s size=%s stored", message_id, origin, len(raw))
    else:
        log.info("mail=%s origin=%s duplicate delivery, already stored", message_id, origin)
    return Stored(id=message_id, created=created)


def mark_processed(session: Session, message: int, **fields: object) -> None:
    """Record the pipeline's outcome in the caller's transaction, so the mail is
    processed exactly when what the stages wrote (inquiry, replies) is committed.
    ``fields`` are Message columns (subject, kind, ...)."""
    session.execute(
        update(Message.__table__)
        .where(Message.__table__.c.id == message)
        .values(state=PROCESSED, processed_at=db.utcnow(), reason=None, **fields)
    )


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
