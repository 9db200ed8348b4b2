"""The durable outbox: every outgoing mail is a row first, sent later, never lost.

Stable API:

``enqueue(session, mail, *, key, inquiry, now=None) -> bool``
    Adds the mail inside the CALLER's transaction (commit it together with the
    decision that caused the mail).  ``key`` names what the mail answers
    (``ack:<message row id>``, ``status:<number>:<history id>:<email>`` ...);
    it is unique, so the same decision taken twice sends once: False then.
``send_due(engine, settings, limit=50) -> int``
    The job: sends what is due through the relay (``settings.smtp_host``) or,
    with no relay, into the Maildir ``settings.sent_maildir``.  Returns how many
    were accepted.
``auto_reply_blocked(session, address, rules, now) -> str | None``
    Why no acknowledgement may go to ``address`` now (daily limit reached), or
    None.  An undeliverable mark never blocks one: the citizen just wrote, and
    writing clears the mark (``clear_undeliverable``).
``mark_undeliverable(session, address, reason, now)``, ``clear_undeliverable(session, address)``:
    a bounce of ours marks an address; the mark counts for ``UNDELIVERABLE_DAYS``
    (``marked_since``) or until the citizen writes again.
``list_outbox(engine, state=None, limit=100)``,
``retry(engine, outbox_ids=None) -> int`` (failed -> pending; None: every failed mail), ``count_by_state(engine)``.

Sending is at-least-once made as close to exactly-once as SMTP allows: the
attempt is committed (state ``sending``) before the relay sees the mail, and
``sent`` only after the relay's 250.  A row left in ``sending`` by a crash is
sent again, with the same bytes and so the same Message-ID (the relay or the
citizen's client can drop the duplicate): at once when the crashed sender ran
on this host, else when its lease has passed.  Connection, TLS and login
failures are always temporary; only the relay refusing the mail itself (5xx
to MAIL/RCPT/DATA) fails it for good, until ``mailbot outbox retry``.
"""

from __future__ import annotations

import logging
import mailbox
import os
import random
import re
import smtplib
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.parser import BytesHeaderParser
from email.policy import default
from email.utils import parseaddr
from functools import lru_cache
from typing import Iterable

from sqlalchemy import bindparam, delete, func, select, update
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session

from mailbot import db, health, verp
from mailbot.models import Outbox, Undeliverable
from mailbot.reply import OutgoingMail
from mailbot.rules import Rules
from mailbot.settings import Settings

log = logging.getLogger(__name__)

PENDING, SENDING, SENT, FAILED = "pending", "sending", "sent", "failed"
STATES = (PENDING, SENDING, SENT, FAILED)
# Templates sent without a person deciding: these count against the daily limit.
AUTOMATIC = ("ack_status", "ack_unverified", "ack_no_number", "status_changed")
LEASE = timedelta(seconds=90)  # longer than one SMTP transaction can take (timeout 30 s)
UNDELIVERABLE_DAYS = 30  # a mailbox full or gone a month ago may well work again
BACKOFF_FIRST = 30.0
BACKOFF_MAX = 3600.0
SMTP_TIMEOUT = 30.0
_table = Outbox.__table__
_undeliverable = Undeliverable.__table__
# The first From field of a head, continuation lines included.
_FROM = re.compile(rb"^From:[^\r\n]*(?:\r\n[ \t][^\r\n]*)*", re.MULTILINE | re.IGNORECASE)


@dataclass(frozen=True)
class OutboxEntry:
    id: int
    key: str
    template: str
    recipient: str
    message_id: str
    state: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime
    sent_at: datetime | None


class PermanentError(Exception):
    """The relay refused for good (5xx)."""


class TemporaryError(Exception):
    """Try again later: 4xx, connection trouble."""


def enqueue(
    session: Session, mail: OutgoingMail, *, key: str, inquiry: int | None, now: datetime | None = None
) -> bool:
    """Insert the mail in the caller's transaction; False when ``key`` was already queued.

    ``now`` (default: the clock) is its created_at, which the daily limit counts from.
    """
    now = now or db.utcnow()
    statement = db.insert_ignoring_duplicates(session.get_bind(), _table, _table.c.id)
    values = {
        "key": key[:255], "inquiry": inquiry, "template": mail.template, "recipient": mail.recipient.lower(),
        "message_id": mail.message_id, "raw": mail.raw, "state": PENDING, "attempts": 0,
        "next_attempt_at": now, "created_at": now,
    }
    created = session.execute(statement, values).scalar_one_or_none() is not None
    if created:
        log.info("outbox key=%s template=%s message_id=%s queued", key, mail.template, mail.message_id)
    else:
        log.info("outbox key=%s already queued, not again", key)
    return created

