"""The department queues: forward new inquiries to clerks, list them, claim, answer, close, reassign.

Clerk answers reach the citizen only through :func:`relay_answer`: From is
the office, the text is the clerk's, the thread is the citizen's.  No header
and no line of the relayed mail carries a clerk's address.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from mailbot import outbox, reply, workhours
from mailbot.models import Inquiry, InquiryEvent, Message, Outbox
from mailbot.notify import STAFF_LANGUAGE, citizen_text, inquiry_numbers, transaction_entries
from mailbot.reply import OutgoingMail
from mailbot.rules import Rules
from mailbot.settings import SHIPPED_TEMPLATES

log = logging.getLogger(__name__)

OPEN, ANSWERED, CLOSED = "open", "answered", "closed"
STUCK_AFTER = timedelta(minutes=15)  # outbox mail pending longer than this means the relay is down
_inquiries = Inquiry.__table__


class QueueError(ValueError):
    """A queue action cannot be done; the message says why, for a clerk to read."""


@dataclass(frozen=True)
class QueueItem:
    id: int
    reference: str
    department: str
    state: str
    subject: str | None
    sender: str
    created_at: datetime
    due_at: datetime
    age: timedelta
    sla_left: timedelta  # negative when overdue
    overdue: bool
    claimed_by: str | None
    escalation_level: int


@dataclass(frozen=True)
class ThreadEntry:
    at: datetime
    kind: str  # an InquiryEvent kind, or "mail" for what the office sent
    author: str | None
    text: str


@dataclass(frozen=True)
class InquiryView:
    item: QueueItem
    language: str
    transactions: tuple[str, ...]
    first_response_at: datetime | None
    closed_at: datetime | None
    thread: tuple[ThreadEntry, ...]


@dataclass(frozen=True)
class Health:
    open_by_department: dict[str, int]
    overdue_by_department: dict[str, int]
    outbox: dict[str, int]  # rows per outbox state
    outbox_stuck: int  # pending (not failed) for longer than STUCK_AFTER

    @property
    def is_stuck(self) -> bool:
        return self.outbox_stuck > 0


def reference(inquiry: int) -> str:
    return f"INQ-{inquiry:06d}"


def _item(row: Inquiry, now: datetime) -> QueueItem:
    overdue = row.state == OPEN and row.due_at <= now
    return QueueItem(
        id=row.id, reference=reference(row.id), department=row.department, state=row.state,
        subject=row.subject, sender=row.sender, created_at=row.created_at, due_at=row.due_at,
        age=now - row.created_at, sla_left=row.due_at - now, overdue=overdue,
        claimed_by=row.claimed_by, escalation_level=row.escalation_level,
    )


def queue_order(item: QueueItem) -> tuple[bool, bool, datetime]:
    """Overdue first, then the rest of the open ones, then answered; oldest first within each."""
    return (not item.overdue, item.state != OPEN, item.created_at)


def list_queue(
    session: Session, now: datetime, *, department: str | None = None, overdue: bool = False
) -> list[QueueItem]:
    """Inquiries not closed yet, in the order a clerk should take them."""
    query = select(Inquiry).where(Inquiry.state != CLOSED)
    if department:
        query = query.where(Inquiry.department == department)
    if overdue:
        query = query.where(Inquiry.state == OPEN, Inquiry.due_at <= now)
    items = [_item(row, now) for row in session.execute(query).scalars()]
    return sorted(items, key=queue_order)


def _inquiry(session: Session, inquiry: int) -> Inquiry:
    row = session.get(Inquiry, inquiry)
    if row is None:
        raise QueueError(f"no inquiry {reference(inquiry)}")
    return row


def show_inquiry(session: Session, inquiry: int, now: datetime) -> InquiryView:
    """The inquiry and its whole thread: citizen mails, answers, notes, status changes, mail sent."""
    row = _inquiry(session, inquiry)
    entries = [
        ThreadEntry(event.at, event.kind, event.author, event.text or "")
        for event in session.execute(select(InquiryEvent).where(InquiryEvent.inquiry == inquiry)).scalars()
    ]
    entries += [
        ThreadEntry(mail.created_at, "mail", mail.recipient, f"{mail.template} ({mail.state})")
        for mail in session.execute(select(Outbox).where(Outbox.inquiry == inquiry)).scalars()
    ]
    return InquiryView(
        item=_item(row, now), language=row.language, transactions=tuple(inquiry_numbers(row.transactions)),
        first_response_at=row.first_response_at, closed_at=row.closed_at,
        thread=tuple(sorted(entries, key=lambda entry: entry.at)),
    )


def is_clerk_of(rules: Rules, department: str, address: str) -> bool:
    try:
        clerks = rules.department(department).clerks
    except KeyError:
        return False
    return address.strip().lower() in {clerk.lower() for clerk in clerks}


def _require_clerk(rules: Rules, row: Inquiry, clerk: str) -> None:
    if not is_clerk_of(rules, row.department, clerk):
        raise QueueError(f"{clerk} is not a clerk of department {row.department} ({reference(row.id)})")


def claim(session: Session, inquiry: int, clerk: str, rules: Rules, now: datetime) -> None:
    row = _inquiry(session, inquiry)
    _require_clerk(rules, row, clerk)
    clerk = clerk.strip().lower()
    if row.claimed_by and row.claimed_by != clerk:
        raise QueueError(f"{reference(inquiry)} is already claimed by {row.claimed_by}")
    row.claimed_by = clerk
    session.add(InquiryEvent(inquiry=inquiry, kind="system", author=clerk, text=f"claimed by {clerk}", at=now))
    log.info("inquiry=%s claimed_by=%s", inquiry, clerk)


def close(session: Session, inquiry: int, now: datetime, *, author: str | None = None) -> None:
    row = _inquiry(session, inquiry)
    if row.state == CLOSED:
        raise QueueError(f"{reference(inquiry)} is already closed")
    row.state, row.closed_at = CLOSED, now
    session.add(InquiryEvent(inquiry=inquiry, kind="system", author=author, text="closed", at=now))
    log.info("inquiry=%s closed by=%s", inquiry, author)


def assign(
    session: Session, inquiry: int, department: str, rules: Rules, now: datetime,
    *, author: str | None = None, templates_dir: Path = SHIPPED_TEMPLATES,
) -> None:
    """Move the inquiry to another department's queue and forward it there."""
    row = _inquiry(session, inquiry)
    if department not in {d.id for d in rules.departments}:
        raise QueueError(f"unknown department '{department}' (expected one of: "
                         f"{', '.join(d.id for d in rules.departments)})")
    if row.department == department:
        raise QueueError(f"{reference(inquiry)} is already in department {department}")
    previous = row.department
    row.department, row.claimed_by = department, None
    session.add(InquiryEvent(inquiry=inquiry, kind="system", author=author,
                             text=f"assigned from {previous} to {department}", at=now))
    session.flush()
    forward_to_queue(session, inquiry, rules, now, templates_dir=templates_dir)
    log.info("inquiry=%s department=%s previous=%s assigned by=%s", inquiry, department, previous, author)


