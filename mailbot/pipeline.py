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
from pathlib import Path
from typing import Callable, Iterator

from sqlalchemy import bindparam, select, text
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session

from mailbot import clerk, db, inquiries, parse, store, transactions
from mailbot.disclose import disclosed
from mailbot.models import QUARANTINED, RECEIVED, Message
from mailbot.route import route
from mailbot.rules import Rules
from mailbot.settings import SHIPPED_TEMPLATES
from mailbot.parse import ParsedMail
from mailbot.understand import Understanding, understand

log = logging.getLogger(__name__)

_table = Message.__table__
# First key of the two-key PostgreSQL advisory lock, so our locks never collide
# with another application's locks on message ids.
_LOCK_SPACE = 0x6D61696C  # "mail"
_CANDIDATES = 20
SUMMARY_HEADERS = ("From", "To", "Cc", "Subject", "Date", "Message-ID")
# What `mailbot quarantine list` shows of a mail.
_SUMMARY_COLUMNS = (
    _table.c.id, _table.c.received_at, _table.c.message_id, _table.c.origin,
    _table.c.size, _table.c.attempts, _table.c.reason,
)


@dataclass(frozen=True)
class Pending:
    """A stored mail taken for processing; its bytes (store.read_raw) are read only to be parsed."""

    id: int
    message_id: str | None


@dataclass(frozen=True)
class Outcome:
    """What the stages found out and did, recorded on the message row and logged."""

    subject: str
    sender: str | None
    sent_date: datetime | None
    kind: str
    language: str
    department: str | None
    rule: str
    action: str
    inquiry: int | None = None
    reply: str | None = None
    reason: str | None = None  # why nothing (more) was sent, for the log line


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


@dataclass(frozen=True)
class Staged:
    """A mail read, understood and routed, with its writes still to do (``act``).

    ``opening`` is set for a new inquiry, composed already: its writes are a few
    inserts, which _process_group commits together with other mails' on SQLite.
    """

    parsed: ParsedMail
    understanding: Understanding
    department: str | None
    rule: str
    act: Callable[[Session], inquiries.Handled]
    opening: inquiries.Opening | None = None


def stage(session: Session, rules: Rules, mail: Pending, now: datetime, templates_dir: Path) -> Staged:
    """parse -> understand -> route/disclose, and for a new inquiry its mails composed: reads only."""
    parsed = parse.parse_mail(store.read_raw(session.connection(), mail.id))
    understanding = understand(parsed, rules)
    if understanding.kind == "clerk_reply":
        def clerk_act(writer: Session) -> inquiries.Handled:
            result = clerk.handle_clerk_reply(writer, mail.id, understanding, rules, now, templates_dir=templates_dir)
            return inquiries.Handled(result.action, result.inquiry, reason="; ".join(result.errors) or None)

        return Staged(parsed, understanding, rules.clerk_department(parsed.sender), "clerk", clerk_act)
    existing = inquiries.followed_inquiry(session, understanding, mail.id)
    known = transactions.known_transactions(session.connection(), understanding.numbers)
    decision = route(understanding, rules, known, existing.department if existing is not None else None)
    shown = disclosed(understanding, rules, known) if existing is None else []
    if inquiries.opens_inquiry(understanding, existing):
        opening = inquiries.plan_opening(session, mail.id, understanding, decision, shown, rules, now,
                                         known=known, templates_dir=templates_dir)
        return Staged(parsed, understanding, decision.department, decision.rule,
                      lambda writer: inquiries.write_opening(writer, opening, now), opening)
    return Staged(parsed, understanding, decision.department, decision.rule,
                  lambda writer: inquiries.handle_understood(writer, mail.id, understanding, decision, shown, rules,
                                                             now, existing=existing, known=known,
                                                             templates_dir=templates_dir))


def finish(session: Session, staged: Staged) -> Outcome:
    """Do a staged mail's writes (inquiry, follow-up, clerk reply, bounce) in ``session``."""
    handled = staged.act(session)
    parsed, understanding = staged.parsed, staged.understanding
    return Outcome(
        subject=parsed.subject, sender=(parsed.sender or "")[:998] or None,
        sent_date=parsed.date, kind=understanding.kind, language=understanding.language,
        department=staged.department, rule=staged.rule, action=handled.action, inquiry=handled.inquiry,
        reply=handled.reply, reason=handled.reason,
    )