# Built once: this runs for every mail that may be answered.
_AUTO_REPLY_CHECK = select(
    select(func.count())
    .select_from(_table)
    .where(
        _table.c.recipient == bindparam("address"),
        _table.c.template.in_(AUTOMATIC),
        _table.c.created_at > bindparam("since"),
    )
    .scalar_subquery(),
)

def auto_reply_blocked(session: Session, address: str, rules: Rules, now: datetime) -> str | None:
    address = address.strip().lower()
    sent_today = session.execute(_AUTO_REPLY_CHECK, {"address": address, "since": now - timedelta(days=1)}).scalar_one()
    if sent_today >= rules.policy.max_auto_replies_per_day:
        return f"daily limit of {rules.policy.max_auto_replies_per_day} automatic replies reached"
    return None


def mark_undeliverable(session: Session, address: str, reason: str, now: datetime) -> None:
    address = address.strip().lower()
    existing = session.get(Undeliverable, address)
    if existing is None:
        session.add(Undeliverable(email=address, reason=reason, at=now))
    else:
        existing.reason, existing.at = reason, now


def clear_undeliverable(session: Session, address: str) -> bool:
    """The address wrote to us: it works, whatever bounced before.  True when a mark was removed."""
    removed = session.execute(delete(_undeliverable).where(_undeliverable.c.email == address.strip().lower()))
    return bool(removed.rowcount)


def marked_since(now: datetime) -> datetime:
    """Marks set after this time still count (``UNDELIVERABLE_DAYS``)."""
    return now - timedelta(days=UNDELIVERABLE_DAYS)


def backoff(attempts: int) -> float:
    """Seconds until the next try: exponential, capped, with full jitter (no thundering herd)."""
    ceiling = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(attempts - 1, 0))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _is_dead_here(owner: str | None) -> bool:
    """True when ``owner`` is a process on this host that no longer runs (it crashed mid-send)."""
    host, _, pid = (owner or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


# The next due mails, oldest first: read from ix_outbox_due alone, however many wait.
_DUE = (
    select(_table.c.id)
    .where(_table.c.state == PENDING, _table.c.next_attempt_at <= bindparam("now"))
    .order_by(_table.c.next_attempt_at, _table.c.id)
    .limit(bindparam("limit"))
)
# Mails some sender left in ``sending``: the few of a batch in flight, or of a crash.
_IN_FLIGHT = select(_table.c.id, _table.c.next_attempt_at, _table.c.lease_owner).where(
    _table.c.state == SENDING,
    (_table.c.next_attempt_at <= bindparam("now")) | _table.c.lease_owner.like(bindparam("this_host")),
)


def _claim(engine: Engine, limit: int, now: datetime) -> list[tuple[int, str, bytes, int]]:
    """Mark due rows ``sending`` (attempts+1) and commit, before any byte goes out.

    A row already ``sending`` is taken over when its lease has passed, or at once
    when the process holding it was on this host and is gone.  One UPDATE claims
    the batch; its WHERE repeats the conditions, so of two workers only one wins a row.
    """
    with engine.connect() as connection:
        stale = [
            row for row in connection.execute(_IN_FLIGHT, {"now": now, "this_host": f"{socket.gethostname()}:%"})
            if row.next_attempt_at <= now or _is_dead_here(row.lease_owner)
        ][:limit]
        pending = list(connection.execute(_DUE, {"now": now, "limit": limit - len(stale)}).scalars())
    if not pending and not stale:
        return []
    taken = (_table.c.id.in_(pending) & (_table.c.state == PENDING) & (_table.c.next_attempt_at <= now))
    for row in stale:
        taken |= (_table.c.id == row.id) & (_table.c.state == SENDING) & (
            _table.c.next_attempt_at == row.next_attempt_at)
    with engine.begin() as connection:
        claimed = connection.execute(
            update(_table)
            .where(taken)
            .values(state=SENDING, attempts=_table.c.attempts + 1, next_attempt_at=now + LEASE, lease_owner=_owner())
            .returning(_table.c.id, _table.c.recipient, _table.c.raw, _table.c.attempts)
        ).all()
    won = {row.id for row in claimed}
    for row in stale:
        if row.id in won:
            log.warning("outbox=%s left sending by %s; sending again with the same Message-ID",
                        row.id, row.lease_owner)
    return sorted((row.id, row.recipient, row.raw, row.attempts) for row in claimed)


# The columns to set come as parameters with the id: one statement for every outcome.
_FINISH = update(_table).where(_table.c.id == bindparam("outbox_id"), _table.c.state == SENDING)


def _finish(connection: Connection, outbox_id: int, **values: object) -> None:
    """Record one mail's outcome at once, in its own commit: a crash right after the relay's
    250 may send that one mail again, never the batch.  A batch keeps one ``connection``
    for these commits instead of taking one from the pool for each mail."""
    connection.execute(_FINISH, {"outbox_id": outbox_id, **values})
    connection.commit()


def _connect(settings: Settings) -> smtplib.SMTP:
    assert settings.smtp_host
    if settings.smtp_tls == "ssl":
        smtp: smtplib.SMTP = smtplib.SMTP_SSL(
            settings.smtp_host, settings.smtp_port, timeout=SMTP_TIMEOUT, context=ssl.create_default_context()
        )
    else:
        smtp = smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=SMTP_TIMEOUT)
    try:
        if settings.smtp_tls == "starttls":
            smtp.starttls(context=ssl.create_default_context())
        if settings.smtp_user:
            smtp.login(settings.smtp_user, settings.smtp_password or "")
    except BaseException:
        smtp.close()
        raise
    return smtp