def forward_to_queue(
    session: Session, inquiry: int, rules: Rules, now: datetime, *, templates_dir: Path = SHIPPED_TEMPLATES
) -> bool:
    """Queue ``queue_forward`` to the inquiry's department; clerks answer it by replying.

    Reply-To is the official inbox, so their answer comes back as a clerk_reply
    threaded on the forward's Message-ID.  Once per inquiry and department.
    """
    row = _inquiry(session, inquiry)
    mail = opened_forward(
        inquiry, rules, now, department=row.department, subject=row.subject, sender=row.sender,
        sender_name=row.sender_name, text=citizen_text(session, inquiry), received_at=row.created_at,
        due_at=row.due_at, transactions=transaction_entries(session, inquiry_numbers(row.transactions)),
        templates_dir=templates_dir,
    )
    return enqueue_opened(session, inquiry, row.department, mail)


def opened_forward(
    inquiry: int, rules: Rules, now: datetime, *, department: str, subject: str | None,
    sender: str, sender_name: str | None, text: str, received_at: datetime, due_at: datetime,
    transactions: list[dict[str, object]], templates_dir: Path = SHIPPED_TEMPLATES,
) -> OutgoingMail:
    """The ``queue_forward`` of an inquiry, made from its values (``transactions`` as
    notify.transaction_entries gives them) without reading or writing the database:
    a new inquiry's forward is composed before its write transaction begins."""
    context = {
        "subject": subject, "sender": sender, "sender_name": sender_name, "text": text,
        "received_at": received_at, "due_at": due_at, "transactions": transactions, "followup": False,
    }
    return _forward_mail(inquiry, department, context, rules, now, templates_dir)


