"""Clerks answer by replying to the forwarded inquiry: commands on their own lines, the rest is relayed.

A clerk's mail is trusted only from a clerk address of the inquiry's
department.  Anything wrong (another department, an unknown command, an
unknown status) changes nothing; a known clerk is told why, anyone else gets
no answer at all, because an automatic answer to a forged or unknown sender
is how mail loops and backscatter start.
"""

from __future__ import annotations

import html
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Sequence

from sqlalchemy import select
from sqlmodel import Session

from mailbot import outbox, queue, reply
from mailbot.models import Inquiry, InquiryEvent, Outbox, Transaction, TransactionHistory
from mailbot.disclose import is_sender_verified
from mailbot.inquiries import unanswerable_sender
from mailbot.notify import inquiry_numbers
from mailbot.parse import ParsedMail
from mailbot.rules import Rules
from mailbot.settings import SHIPPED_TEMPLATES
from mailbot.transactions import canonical_number
from mailbot.understand import Understanding

log = logging.getLogger(__name__)

COMMANDS = ("status", "internal", "close", "assign")
# "#" followed by a letter: "#1446/00321" is a transaction number, not a command.
_COMMAND_LINE = re.compile(r"^[ \t\u200e\u200f]*#([A-Za-z][A-Za-z_-]*)[ \t]*(.*?)\s*$")


@dataclass(frozen=True)
class Command:
    name: str  # one of COMMANDS
    argument: str = ""  # the status or department id
    number: str | None = None  # "#status 1446/00321 completed" names one transaction


@dataclass(frozen=True)
class ClerkMail:
    commands: tuple[Command, ...]
    text: str  # what is relayed: the new text without command lines
    errors: tuple[str, ...]  # why nothing may be done; empty when the mail is fine

    @property
    def is_internal(self) -> bool:
        return any(command.name == "internal" for command in self.commands)


def read_clerk_mail(new_text: str, rules: Rules) -> ClerkMail:
    """Split a clerk's new text into commands and the answer, checking every command against ``rules``."""
    commands: list[Command] = []
    errors: list[str] = []
    kept: list[str] = []
    for line in new_text.splitlines():
        match = _COMMAND_LINE.match(line)
        if match is None:
            kept.append(line)
            continue
        command, error = _read_command(match.group(1).lower(), match.group(2).split(), rules)
        if error:
            errors.append(error)
            continue
        commands.append(command)
        if command.name == "internal" and command.argument:
            kept.append(command.argument)  # "#internal called the police station" is a note too
    text = "\n".join(kept).strip()
    return ClerkMail(commands=tuple(commands), text=text, errors=tuple(errors))


def _read_command(name: str, words: list[str], rules: Rules) -> tuple[Command, str | None]:
    statuses = [status.id for status in rules.statuses]
    departments = [department.id for department in rules.departments]
    if name == "status":
        if len(words) not in (1, 2):
            return Command(name), f"#status needs a status id, e.g. '#status completed' (one of: {', '.join(statuses)})"
        status = words[-1].lower()
        if status not in statuses:
            return Command(name), f"unknown status '{words[-1]}' (expected one of: {', '.join(statuses)})"
        if len(words) == 1:
            return Command(name, status), None
        number = canonical_number(words[0], rules)
        if number is None:
            return Command(name), f"#status: '{words[0]}' is not a transaction number (expected YYYY/SERIAL)"
        return Command(name, status, number), None
    if name == "assign":
        if len(words) != 1:
            return Command(name), f"#assign needs a department id (one of: {', '.join(departments)})"
        department = words[0].lower()
        if department not in departments:
            return Command(name), f"unknown department '{words[0]}' (expected one of: {', '.join(departments)})"
        return Command(name, department), None
    if name == "internal":
        return Command(name, " ".join(words)), None
    if name == "close":
        if words:
            return Command(name), f"#close takes no argument, got '{' '.join(words)}'"
        return Command(name), None
    return Command(name), f"unknown command '#{name}' (expected one of: {', '.join('#' + c for c in COMMANDS)})"


@dataclass(frozen=True)
class ClerkOutcome:
    inquiry: int | None
    action: str  # relayed | internal | commands | rejected | ignored | duplicate
    errors: tuple[str, ...] = ()
    notice_sent: bool = False  # an explanation went back to the clerk


_TAG = re.compile(r"\bINQ-(\d{1,9})\b", re.IGNORECASE)
_OUR_MESSAGE_ID = re.compile(r"<inq-(\d{1,9})\.[a-z]+\.[^@<>\s]+@([^<>\s]+)>", re.IGNORECASE)