def _smtp_error(error: Exception) -> Exception:
    """Sort an smtplib error into permanent (5xx) or temporary, keeping the server's answer."""
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        code, answer = next(iter(error.recipients.values()))
    elif isinstance(error, smtplib.SMTPResponseException):
        code, answer = error.smtp_code, error.smtp_error
    else:
        return TemporaryError(f"{error.__class__.__name__}: {error}")
    text = answer.decode("utf-8", "replace") if isinstance(answer, bytes) else str(answer)
    message = f"{code} {text}"
    return PermanentError(message) if 500 <= code < 600 else TemporaryError(message)


def _deliver_smtp(settings: Settings, senders: dict[int, str], batch: list[tuple[int, str, bytes, int]],
                  engine: Engine) -> int:
    with engine.connect() as connection:
        return _send_batch(settings, senders, batch, connection)


def _send_batch(settings: Settings, senders: dict[int, str], batch: list[tuple[int, str, bytes, int]],
                connection: Connection) -> int:
    sent = 0
    try:
        smtp = _connect(settings)
    except OSError as error:
        # Connection, TLS or login trouble is the relay's or the settings', never the mail's:
        # always temporary, even a 535, so the mail goes once the operator fixes it.
        for outbox_id, _recipient, _raw, attempts in batch:
            _record_failure(connection, outbox_id, attempts, TemporaryError(str(_smtp_error(error))))
        health.note_outcome(connection, health.RELAY, str(_smtp_error(error)))
        return 0
    with smtp:
        for position, (outbox_id, recipient, raw, attempts) in enumerate(batch):
            try:
                smtp.sendmail(senders[outbox_id], [recipient], raw)
            except UnicodeError as error:  # a non-ASCII address the relay was not offered SMTPUTF8 for
                _record_failure(connection, outbox_id, attempts, PermanentError(f"{error.__class__.__name__}: {error}"))
                continue
            except OSError as error:  # smtplib.SMTPException is an OSError too
                _record_failure(connection, outbox_id, attempts, _smtp_error(error))
                try:
                    if isinstance(error, smtplib.SMTPServerDisconnected) or not isinstance(error, smtplib.SMTPException):
                        raise error
                    smtp.rset()
                except OSError as gone:
                    # The connection is gone: the rest of the batch is tried again later.
                    for other_id, _recipient, _raw, other_attempts in batch[position + 1:]:
                        _record_failure(connection, other_id, other_attempts, _smtp_error(gone))
                    health.note_outcome(connection, health.RELAY, str(_smtp_error(gone)))
                    return sent
                continue
            _finish(connection, outbox_id, state=SENT, sent_at=db.utcnow(), last_error=None)
            log.info("outbox=%s recipient=%s sent via %s", outbox_id, recipient, settings.smtp_host)
            sent += 1
    if sent:
        health.note_outcome(connection, health.RELAY)
    return sent


def _deliver_maildir(settings: Settings, batch: list[tuple[int, str, bytes, int]], engine: Engine) -> int:
    folder = mailbox.Maildir(settings.sent_maildir, create=True)
    with engine.connect() as connection:
        return _store_batch(settings, folder, batch, connection)