def enqueue_opened(session: Session, inquiry: int, department: str, mail: OutgoingMail) -> bool:
    """Queue an inquiry's forward to ``department``: once per inquiry and department."""
    return outbox.enqueue(session, mail, key=f"forward:{inquiry}:{department}", inquiry=inquiry)


def forward_followup(
    session: Session, inquiry: Inquiry, message: int, text: str, rules: Rules, now: datetime,
    *, templates_dir: Path = SHIPPED_TEMPLATES,
) -> bool:
    """The citizen's follow-up (mail row ``message``) to the inquiry's queue: clerks who work by
    mail see what the citizen added, and answer it by replying, as to the first forward."""
    context = {
        "subject": inquiry.subject, "sender": inquiry.sender, "sender_name": inquiry.sender_name, "text": text,
        "received_at": now, "due_at": inquiry.due_at,
        "transactions": transaction_entries(session, inquiry_numbers(inquiry.transactions)), "followup": True,
    }
    mail = _forward_mail(inquiry.id, inquiry.department, context, rules, now, templates_dir)
    return outbox.enqueue(session, mail, key=f"followup:{message}", inquiry=inquiry.id)


def _forward_mail(inquiry: int, department: str, context: dict[str, object], rules: Rules, now: datetime,
                  templates_dir: Path) -> OutgoingMail:
    queue_of = rules.department(department)
    return reply.compose(
        "queue_forward", STAFF_LANGUAGE, {**context, "now": now, "department": queue_of.id}, rules, templates_dir,
        inquiry=inquiry, recipient=queue_of.queue, reply_to=rules.office.address,
        auto_submitted=reply.AUTO_GENERATED,
    )


def citizen_message_ids(session: Session, inquiry: Inquiry) -> list[str]:
    """Message-IDs of the citizen's mails on this inquiry, oldest first (the relay threads on them)."""
    followups = select(InquiryEvent.message).where(
        InquiryEvent.inquiry == inquiry.id, InquiryEvent.kind.in_(("citizen", "followup")),
        InquiryEvent.message.is_not(None),
    )
    rows = session.execute(
        select(Message.message_id)
        .where((Message.id == inquiry.message) | Message.id.in_(followups), Message.message_id.is_not(None))
        .order_by(Message.received_at, Message.id)
    ).scalars()
    return list(dict.fromkeys(rows))


def without_clerk_addresses(text: str, rules: Rules) -> str:
    """The text with every clerk address removed: a signature must not reveal who answered."""
    for department in rules.departments:
        for clerk in department.clerks:
            text = re.sub(re.escape(clerk), "", text, flags=re.IGNORECASE)
    return text


def relay_answer(
    session: Session, inquiry: int, clerk: str, text: str, rules: Rules, now: datetime,
    *, message: int | None = None, templates_dir: Path = SHIPPED_TEMPLATES,
) -> bool:
    """Send the clerk's answer to the citizen as ``department_reply``, under the office's name.

    The first answer makes the inquiry answered and records first_response_at.
    ``message`` is the clerk's stored mail (None from the terminal).  False
    when this answer was already queued.
    """
    row = _inquiry(session, inquiry)
    answer = without_clerk_addresses(text, rules).strip()
    if not answer:
        raise QueueError(f"nothing to send to the citizen of {reference(inquiry)}: the answer is empty")
    threads = citizen_message_ids(session, row)
    context = {"now": now, "department": row.department, "name": row.sender_name, "subject": row.subject,
               "answer": answer, "transactions": transaction_entries(session, inquiry_numbers(row.transactions))}
    mail = reply.compose(
        "department_reply", row.language, context, rules, templates_dir,
        inquiry=inquiry, recipient=row.sender, recipient_name=row.sender_name,
        in_reply_to=threads[-1] if threads else None, references=threads,
    )
    event = InquiryEvent(inquiry=inquiry, kind="clerk", message=message, author=clerk.strip().lower(),
                         text=answer, at=now)
    session.add(event)
    session.flush()
    key = f"reply:mail:{message}" if message is not None else f"reply:event:{event.id}"
    if not outbox.enqueue(session, mail, key=key, inquiry=inquiry):
        session.delete(event)
        return False
    if row.state == OPEN:
        row.state = ANSWERED
    if row.first_response_at is None:
        row.first_response_at = now
    row.claimed_by = row.claimed_by or clerk.strip().lower()
    log.info("inquiry=%s department=%s relayed answer message=%s", inquiry, row.department, message)
    return True


