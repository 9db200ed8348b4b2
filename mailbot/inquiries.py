"""Inquiries: open one with its acknowledgement, join follow-ups, never feed a mail loop.

For every understood mail except a clerk's (``clerk.handle_clerk_reply``) the
pipeline calls::

    handle_understood(session, message_row_id, understanding, decision, disclosed, rules, now,
                      existing=followed_inquiry(session, understanding, message_row_id), known=known,
                      templates_dir=settings.templates_dir) -> Handled

(``known``: the transactions routing read) or, for a mail that ``opens_inquiry``,
its two halves: ``plan_opening`` (reads, both mails composed) and
``write_opening``; always inside the transaction that marks the mail processed,
so the inquiry, its acknowledgement in the outbox and the thread event commit
together or not at all.  A new inquiry's forward to its department's queue
(``queue.opened_forward``) is queued in the same transaction.  Processing the same mail
twice gives one inquiry and one reply: the inquiry is unique per mail and the
acknowledgement's outbox key is ``ack:<message row id>``.

What is never answered (SPEC "Never answer automatically"): the kinds
``auto_reply``, ``bulk`` and ``bounce``; an empty sender, mailer-daemon,
postmaster and no-reply senders; our own addresses and domains; an address
that already had
``policy.max_auto_replies_per_day`` automatic mails in the last 24 hours; mail
routed by a rule with ``no_auto_reply``.  Such mail is stored and, for an
inquiry, still reaches the queue.  An address that bounced (``undeliverable``,
see ``record_bounce``) is not among them: a citizen who writes again has a
working mailbox, and the inquiry or follow-up clears the mark.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from sqlalchemy import func, insert, or_, select
from sqlalchemy.engine import Row
from sqlmodel import Session

from mailbot import db, notify, outbox, queue, reply, verp, workhours
from mailbot.classify import Bounce
from mailbot.models import Inquiry, InquiryEvent, Outbox
from mailbot.route import Decision
from mailbot.rules import Rules
from mailbot.settings import SHIPPED_TEMPLATES
from mailbot.transactions import KnownTransaction
from mailbot.understand import Understanding

log = logging.getLogger(__name__)

NEVER_ANSWERED_KINDS = ("auto_reply", "bulk", "bounce")
_ROBOT_LOCALPART = re.compile(
    r"^(mailer-daemon|postmaster|no-?reply|do-?not-?reply|bounces?|auto-?reply|autoresponder)([+.\-_].*)?$",
    re.IGNORECASE,
)
_TAG = re.compile(r"(\d{1,9})")
_inquiries = Inquiry.__table__
_events = InquiryEvent.__table__
_outbox = Outbox.__table__
_INSERT_EVENT = insert(_events)


@dataclass(frozen=True)
class Handled:
    """What became of one mail: ``action`` is opened | joined | reopened | ignored | bounce
    (for a clerk's mail the pipeline carries clerk.ClerkOutcome's action in it)."""

    action: str
    inquiry: int | None = None
    reply: str | None = None  # template of the acknowledgement queued, or None
    reason: str | None = None  # why nothing was sent, for the log line


def ack_template(understanding: Understanding, disclosed: Sequence[str]) -> str:
    """SPEC "Replies" (as disclose.reply_template): status when the sender may see one, no status
    for other numbers, else how to write one.  Numbers only quoted from older mail are not asked about."""
    if disclosed:
        return "ack_status"
    return "ack_unverified" if _asked_numbers(understanding) else "ack_no_number"


def our_addresses(rules: Rules) -> set[str]:
    addresses = {rules.office.address.lower()}
    for department in rules.departments:
        addresses.update(a.lower() for a in (*department.aliases, department.queue, *department.clerks))
        if department.escalation:
            addresses.add(department.escalation.lower())
    return addresses


def unanswerable_sender(sender: str | None, rules: Rules) -> str | None:
    """Why ``sender`` must never get an automatic mail, or None."""
    if not sender or "@" not in sender:
        return "empty sender"
    address = sender.strip().lower()
    localpart, _, domain = address.rpartition("@")
    if _ROBOT_LOCALPART.match(localpart):
        return f"robot sender {address}"
    if address in our_addresses(rules) or domain in {d.lower() for d in rules.office.domains}:
        return f"our own address {address}"
    return None


def _numbers(understanding: Understanding) -> list[str]:
    return [found.number for found in understanding.transactions]


def _asked_numbers(understanding: Understanding) -> list[str]:
    """The numbers the citizen asks about now (not ones only quoted from older mail)."""
    return [found.number for found in understanding.transactions if found.where != "quoted"]


def find_inquiry(session: Session, tags: Iterable[object], message_ids: Iterable[str]) -> Inquiry | None:
    """The inquiry a follow-up belongs to: by its [INQ-nnnnnn] tag, else by a Message-ID we sent."""
    for value in tags:
        match = _TAG.search(str(value))
        if match:
            inquiry = session.get(Inquiry, int(match.group(1)))
            if inquiry is not None:
                return inquiry
    ids = [m for m in message_ids if m]
    if ids:
        inquiry_id = session.execute(
            select(Outbox.inquiry).where(Outbox.message_id.in_(ids), Outbox.inquiry.is_not(None)).limit(1)
        ).scalar_one_or_none()
        if inquiry_id is not None:
            return session.get(Inquiry, inquiry_id)
    return None


def _add_event(session: Session, inquiry: int, kind: str, message: int, author: str | None, text: str,
               now: datetime) -> bool:
    exists = session.execute(
        select(InquiryEvent.id).where(
            InquiryEvent.inquiry == inquiry, InquiryEvent.message == message, InquiryEvent.kind == kind
        )
    ).first()
    if exists:
        return False
    session.add(InquiryEvent(inquiry=inquiry, kind=kind, message=message, author=author, text=text, at=now))
    return True


@dataclass(frozen=True)
class Opening:
    """A new inquiry made from reads alone (plan_opening): what write_opening writes."""

    message: int  # the mail's row id, and the reference the inquiry takes when it is free
    values: dict[str, Any]  # the inquiry row, without its id
    forward: reply.OutgoingMail
    ack: reply.OutgoingMail | None  # None when loop safety forbids one (``blocked`` says why)
    blocked: str | None
    template: str
    disclosed: tuple[str, ...]
    author: str | None
    text: str | None
    compose: Callable[[int], tuple[reply.OutgoingMail, reply.OutgoingMail | None]]  # again, for another reference

    @property
    def sender(self) -> str:
        return self.values["sender"]


def opens_inquiry(understanding: Understanding, existing: Inquiry | None) -> bool:
    """True when this mail opens a new inquiry: not a bounce, robot or clerk mail, and not a
    follow-up of an inquiry we have (the one place that decides, for handle_understood and
    the pipeline's group commit)."""
    kind = understanding.kind
    if kind == "bounce" or kind in NEVER_ANSWERED_KINDS or kind == "clerk_reply":
        return False
    return existing is None


def plan_opening(
    session: Session,
    message_row_id: int,
    understanding: Understanding,
    decision: Decision,
    disclosed: Sequence[str],
    rules: Rules,
    now: datetime,
    *,
    known: Mapping[str, KnownTransaction],
    templates_dir: Path = SHIPPED_TEMPLATES,
) -> Opening:
    """A new inquiry, its queue_forward to the department's clerks and, unless loop safety
    forbids it, its acknowledgement, composed from reads: write_opening writes them, in one
    transaction.  ``decision``: route.Decision (department, rule, priority, tag,
    no_auto_reply); ``disclosed``: disclose.disclosed(...), the numbers whose status this
    sender may see; ``known``: transactions.known_transactions(...) of the mail's numbers,
    which routing read in the same transaction.

    The inquiry's reference is the number of the mail that opened it (one inquiry per
    mail), so both mails are composed from reads alone before anything is written: on
    SQLite, whose one writer every worker and the intake wait for, the write lock is held
    for a few inserts, not for rendering.  References therefore skip the numbers of mail
    that opened no inquiry (follow-ups, clerk answers, bounces).
    """
    parsed = understanding.mail
    if understanding.kind == "followup":
        log.info("mail=%s follow-up of an unknown inquiry: handled as a new inquiry", message_row_id)
    department = rules.department(decision.department)
    numbers = _numbers(understanding)
    sender = (parsed.sender or "").lower()
    sender_name = reply.clean_header(parsed.sender_name or "")[:998] or None
    due_at = workhours.due_at(department, now, rules)
    forwarded = notify.inquiry_numbers(" ".join(numbers))
    on_file = {number: known[number] for number in [*forwarded, *disclosed] if number in known}
    template = ack_template(understanding, disclosed)
    blocked = _ack_blocked(session, parsed.sender, decision, rules, now)

    def compose(inquiry_id: int) -> tuple[reply.OutgoingMail, reply.OutgoingMail | None]:
        """The forward to the queue and the acknowledgement (None when blocked)."""
        forward = queue.opened_forward(
            inquiry_id, rules, now, department=department.id, subject=parsed.subject, sender=sender,
            sender_name=sender_name, text=understanding.new_text or "", received_at=now, due_at=due_at,
            transactions=[
                {"number": n, "status": on_file[n].status, "updated_at": on_file[n].updated_at} if n in on_file
                else {"number": n, "status": None, "updated_at": None}
                for n in forwarded
            ],
            templates_dir=templates_dir,
        )
        if blocked:
            return forward, None
        context = {
            "now": now,
            "name": parsed.sender_name or None,
            "subject": parsed.subject or None,
            "department": department.id,
            "due_at": due_at,
            "transactions": (
                [
                    {"number": n, "status": on_file[n].status, "updated_at": on_file[n].updated_at}
                    for n in disclosed if n in on_file
                ]
                if template == "ack_status"
                else [{"number": n} for n in _asked_numbers(understanding)]
            ),
        }
        # Always to From, never to Reply-To: the status was disclosed to the From address alone.
        ack = reply.compose(
            template, understanding.language, context, rules, templates_dir,
            inquiry=inquiry_id, recipient=parsed.sender, recipient_name=parsed.sender_name,
            in_reply_to=parsed.message_id, references=parsed.references, auto_submitted=reply.AUTO_REPLIED,
        )
        return forward, ack

    forward, ack = compose(message_row_id)
    values = {
        "message": message_row_id, "department": department.id, "rule": decision.rule,
        "language": understanding.language, "state": "open", "sender": sender, "sender_name": sender_name,
        "subject": parsed.subject, "transactions": " ".join(numbers), "priority": decision.priority,
        "tag": decision.tag, "created_at": now, "due_at": due_at, "escalation_level": 0,
    }
    return Opening(message=message_row_id, values=values, forward=forward, ack=ack, blocked=blocked,
                   template=template, disclosed=tuple(disclosed), author=parsed.sender,
                   text=understanding.new_text, compose=compose)


def write_opening(session: Session, opening: Opening, now: datetime) -> Handled:
    """Write a planned inquiry with its forward and acknowledgement."""
    message_row_id, values = opening.message, opening.values
    inquiry_id, forward, ack = message_row_id, opening.forward, opening.ack
    if not _insert_inquiry(session, {"id": inquiry_id, **values}):
        opened = session.execute(select(Inquiry.id).where(Inquiry.message == message_row_id)).scalar_one_or_none()
        if opened is not None:
            log.info("mail=%s inquiry=%s already opened, nothing new", message_row_id, opened)
            return Handled("opened", opened, reason="already processed")
        inquiry_id = _insert_with_free_id(session, values)
        log.info("mail=%s reference %s was taken by an older inquiry: inquiry=%s", message_row_id,
                 message_row_id, inquiry_id)
        forward, ack = opening.compose(inquiry_id)
    # A new inquiry has no events yet: no need to look for this one first (nor to build an ORM object).
    session.execute(_INSERT_EVENT, {"inquiry": inquiry_id, "kind": "citizen", "message": message_row_id,
                                    "author": opening.author, "text": opening.text, "at": now})
    queue.enqueue_opened(session, inquiry_id, values["department"], forward)
    if opening.author and outbox.clear_undeliverable(session, opening.author):
        log.info("mail=%s sender=%s wrote again: undeliverable mark cleared", message_row_id, opening.author)
    if ack is None:
        log.info("mail=%s inquiry=%s no acknowledgement: %s", message_row_id, inquiry_id, opening.blocked)
        return Handled("opened", inquiry_id, reason=opening.blocked)
    outbox.enqueue(session, ack, key=f"ack:{message_row_id}", inquiry=inquiry_id, now=now)
    if opening.template == "ack_status":
        for number in opening.disclosed:
            notify.subscribe(session, number, opening.author or "", values["language"], inquiry_id)
    return Handled("opened", inquiry_id, reply=opening.template)


def _insert_inquiry(session: Session, values: dict[str, Any]) -> bool:
    """False when the id or the mail already has an inquiry."""
    statement = db.insert_ignoring_duplicates(session.get_bind(), _inquiries, _inquiries.c.id)
    return session.execute(statement, values).scalar_one_or_none() is not None


def _insert_with_free_id(session: Session, values: dict[str, Any]) -> int:
    """The inquiry under the next free reference: for a mail whose own number an inquiry opened
    before references followed mail numbers already has (or one a concurrent worker just took)."""
    while True:
        candidate = session.execute(select(func.coalesce(func.max(_inquiries.c.id), 0) + 1)).scalar_one()
        if _insert_inquiry(session, {"id": candidate, **values}):
            return candidate


def _ack_blocked(session: Session, sender: str | None, decision: Decision, rules: Rules, now: datetime) -> str | None:
    if decision.no_auto_reply:
        return f"rule {decision.rule} says no_auto_reply"
    reason = unanswerable_sender(sender, rules)
    if reason:
        return reason
    return outbox.auto_reply_blocked(session, sender or "", rules, now)


def join_followup(session: Session, inquiry: Inquiry, message_row_id: int, understanding: Understanding,
                  rules: Rules, now: datetime, *, templates_dir: Path = SHIPPED_TEMPLATES) -> Handled:
    """A citizen's reply joins its inquiry: an event on the thread, no new inquiry, no new acknowledgement.

    From the inquiry's own sender it also goes to the department's queue, and an
    answered or closed inquiry opens again with a new due time: the citizen
    wrote again, and the 24-hour promise holds for that mail too.  A stop/start
    word only changes the status mails; a third party's mail only joins the thread.
    """
    parsed = understanding.mail
    text = understanding.new_text or ""
    if not _add_event(session, inquiry.id, "followup", message_row_id, parsed.sender, text, now):
        return Handled("joined", inquiry.id, reason="already joined")
    if not parsed.sender or parsed.sender.lower() != inquiry.sender.lower():
        return Handled("joined", inquiry.id, reason="not from the inquiry's sender")
    if outbox.clear_undeliverable(session, parsed.sender):
        log.info("mail=%s sender=%s wrote again: undeliverable mark cleared", message_row_id, parsed.sender)
    if notify.apply_subscription_words(session, inquiry.id, parsed.sender, text):
        return Handled("joined", inquiry.id, reason="stop/start word")
    action = "joined"
    if inquiry.state != queue.OPEN:
        previous = inquiry.state
        inquiry.state, inquiry.closed_at, inquiry.escalation_level = queue.OPEN, None, 0
        inquiry.due_at = workhours.due_at(rules.department(inquiry.department), now, rules)
        session.add(InquiryEvent(inquiry=inquiry.id, kind="system", author=None,
                                 text=f"reopened ({previous}): the citizen wrote again", at=now))
        action = "reopened"
    queue.forward_followup(session, inquiry, message_row_id, text, rules, now, templates_dir=templates_dir)
    return Handled(action, inquiry.id)


def join_same_question(session: Session, inquiry: Inquiry, message_row_id: int, understanding: Understanding,
                       rules: Rules, now: datetime, *, templates_dir: Path = SHIPPED_TEMPLATES) -> Handled:
    """A new mail about the transaction of an inquiry the sender has open joins it: no second
    acknowledgement, no second forward — the clerks see it in the inquiry's thread.  An
    answered inquiry opens again and goes to the queue, as a reply to it would."""
    if inquiry.state != queue.OPEN:
        return join_followup(session, inquiry, message_row_id, understanding, rules, now, templates_dir=templates_dir)
    parsed = understanding.mail
    if not _add_event(session, inquiry.id, "followup", message_row_id, parsed.sender, understanding.new_text or "", now):
        return Handled("joined", inquiry.id, reason="already joined")
    return Handled("joined", inquiry.id, reason="the same question as the open inquiry")


# Feedback that is no complaint by the recipient: a DMARC failure report, "this is not spam".
_NOT_COMPLAINTS = ("auth-failure", "not-spam")


def record_bounce(session: Session, message_row_id: int, understanding: Understanding, now: datetime) -> Handled:
    """A delivery or abuse report about a mail we sent: its recipient gets no more automatic mail.

    Ours or nothing: the report must name one mail of ours, by the signed VERP return path it
    was sent to (verp.py) or by the returned Message-ID; only that mail's recipient is marked.
    An address we once wrote to, named by a report with no such proof, is not: anyone can
    write a bounce.  A mark counts for ``outbox.UNDELIVERABLE_DAYS`` or until the citizen writes.
    """
    bounce = understanding.bounce
    sent = _reported_mail(session, bounce) if bounce is not None else None
    if sent is None or bounce is None:
        log.info("mail=%s report names no mail of ours: nothing marked", message_row_id)
        return Handled("bounce", None, reason="names no mail of ours: nothing marked")
    what = f"feedback report ({bounce.feedback_type})" if bounce.feedback_type else "undeliverable"
    if bounce.feedback_type in _NOT_COMPLAINTS:
        reason = f"{what} about outbox={sent.id}: nothing marked"
    elif understanding.mail.delivery_status is not None and not bounce.recipients:
        reason = f"delivery report about outbox={sent.id} names no failed recipient (delayed, delivered): nothing marked"
    else:
        outbox.mark_undeliverable(session, sent.recipient, f"{what}: mail={message_row_id} outbox={sent.id}", now)
        log.info("mail=%s recipient=%s outbox=%s marked: %s", message_row_id, sent.recipient, sent.id, what)
        reason = f"{what}: {sent.recipient}"
    if sent.inquiry is not None:
        _add_event(session, sent.inquiry, "system", message_row_id, None, reason, now)
    return Handled("bounce", sent.inquiry, reason=reason)


def _reported_mail(session: Session, bounce: Bounce) -> Row | None:
    """The outbox row (id, recipient, inquiry) a report names: its return path first, then the Message-ID."""
    key = verp.known_key(session.connection()) if bounce.return_paths else None
    numbers = [verp.outbox_id(address, key) for address in bounce.return_paths] if key is not None else []
    reported = select(_outbox.c.id, _outbox.c.recipient, _outbox.c.inquiry)
    for number in numbers:
        found = session.execute(reported.where(_outbox.c.id == number)).first() if number is not None else None
        if found is not None:
            return found
    if bounce.original_message_id:
        return session.execute(reported.where(_outbox.c.message_id == bounce.original_message_id)).first()
    return None


def followed_inquiry(session: Session, understanding: Understanding, message: int | None = None) -> Inquiry | None:
    """The inquiry this mail continues, or None (it opens one then).

    A followup continues the inquiry it replies to.  A new inquiry continues one that is
    not closed, from the same sender, about a transaction this mail asks about: one
    inquiry per question, however often the citizen writes before the answer.  ``message``
    is the mail's row id: the inquiry it opened itself (processed again) does not count."""
    mail = understanding.mail
    if understanding.kind == "followup":
        return find_inquiry(session, understanding.inquiry_tags, [mail.in_reply_to or "", *mail.references])
    if understanding.kind == "inquiry":
        return same_question(session, (mail.sender or "").lower(), _asked_numbers(understanding), message)
    return None


def same_question(session: Session, sender: str, numbers: Sequence[str], message: int | None) -> Inquiry | None:
    """The newest inquiry not closed from ``sender`` that names one of ``numbers`` (and was not
    opened by the mail ``message``)."""
    if not sender or not numbers:
        return None
    query = select(Inquiry).where(Inquiry.sender == sender, Inquiry.state != queue.CLOSED,
                                  or_(*(Inquiry.transactions.contains(number) for number in numbers)))
    if message is not None:
        query = query.where(Inquiry.message != message)
    candidates = session.execute(query.order_by(Inquiry.id.desc())).scalars()
    for inquiry in candidates:  # contains() is a substring test: 1446/0012 is in 1446/00123
        if set(notify.inquiry_numbers(inquiry.transactions)) & set(numbers):
            return inquiry
    return None


def handle_understood(
    session: Session,
    message_row_id: int,
    understanding: Understanding,
    decision: Decision,
    disclosed: Sequence[str],
    rules: Rules,
    now: datetime,
    *,
    existing: Inquiry | None,
    known: Mapping[str, KnownTransaction],
    templates_dir: Path = SHIPPED_TEMPLATES,
) -> Handled:
    """What becomes of an understood mail (not a clerk_reply): see the module docstring.

    ``existing`` is ``followed_inquiry(session, understanding, message_row_id)``, which the caller
    has already looked up to route the mail."""
    if opens_inquiry(understanding, existing):
        opening = plan_opening(session, message_row_id, understanding, decision, disclosed, rules, now,
                               known=known, templates_dir=templates_dir)
        return write_opening(session, opening, now)
    kind = understanding.kind
    if kind == "bounce":
        return record_bounce(session, message_row_id, understanding, now)
    if kind == "followup" and existing is not None:
        return join_followup(session, existing, message_row_id, understanding, rules, now,
                             templates_dir=templates_dir)
    if kind == "inquiry" and existing is not None:
        return join_same_question(session, existing, message_row_id, understanding, rules, now,
                                  templates_dir=templates_dir)
    return Handled("ignored", reason=f"kind {kind} is never answered automatically")