def is_any_clerk(rules: Rules, address: str) -> bool:
    address = address.strip().lower()
    return any(address in {clerk.lower() for clerk in d.clerks} for d in rules.departments)


def find_inquiry(session: Session, references: Sequence[str], subject: str, rules: Rules) -> int | None:
    """The inquiry a clerk answers: the newest of our mails they reply to, else the tag in the subject."""
    domains = {rules.office.address.rpartition("@")[2].lower(), *(d.lower() for d in rules.office.domains)}
    for message_id in reversed(references):
        found = session.execute(select(Outbox.inquiry).where(Outbox.message_id == message_id)).scalar()
        if found is None:
            match = _OUR_MESSAGE_ID.fullmatch(message_id.strip())
            if match and match.group(2).lower() in domains:
                found = int(match.group(1))
        if found is not None and session.get(Inquiry, found) is not None:
            return found
    for match in _TAG.finditer(subject or ""):
        if session.get(Inquiry, int(match.group(1))) is not None:
            return int(match.group(1))
    return None


def _check(session: Session, row: Inquiry | None, sender: str, mail: ClerkMail, rules: Rules) -> list[str]:
    """Everything that stops the mail from being applied; nothing is changed until this is empty."""
    if row is None:
        return ["no inquiry found: answer by replying to the forwarded mail and keep [INQ-nnnnnn] in the subject"]
    ref = queue.reference(row.id)
    if not queue.is_clerk_of(rules, row.department, sender):
        return [f"{sender} is not a clerk of department {row.department}, which {ref} belongs to"]
    errors = list(mail.errors)
    numbers = inquiry_numbers(row.transactions)
    for command in mail.commands:
        if command.name == "status":
            targets = [command.number] if command.number else numbers
            if command.number and command.number not in numbers:
                errors.append(f"#status: {command.number} is not a transaction of {ref} ({', '.join(numbers) or 'none'})")
            elif not [n for n in targets if session.get(Transaction, n) is not None]:
                errors.append(f"#status: {ref} has no transaction on file to change")
        elif command.name == "assign" and command.argument == row.department:
            errors.append(f"#assign: {ref} is already in department {row.department}")
        elif command.name == "close" and row.state == queue.CLOSED:
            errors.append(f"#close: {ref} is already closed")
    if not errors and not mail.commands and not mail.text:
        errors.append("the mail has neither an answer nor a command")
    unreachable = unanswerable_sender(row.sender, rules)
    if not errors and mail.text and not mail.is_internal and unreachable:
        errors.append(f"the answer cannot be sent to the sender of {ref}: {unreachable}")
    return errors


def set_status(session: Session, number: str, status: str, now: datetime, *, source: str, note: str | None) -> str | None:
    """Change one transaction's status with its history row; returns the previous status (None: unchanged).

    Unlike ``transactions.set_status`` this writes in the caller's session, so
    the change commits with the clerk's mail that asked for it.
    """
    row = session.get(Transaction, number)
    if row is None or row.status == status:
        return None
    previous = row.status
    row.status, row.updated_at = status, now
    session.add(TransactionHistory(number=number, status=status, previous_status=previous, changed_at=now,
                                   source=source, note=note))
    return previous


def _apply(session: Session, message: int, row: Inquiry, sender: str, mail: ClerkMail, rules: Rules,
           now: datetime, templates_dir: Path) -> str:
    if mail.is_internal:
        session.add(InquiryEvent(inquiry=row.id, kind="internal", message=message, author=sender,
                                 text=mail.text, at=now))
        action = "internal"
    elif mail.text:
        queue.relay_answer(session, row.id, sender, mail.text, rules, now, message=message,
                           templates_dir=templates_dir)
        action = "relayed"
    else:
        session.add(InquiryEvent(inquiry=row.id, kind="system", message=message, author=sender,
                                 text=" ".join(f"#{c.name} {c.argument}".strip() for c in mail.commands), at=now))
        action = "commands"
    for command in mail.commands:
        if command.name == "status":
            for number in [command.number] if command.number else inquiry_numbers(row.transactions):
                # The clerk's text is the change's note, which the citizen's status mail carries;
                # an internal note stays internal (who changed it is on the thread's event).
                note = None if mail.is_internal else (queue.without_clerk_addresses(mail.text, rules).strip() or None)
                previous = set_status(session, number, command.argument, now, source="clerk", note=note)
                if previous is not None:
                    session.add(InquiryEvent(inquiry=row.id, kind="status", author=sender, at=now,
                                             text=f"{number}: {previous} -> {command.argument}"))
    for command in mail.commands:
        if command.name == "assign":
            queue.assign(session, row.id, command.argument, rules, now, author=sender, templates_dir=templates_dir)
    if any(command.name == "close" for command in mail.commands):
        queue.close(session, row.id, now, author=sender)
    return action