def run_stages(session: Session, rules: Rules, mail: Pending, now: datetime, templates_dir: Path) -> Outcome:
    """parse -> understand -> route/disclose -> act (inquiry, follow-up, clerk reply, bounce), in one transaction."""
    return finish(session, stage(session, rules, mail, now, templates_dir))


def describe_error(error: BaseException) -> str:
    """The quarantine reason: ``Class: message`` first, then the traceback."""
    head = f"{error.__class__.__name__}: {error}"
    trace = "".join(traceback.format_exception(error))
    return f"{head}\n\n{trace}"


def process_message(engine: Engine, rules: Rules, mail: Pending, templates_dir: Path = SHIPPED_TEMPLATES) -> bool:
    """Run the stages for one mail; True when processed, False when quarantined.

    What the stages write and the "processed" mark commit together: a crash
    in between leaves the mail "received", and running it again finds the
    inquiry and its reply already there (unique per mail) instead of repeating them.
    """
    try:
        with db.session(engine) as session:
            outcome = _mark(session, mail, run_stages(session, rules, mail, db.utcnow(), templates_dir))
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
    _log(mail, outcome)
    return True


def _mark(session: Session, mail: Pending, outcome: Outcome) -> Outcome:
    store.mark_processed(
        session, mail.id, subject=outcome.subject, sender=outcome.sender, sent_date=outcome.sent_date,
        kind=outcome.kind, language=outcome.language,
    )
    return outcome


def _log(mail: Pending, outcome: Outcome) -> None:
    log.info("message_id=%s mail=%s kind=%s language=%s department=%s rule=%s action=%s inquiry=%s reply=%s%s",
             mail.message_id, mail.id, outcome.kind, outcome.language, outcome.department, outcome.rule,
             outcome.action, outcome.inquiry, outcome.reply, f" reason={outcome.reason}" if outcome.reason else "")


def _process_group(engine: Engine, rules: Rules, mails: list[Pending], templates_dir: Path) -> int:
    """SQLite: process the leading ``mails`` in ONE transaction (group commit); returns how many (>= 1).

    SQLite has one writer, and each commit writes the same index pages again: the
    new inquiries are read, understood and composed first (reads only), then all
    their inserts are committed at once.  The group ends before a mail that is not
    a plain new inquiry (a follow-up, a clerk's mail, a bounce), before a second
    mail from the same sender (its daily limit must see the first acknowledgement)
    and before a mail that fails; such a mail, first in line, is processed alone,
    as process_message does.  When the writes fail, nothing of the group is
    committed and each of its mails is processed on its own, where a failure is
    quarantined with its reason.
    """
    group: list[tuple[Pending, Staged]] = []
    senders: set[str] = set()
    now = db.utcnow()
    outcomes: list[tuple[Pending, Outcome]] | None = None
    try:
        with db.session(engine) as session:
            for mail in mails:
                try:
                    staged = stage(session, rules, mail, now, templates_dir)
                except Exception:  # noqa: BLE001 - processed alone below, and quarantined there
                    break
                if staged.opening is not None and staged.opening.sender not in senders:
                    senders.add(staged.opening.sender)
                    group.append((mail, staged))
                    continue
                if not group:
                    group.append((mail, staged))  # a mail of another kind, first in line: alone
                break
            outcomes = [(mail, _mark(session, mail, finish(session, staged))) for mail, staged in group]
    except Exception as error:  # noqa: BLE001 - each mail again on its own, where a failure is quarantined
        if len(group) > 1:
            log.warning("%s mails processed together were not committed (%s: %s); processing them one by one",
                        len(group), error.__class__.__name__, error)
    if not outcomes:
        alone = [mail for mail, _staged in group] or mails[:1]
        for mail in alone:
            process_message(engine, rules, mail, templates_dir)
        return len(alone)
    for mail, outcome in outcomes:
        _log(mail, outcome)
    return len(outcomes)