def _store_batch(settings: Settings, folder: mailbox.Maildir, batch: list[tuple[int, str, bytes, int]],
                 connection: Connection) -> int:
    sent = 0
    for outbox_id, recipient, raw, attempts in batch:
        try:
            folder.add(raw)
        except OSError as error:
            _record_failure(connection, outbox_id, attempts, TemporaryError(f"{error.__class__.__name__}: {error}"))
            continue
        _finish(connection, outbox_id, state=SENT, sent_at=db.utcnow(), last_error=None)
        log.info("outbox=%s recipient=%s delivered to maildir %s", outbox_id, recipient, settings.sent_maildir)
        sent += 1
    return sent


def _record_failure(connection: Connection, outbox_id: int, attempts: int, error: Exception) -> None:
    if isinstance(error, PermanentError):
        _finish(connection, outbox_id, state=FAILED, last_error=str(error))
        log.error("outbox=%s failed for good: %s", outbox_id, error)
        return
    delay = backoff(attempts)
    _finish(
        connection,
        outbox_id,
        state=PENDING,
        last_error=str(error),
        next_attempt_at=db.utcnow() + timedelta(seconds=delay),
    )
    log.warning("outbox=%s attempt=%s temporary failure, retry in %.0fs: %s", outbox_id, attempts, delay, error)


def send_due(engine: Engine, settings: Settings, limit: int = 50, *, sender: str | None = None) -> int:
    """Send what is due; the envelope sender is ``sender`` (default: each mail's own VERP
    return path at its From domain, verp.py, so that a bounce names the mail it is about)."""
    batch = _claim(engine, limit, db.utcnow())
    if not batch:
        return 0
    if settings.smtp_host:
        key = verp.secret_key(engine)
        senders = {item[0]: sender or _envelope_sender(item[0], item[2], key) for item in batch}
        chunks = [batch[start::settings.smtp_connections]
                  for start in range(min(settings.smtp_connections, len(batch)))]
        if len(chunks) == 1:
            return _deliver_smtp(settings, senders, chunks[0], engine)
        with ThreadPoolExecutor(max_workers=settings.smtp_connections) as pool:
            return sum(pool.map(lambda chunk: _deliver_smtp(settings, senders, chunk, engine), chunks))
    return _deliver_maildir(settings, batch, engine)


def _envelope_sender(outbox_id: int, raw: bytes, key: bytes) -> str:
    # Not "<>": bounces must come back to the office, to the return path of this one mail,
    # where they mark its recipient undeliverable (and nothing else can).
    head = raw.split(b"\r\n\r\n", 1)[0]
    found = _FROM.search(head)
    address = _from_address(found.group(0) if found else b"")
    domain = address.rpartition("@")[2]
    return verp.return_path(outbox_id, domain, key) if domain else address


@lru_cache(maxsize=64)  # every mail has one of the office's few From lines: parse each once
def _from_address(header: bytes) -> str:
    return parseaddr(str(BytesHeaderParser(policy=default).parsebytes(header).get("From", "")))[1]


def _entry(row: Outbox) -> OutboxEntry:
    return OutboxEntry(
        id=row.id, key=row.key, template=row.template, recipient=row.recipient, message_id=row.message_id,
        state=row.state, attempts=row.attempts, next_attempt_at=row.next_attempt_at, last_error=row.last_error,
        created_at=row.created_at, sent_at=row.sent_at,
    )


def list_outbox(engine: Engine, state: str | None = None, limit: int = 100) -> list[OutboxEntry]:
    with db.session(engine) as session:
        query = select(Outbox).order_by(Outbox.id.desc()).limit(limit)
        if state:
            query = query.where(Outbox.state == state)
        return [_entry(row) for row in session.execute(query).scalars()]


def retry(engine: Engine, outbox_ids: Iterable[int] | None = None) -> int:
    """Failed mail back to pending, due now; ``None`` means every failed row.  Returns the count."""
    condition = _table.c.state == FAILED
    if outbox_ids is not None:
        condition = condition & _table.c.id.in_(list(outbox_ids))
    with engine.begin() as connection:
        result = connection.execute(
            update(_table).where(condition).values(state=PENDING, next_attempt_at=db.utcnow())
        )
    return result.rowcount


def count_by_state(engine: Engine) -> dict[str, int]:
    counts = dict.fromkeys(STATES, 0)
    with engine.connect() as connection:
        rows = connection.execute(select(_table.c.state, func.count()).group_by(_table.c.state))
        counts.update({state: count for state, count in rows})
    return counts

