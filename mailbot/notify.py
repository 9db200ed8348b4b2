"""Tell citizens of status changes, let them say stop, and escalate inquiries past their SLA.

A change is noticed by comparing ``transaction.status`` with the status each
subscriber was last told (``subscription.last_status``), never by hooking the
code that changed it: a CSV import, a clerk's ``#status``, the CLI and another
system's plain ``UPDATE`` are all seen the same way.  The notification is
queued in the same database transaction that records it as told, so a crash
leaves either both or neither.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Iterable

from sqlalchemy import bindparam, exists, func, select, update
from sqlalchemy.engine import Engine, Row
from sqlmodel import Session

from mailbot import db, outbox, reply
from mailbot.models import Inquiry, InquiryEvent, Message, Outbox, Subscription, Transaction, TransactionHistory, Undeliverable
from mailbot.rules import Rules
from mailbot.settings import SHIPPED_TEMPLATES, Settings
from mailbot.text import normalize_arabic

log = logging.getLogger(__name__)

STAFF_LANGUAGE = "ar"  # mail to the office's own people (queues, escalation heads)
MAX_LEVEL = 2  # level 1 at the SLA, level 2 at twice the SLA
_subscriptions = Subscription.__table__
_transactions = Transaction.__table__
_history = TransactionHistory.__table__
_inquiries = Inquiry.__table__
_messages = Message.__table__
_outbox = Outbox.__table__

_NOT_WORD = re.compile(r"[^\w\s]|_")


def _normalise(line: str) -> str:
    return " ".join(_NOT_WORD.sub(" ", normalize_arabic(line.casefold())).split())


STOP_WORDS = frozenset(_normalise(w) for w in (
    "stop", "unsubscribe", "stop notifications", "stop all", "stop all notifications",
    "إيقاف", "إيقاف التنبيهات", "إيقاف الإشعارات", "أوقف", "أوقف التنبيهات", "أوقف الإشعارات",
    "توقف", "إلغاء الاشتراك", "الغاء الاشتراك",
))
START_WORDS = frozenset(_normalise(w) for w in (
    "start", "subscribe", "resume", "unstop", "start notifications",
    "تفعيل", "تفعيل التنبيهات", "تفعيل الإشعارات", "اشتراك", "إعادة الاشتراك", "استئناف",
))
_WORD_LINES = 3  # a stop word counts only near the top, where a reply's own words are


def read_subscription_word(new_text: str) -> str | None:
    """``"stop"`` or ``"start"`` when one of the first lines is only a stop or start word, else None.

    Whole lines only: "please don't stop working on my case" is not a stop.
    """
    lines = [_normalise(line) for line in new_text.splitlines()]
    for line in [line for line in lines if line][:_WORD_LINES]:
        if line in STOP_WORDS:
            return "stop"
        if line in START_WORDS:
            return "start"
    return None


def inquiry_numbers(transactions: str) -> list[str]:
    """The transaction numbers stored on an inquiry (space or comma separated), in order."""
    return [number for number in re.split(r"[\s,]+", transactions or "") if number]


def set_subscriptions_active(session: Session, inquiry: int, email: str, active: bool) -> int:
    """(De)activate ``email``'s subscriptions to the inquiry's transactions; returns how many rows."""
    row = session.get(Inquiry, inquiry)
    numbers = inquiry_numbers(row.transactions) if row is not None else []
    result = session.execute(
        update(_subscriptions)
        .where(
            func.lower(_subscriptions.c.email) == email.strip().lower(),
            _subscriptions.c.number.in_(numbers) | (_subscriptions.c.inquiry == inquiry),
        )
        .values(active=active)
    )
    log.info("inquiry=%s email=%s subscriptions=%s active=%s", inquiry, email, result.rowcount, active)
    return result.rowcount


def apply_subscription_words(session: Session, inquiry: int, sender: str, new_text: str) -> str | None:
    """For a followup: act on a stop/start word in its new text.  Returns the word acted on, or None."""
    word = read_subscription_word(new_text)
    if word is not None:
        set_subscriptions_active(session, inquiry, sender, active=word == "start")
    return word


def subscribe(session: Session, number: str, email: str, language: str, inquiry: int | None) -> None:
    """Record that ``email`` was told ``number``'s current status (call when an ack_status is written).

    An existing subscription keeps its active flag: a citizen who said stop
    stays stopped until they say start.
    """
    email = email.strip().lower()
    status = session.execute(
        select(_transactions.c.status).where(_transactions.c.number == number)
    ).scalar_one_or_none()
    if status is None:
        log.warning("number=%s email=%s not subscribed: no such transaction on file", number, email)
        return
    existing = session.execute(
        select(_subscriptions.c.id).where(_subscriptions.c.number == number, _subscriptions.c.email == email)
    ).scalar_one_or_none()
    if existing is None:
        session.execute(
            db.insert_ignoring_duplicates(session.get_bind(), _subscriptions).values(
                number=number, email=email, language=language, inquiry=inquiry, active=True,
                last_status=status, changes_told=0, created_at=db.utcnow(),
            )
        )
    else:
        session.execute(
            update(_subscriptions)
            .where(_subscriptions.c.id == existing)
            .values(last_status=status, language=language, inquiry=inquiry)
        )


# The note of the change the subscriber is told of ("please send a copy of the deed"): the
# newest history row of the number, when it is that very change — from the status the
# subscriber last heard to the status the record has now.  An outside UPDATE writes no
# history, and an older row's note must never pass for a later change's.
_newest = (select(func.max(_history.c.id)).where(_history.c.number == _transactions.c.number)
           .correlate(_transactions).scalar_subquery())
_NOTE = (select(_history.c.note)
         .where(_history.c.id == _newest, _history.c.status == _transactions.c.status,
                _history.c.previous_status == _subscriptions.c.last_status)
         .correlate(_transactions, _subscriptions).scalar_subquery().label("note"))


def _changed(engine: Engine, after: int, limit: int, now: datetime) -> list[Row]:
    marks = Undeliverable.__table__
    undeliverable = exists().where(marks.c.email == _subscriptions.c.email, marks.c.at > outbox.marked_since(now))
    with engine.connect() as connection:
        return connection.execute(
            select(
                _subscriptions.c.id, _subscriptions.c.number, _subscriptions.c.email, _subscriptions.c.language,
                _subscriptions.c.inquiry, _subscriptions.c.last_status, _subscriptions.c.changes_told,
                _transactions.c.status, _transactions.c.department, _transactions.c.updated_at,
                _transactions.c.applicant_emails, _inquiries.c.sender, _inquiries.c.sender_name, _messages.c.message_id,
                _NOTE,
            )
            .select_from(
                _subscriptions.join(_transactions, _transactions.c.number == _subscriptions.c.number)
                .join(_inquiries, _inquiries.c.id == _subscriptions.c.inquiry)
                .join(_messages, _messages.c.id == _inquiries.c.message)
            )
            .where(
                _subscriptions.c.id > after,
                _subscriptions.c.active.is_(True),
                _subscriptions.c.last_status != _transactions.c.status,
                ~undeliverable,
            )
            .order_by(_subscriptions.c.id)
            .limit(limit)
        ).all()


def _automatic_today(session: Session, recipients: Iterable[str], now: datetime) -> dict[str, int]:
    rows = session.execute(
        select(_outbox.c.recipient, func.count())
        .where(
            _outbox.c.recipient.in_(sorted(set(recipients))),
            _outbox.c.template.in_(outbox.AUTOMATIC),
            _outbox.c.created_at > now - timedelta(days=1),
        )
        .group_by(_outbox.c.recipient)
    )
    return {recipient: count for recipient, count in rows}


def _status_mail(row: Row, rules: Rules, templates_dir: Path, now: datetime) -> reply.OutgoingMail:
    language = row.language if row.language in reply.LANGUAGES else STAFF_LANGUAGE
    changed = {"number": row.number, "status": row.status, "updated_at": row.updated_at}
    context = {
        "now": now,
        "name": row.sender_name if row.email == (row.sender or "").lower() else None,
        "department": row.department if row.department in {d.id for d in rules.departments} else None,
        "transactions": [changed],
        "number": row.number,
        "old_status": row.last_status,
        "new_status": row.status,
        "changed_at": row.updated_at,
        "note": row.note,
    }
    return reply.compose(
        "status_changed", language, context, rules, templates_dir,
        inquiry=row.inquiry, recipient=row.email, in_reply_to=row.message_id,
        auto_submitted=reply.AUTO_GENERATED,
    )


_TELL = (
    update(_subscriptions)
    .where(_subscriptions.c.id == bindparam("b_id"))
    .values(last_status=bindparam("b_status"), changes_told=bindparam("b_told"))
)


def _outbox_row(mail: reply.OutgoingMail, key: str, inquiry: int) -> dict[str, object]:
    """The columns ``outbox.enqueue`` writes, for one multi-row INSERT per batch."""
    created = db.utcnow()
    return {"key": key[:255], "inquiry": inquiry, "template": mail.template, "recipient": mail.recipient.lower(),
            "message_id": mail.message_id, "raw": mail.raw, "state": outbox.PENDING, "attempts": 0,
            "next_attempt_at": created, "created_at": created}


def _tell_batch(session: Session, rows: list[Row], rules: Rules, templates_dir: Path, now: datetime) -> int:
    """Queue the batch's notifications and record them told, in the session's one transaction."""
    sent_today = _automatic_today(session, (row.email for row in rows), now)
    told: list[dict[str, object]] = []
    mails: list[dict[str, object]] = []
    for row in rows:
        if not is_on_record(row.email, row.applicant_emails) and not rules.policy.notify_subscribers_off_record:
            # Passed over, not told: the change is recorded as seen, so it is not read again.
            log.info("number=%s email=%s change not told: not an applicant on the record", row.number, row.email)
            told.append({"b_id": row.id, "b_status": row.status, "b_told": row.changes_told})
            continue
        if sent_today.get(row.email, 0) >= rules.policy.max_auto_replies_per_day:
            log.info("number=%s email=%s change deferred: daily limit reached", row.number, row.email)
            continue
        try:
            mail = _status_mail(row, rules, templates_dir, now)
        except reply.ReplyError as error:
            # One unusable address must not hold up everyone after it, run after run.
            log.warning("number=%s email=%s subscription stopped: %s", row.number, row.email, error)
            session.execute(update(_subscriptions).where(_subscriptions.c.id == row.id).values(active=False))
            continue
        sent_today[row.email] = sent_today.get(row.email, 0) + 1
        told.append({"b_id": row.id, "b_status": row.status, "b_told": row.changes_told + 1})
        # The key names the change (number, subscriber, status, how many told before), so a
        # concurrent run computing the same change inserts nothing: never told twice.
        key = f"status:{row.number}:{row.email}:{row.status}:{row.changes_told + 1}"
        mails.append(_outbox_row(mail, key, row.inquiry))
    if not told:
        return 0
    session.execute(_TELL, told)
    if not mails:
        return 0
    inserted = session.execute(
        db.insert_ignoring_duplicates(session.get_bind(), _outbox).returning(_outbox.c.id), mails
    ).all()
    return len(inserted)


def to_be_told(engine: Engine, number: str, rules: Rules) -> list[str]:
    """Who the status job will tell of ``number``'s current status: its active subscribers on
    the record (all of them with ``notify_subscribers_off_record``) not marked undeliverable."""
    marks = Undeliverable.__table__
    undeliverable = exists().where(marks.c.email == _subscriptions.c.email, marks.c.at > outbox.marked_since(db.utcnow()))
    with engine.connect() as connection:
        rows = connection.execute(
            select(_subscriptions.c.email, _transactions.c.applicant_emails)
            .join(_transactions, _transactions.c.number == _subscriptions.c.number)
            .where(_subscriptions.c.number == number, _subscriptions.c.active.is_(True),
                   _subscriptions.c.last_status != _transactions.c.status, ~undeliverable)
        ).all()
    return sorted({row.email for row in rows
                   if is_on_record(row.email, row.applicant_emails) or rules.policy.notify_subscribers_off_record})


def is_on_record(email: str, applicant_emails: str | None) -> bool:
    """True when ``email`` is one of the transaction's applicant e-mails now (back-office record)."""
    return email.strip().lower() in (applicant_emails or "").lower().split()