def process_pending(engine: Engine, rules: Rules, limit: int | None = None,
                    templates_dir: Path = SHIPPED_TEMPLATES, share: tuple[int, int] = (0, 1)) -> int:
    """Process ``received`` mail in id order, at most ``limit``; returns how many were taken.

    ``share`` (k, n): on SQLite only mail whose id is k modulo n, so n workers
    never take the same mail (see workers.py); on PostgreSQL workers claim any
    mail with an advisory lock, and ``share`` is not needed.  Each mail is tried at most
    once per call, so a mail whose quarantine cannot be written (database
    down) does not spin the worker.
    """
    if db.is_sqlite(engine):
        return _process_share(engine, rules, limit, templates_dir, share)
    done = 0
    after = 0
    while limit is None or done < limit:
        with _claim_next(engine, after) as mail:
            if mail is None:
                break
            after = mail.id
            process_message(engine, rules, mail, templates_dir)
            done += 1
    return done


def _process_share(engine: Engine, rules: Rules, limit: int | None, templates_dir: Path,
                   share: tuple[int, int]) -> int:
    """SQLite: workers split the mail by ``share`` and hold no lock, so the pending
    ids are read a batch at a time (one query, not one per mail), and the batch's
    new inquiries are committed in groups (_process_group)."""
    done = 0
    after = 0
    while limit is None or done < limit:
        wanted = _CANDIDATES if limit is None else min(_CANDIDATES, limit - done)
        with engine.connect() as connection:
            batch = [Pending(id=row.id, message_id=row.message_id) for row in connection.execute(
                _NEXT_IN_SHARE, {"after": after, "count": share[1], "index": share[0], "wanted": wanted}
            )]
        if not batch:
            break
        position = 0
        while position < len(batch):
            position += _process_group(engine, rules, batch[position:], templates_dir)
        done += len(batch)
        after = batch[-1].id
    return done


_NEXT_IN_SHARE = (
    select(_table.c.id, _table.c.message_id)
    .where(_table.c.state == RECEIVED, _table.c.id > bindparam("after"),
           _table.c.id % bindparam("count") == bindparam("index"))
    .order_by(_table.c.id)
    .limit(bindparam("wanted"))
)


@contextmanager
def _claim_next(engine: Engine, after: int) -> Iterator[Pending | None]:
    """PostgreSQL: the next ``received`` mail after id ``after``, held for this worker while the block runs.

    Several workers may run at once.  A row lock (FOR UPDATE SKIP LOCKED)
    would make the store's own update of that row, in its own transaction,
    wait for us forever; so the claim is a transaction-scoped advisory lock on
    the id, taken with try (skip when another worker holds it) and released by
    commit, rollback or a dropped connection alike: a crashed worker's mail
    simply becomes pending again.
    """
    with engine.connect() as connection:
        with connection.begin():
            yield _claim(connection, after)


def _claim(connection: Connection, after: int) -> Pending | None:
    """PostgreSQL: the first pending mail after ``after`` that no other worker holds, locked for us."""
    while True:
        ids = connection.execute(
            select(_table.c.id)
            .where(_table.c.state == RECEIVED, _table.c.id > after)
            .order_by(_table.c.id)
            .limit(_CANDIDATES)
        ).scalars().all()
        if not ids:
            return None
        for candidate in ids:
            if not connection.execute(
                text("SELECT pg_try_advisory_xact_lock(:space, :id)"), {"space": _LOCK_SPACE, "id": candidate}
            ).scalar_one():
                continue
            # Read again under the lock: another worker may have finished it
            # between our SELECT and the lock (READ COMMITTED sees its commit).
            row = connection.execute(
                select(_table.c.id, _table.c.message_id)
                .where(_table.c.id == candidate, _table.c.state == RECEIVED)
            ).one_or_none()
            if row is not None:
                return Pending(id=row.id, message_id=row.message_id)
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
            select(*_SUMMARY_COLUMNS).where(_table.c.id == message, _table.c.state == QUARANTINED)
        ).one_or_none()
        if row is None:
            return None
        raw = store.read_raw(connection, message)
    return replace(_quarantined(row), headers=tuple(summarise_headers(raw)))


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