def _notice(session: Session, message: int, mail: ParsedMail, inquiry: int | None, errors: Sequence[str],
            rules: Rules) -> bool:
    """Tell a clerk why their mail changed nothing (one notice per mail they sent)."""
    lines = ["لم يُنفَّذ شيء من رسالتك، للأسباب التالية:", "Nothing in your mail was applied, because:", "",
             *(f"- {error}" for error in errors)]
    text = "\n".join(lines) + "\n"
    prefix = f"{reply.tag(inquiry)} " if inquiry else ""
    notice = reply.OutgoingMail(
        sender_name=rules.office.name.ar, sender=rules.office.address, recipient=reply.clean_address(mail.sender or ""),
        subject=reply.clean_header(f"{prefix}لم يُنفَّذ / Not applied: {mail.subject}")[: reply.MAX_SUBJECT],
        message_id=reply.make_message_id(inquiry or 0, "clerk_notice", rules),
        text=text, html=f'<html dir="rtl" lang="ar"><body><pre dir="auto">{html.escape(text)}</pre></body></html>',
        template="clerk_notice", language="ar", auto_submitted=reply.AUTO_REPLIED,
        in_reply_to=mail.message_id, references=reply.thread_references(mail.references, mail.message_id),
    )
    return outbox.enqueue(session, notice, key=f"clerk-notice:{message}", inquiry=inquiry)


def handle_clerk_mail(
    session: Session, message: int, mail: ParsedMail, new_text: str, rules: Rules, now: datetime,
    *, authenticated: bool, templates_dir: Path = SHIPPED_TEMPLATES,
) -> ClerkOutcome:
    """Apply a clerk's mail (``message`` is its stored row id): relay, note, commands, or a notice why not.

    ``authenticated`` is False when a trusted Authentication-Results header
    shows the From address forged: such a mail is ignored like a stranger's.
    """
    sender = (mail.sender or "").lower()
    if session.execute(select(InquiryEvent.id).where(InquiryEvent.message == message)).first() is not None:
        return ClerkOutcome(None, "duplicate")
    if not is_any_clerk(rules, sender) or not authenticated:
        reason = "not a clerk address" if authenticated else "failed authentication"
        log.warning("mail=%s sender=%s clerk mail ignored: %s", message, sender, reason)
        return ClerkOutcome(None, "ignored", (f"{sender}: {reason}",))
    references = [*mail.references, *([mail.in_reply_to] if mail.in_reply_to else [])]
    inquiry = find_inquiry(session, references, mail.subject, rules)
    row = session.get(Inquiry, inquiry) if inquiry is not None else None
    clerk_mail = read_clerk_mail(new_text, rules)
    errors = _check(session, row, sender, clerk_mail, rules)
    if errors or row is None:
        sent = _notice(session, message, mail, inquiry, errors, rules)
        log.warning("mail=%s inquiry=%s sender=%s clerk mail rejected: %s", message, inquiry, sender, "; ".join(errors))
        return ClerkOutcome(inquiry, "rejected", tuple(errors), sent)
    action = _apply(session, message, row, sender, clerk_mail, rules, now, templates_dir)
    log.info("mail=%s inquiry=%s sender=%s clerk mail %s commands=%s", message, inquiry, sender, action,
             ",".join(c.name for c in clerk_mail.commands) or "-")
    return ClerkOutcome(inquiry, action)


def handle_clerk_reply(
    session: Session, message: int, understanding: Understanding, rules: Rules, now: datetime,
    *, templates_dir: Path = SHIPPED_TEMPLATES,
) -> ClerkOutcome:
    """The pipeline's one call for a ``clerk_reply`` (``message`` is the stored mail's row id).

    Uses ``understanding.mail`` (ParsedMail) and ``understanding.new_text`` (quote and signature removed).
    """
    mail = understanding.mail
    return handle_clerk_mail(session, message, mail, understanding.new_text, rules, now,
                             authenticated=is_sender_verified(mail.sender, mail.auth_results, rules)[0],
                             templates_dir=templates_dir)