def notify_status_changes(
    engine: Engine, rules: Rules, settings: Settings, *, now: datetime | None = None, batch: int = 500
) -> int:
    """The job: queue one ``status_changed`` per subscriber per change.  Returns how many were queued.

    Notifications follow the record: a subscriber is told only while an applicant e-mail
    of the transaction as the back office has it at the change (``policy.
    notify_subscribers_off_record`` lets others be told too); a removed applicant is not.

    A subscriber at the daily limit of automatic mail is not told yet; the
    change stays untold and goes out on a later run.
    """
    now = now or db.utcnow()
    queued, after = 0, 0
    while rows := _changed(engine, after, batch, now):
        after = rows[-1].id
        with db.session(engine) as session:
            queued += _tell_batch(session, rows, rules, settings.templates_dir, now)
    if queued:
        log.info("status_changed queued=%s", queued)
    return queued


def escalation_level(created_at: datetime, due_at: datetime, now: datetime) -> int:
    """0 before the due time, 1 from it, 2 from twice the SLA (created + 2 x SLA)."""
    if now < due_at:
        return 0
    return 2 if now >= due_at + (due_at - created_at) else 1


@dataclass(frozen=True)
class _Overdue:
    id: int
    level: int


def citizen_text(session: Session, inquiry: int) -> str:
    """The text of the citizen's first mail, as recorded on the inquiry's thread."""
    text = session.execute(
        select(InquiryEvent.text)
        .where(InquiryEvent.inquiry == inquiry, InquiryEvent.kind == "citizen")
        .order_by(InquiryEvent.at, InquiryEvent.id)
        .limit(1)
    ).scalar_one_or_none()
    return text or ""