def reply_from_terminal(
    session: Session, inquiry: int, clerk: str, text: str, rules: Rules, now: datetime,
    *, templates_dir: Path = SHIPPED_TEMPLATES,
) -> None:
    """``mailbot queue reply``: the same relay as an emailed answer, for a clerk of the department."""
    _require_clerk(rules, _inquiry(session, inquiry), clerk)
    relay_answer(session, inquiry, clerk, text, rules, now, templates_dir=templates_dir)


def queue_health(engine: Engine, now: datetime) -> Health:
    """Queue sizes and overdue counts per department, and the outbox backlog, for ``mailbot status``."""
    with engine.connect() as connection:
        open_rows = connection.execute(
            select(_inquiries.c.department, func.count())
            .where(_inquiries.c.state != CLOSED).group_by(_inquiries.c.department)
        )
        overdue_rows = connection.execute(
            select(_inquiries.c.department, func.count())
            .where(_inquiries.c.state == OPEN, _inquiries.c.due_at <= now).group_by(_inquiries.c.department)
        )
        stuck = connection.execute(
            select(func.count()).select_from(Outbox.__table__)
            .where(Outbox.__table__.c.state.in_((outbox.PENDING, outbox.SENDING)),
                   Outbox.__table__.c.created_at <= now - STUCK_AFTER)
        ).scalar_one()
        return Health(
            open_by_department=dict(open_rows.all()),
            overdue_by_department=dict(overdue_rows.all()),
            outbox=outbox.count_by_state(engine),
            outbox_stuck=stuck,
        )


def format_duration(value: timedelta) -> str:
    """``3d04h``, ``5h07m``, ``12m``: short enough for a terminal column."""
    minutes = int(abs(value).total_seconds() // 60)
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    text = f"{days}d{hours:02d}h" if days else f"{hours}h{minutes:02d}m" if hours else f"{minutes}m"
    return f"-{text}" if value < timedelta(0) else text


def format_item(item: QueueItem) -> str:
    sla = f"OVERDUE {format_duration(-item.sla_left)}" if item.overdue else f"sla {format_duration(item.sla_left)}"
    if item.state != OPEN:
        sla = item.state
    return (f"{item.reference}  {item.department:<12} age {format_duration(item.age):<7} {sla:<16} "
            f"{item.claimed_by or '-':<28} {item.sender}  {item.subject or ''}").rstrip()


def format_view(view: InquiryView, rules: Rules) -> list[str]:
    """An inquiry for a clerk's terminal, times on the office's clock."""
    item = view.item
    lines = [
        f"{item.reference}  [{item.state}]  department {item.department}  language {view.language}",
        f"from:        {item.sender}",
        f"subject:     {item.subject or ''}",
        f"transactions: {' '.join(view.transactions) or '-'}",
        f"received:    {workhours.stamp(item.created_at, rules)}   due {workhours.stamp(item.due_at, rules)}"
        + ("   OVERDUE" if item.overdue else ""),
        f"claimed by:  {item.claimed_by or '-'}   escalation level {item.escalation_level}",
    ]
    if view.first_response_at:
        lines.append(f"answered:    {workhours.stamp(view.first_response_at, rules)}")
    if view.closed_at:
        lines.append(f"closed:      {workhours.stamp(view.closed_at, rules)}")
    for entry in view.thread:
        lines.append("")
        lines.append(f"--- {workhours.stamp(entry.at, rules)} {entry.kind} {entry.author or ''}".rstrip())
        lines.extend(entry.text.splitlines() or [""])
    return lines