def transaction_entries(session: Session, numbers: list[str]) -> list[dict[str, object]]:
    """``{number, status, updated_at}`` for each number, in order; unknown numbers have no status."""
    found = {
        row.number: row
        for row in session.execute(select(_transactions).where(_transactions.c.number.in_(numbers)))
    }
    return [
        {"number": n, "status": found[n].status, "updated_at": found[n].updated_at} if n in found
        else {"number": n, "status": None, "updated_at": None}
        for n in numbers
    ]


def forward_message_id(session: Session, inquiry: int) -> str | None:
    """The Message-ID of the newest queue_forward of the inquiry (escalations and clerks thread on it)."""
    return session.execute(
        select(_outbox.c.message_id)
        .where(_outbox.c.inquiry == inquiry, _outbox.c.template == "queue_forward")
        .order_by(_outbox.c.id.desc())
        .limit(1)
    ).scalar_one_or_none()


def _escalate(session: Session, item: _Overdue, rules: Rules, now: datetime, templates_dir: Path) -> bool:
    inquiry = session.get(Inquiry, item.id)
    marked = session.execute(
        update(_inquiries)
        .where(_inquiries.c.id == item.id, _inquiries.c.escalation_level < item.level, _inquiries.c.state == "open")
        .values(escalation_level=item.level)
    ).rowcount
    if marked != 1 or inquiry is None:
        return False
    try:
        department = rules.department(inquiry.department)
    except KeyError:
        department = rules.department("general")
    session.add(InquiryEvent(
        inquiry=item.id, kind="escalation", author=department.escalation,
        text=f"level {item.level}: not answered within {department.sla_hours:g} h", at=now,
    ))
    if not department.escalation:
        log.warning("inquiry=%s department=%s level=%s overdue, but the department has no escalation address",
                    item.id, department.id, item.level)
        return False
    context = {
        "now": now, "department": department.id, "subject": inquiry.subject,
        "sender": inquiry.sender, "sender_name": inquiry.sender_name,
        "text": citizen_text(session, item.id), "received_at": inquiry.created_at, "due_at": inquiry.due_at,
        "transactions": transaction_entries(session, inquiry_numbers(inquiry.transactions)),
        "overdue_hours": round((now - inquiry.due_at).total_seconds() / 3600, 1),
        "claimed_by": inquiry.claimed_by, "level": item.level,
    }
    mail = reply.compose(
        "escalation", STAFF_LANGUAGE, context, rules, templates_dir,
        inquiry=item.id, recipient=department.escalation, in_reply_to=forward_message_id(session, item.id),
        auto_submitted=reply.AUTO_GENERATED,
    )
    return outbox.enqueue(session, mail, key=f"escalation:{item.id}:{item.level}", inquiry=item.id)


def escalate_overdue(engine: Engine, rules: Rules, now: datetime, *, templates_dir: Path = SHIPPED_TEMPLATES) -> int:
    """The job: escalate each open inquiry past its due time, once per level.  Returns mails queued.

    When the job did not run for a while and both levels passed, only level 2
    is sent: one mail saying how late it is beats two at once.
    """
    with engine.connect() as connection:
        rows = connection.execute(
            select(_inquiries.c.id, _inquiries.c.created_at, _inquiries.c.due_at, _inquiries.c.escalation_level)
            .where(_inquiries.c.state == "open", _inquiries.c.due_at <= now,
                   _inquiries.c.escalation_level < MAX_LEVEL)
            .order_by(_inquiries.c.due_at)
        ).all()
    queued = 0
    for row in rows:
        level = escalation_level(row.created_at, row.due_at, now)
        if level <= row.escalation_level:
            continue
        with db.session(engine) as session:
            if _escalate(session, _Overdue(row.id, level), rules, now, templates_dir):
                queued += 1
                log.info("inquiry=%s escalation level=%s queued", row.id, level)
    return queued
