"""Replies: render a template, compose an :class:`OutgoingMail`, turn it into bytes.

Stable API (used by inquiries.py, notify.py and the clerk queue):

``render(template_id, language, context, rules, templates_dir) -> Rendered``
    Pure.  ``templates/<language>/<template_id>.txt`` and ``.html`` extend the
    shared ``templates/layout.txt`` / ``layout.html``; the subject is the
    ``subject`` block of the text template.  Context keys every template knows:

    ``inquiry``      int, required — the reference, shown as ``[INQ-000123]``
    ``now``          datetime, the date printed in the mail (default: utcnow)
    ``name``         the citizen's display name (optional)
    ``subject``      the citizen's subject (optional)
    ``department``   department id (its name comes from the rules)
    ``transactions`` list of mappings ``{number, status, updated_at}`` (status id;
                     the label comes from the rules)
    ``due_at``       datetime the office promised an answer by
    template specific: ``answer`` (department_reply), ``number``, ``old_status``,
    ``new_status``, ``changed_at`` (status_changed), ``sender``, ``sender_name``,
    ``text``, ``received_at`` (queue_forward, escalation), ``followup`` (queue_forward: a citizen's
    follow-up, not a new inquiry), ``overdue_hours``,
    ``claimed_by`` (escalation).

``compose(template_id, language, context, rules, templates_dir, *, inquiry, recipient, ...) -> OutgoingMail``
    Renders and adds the headers: own Message-ID at the office domain
    (``<inq-000123.ack.<random>@emirate.example>``), In-Reply-To/References,
    Auto-Submitted, From with the office name in the reply's language.

``to_bytes(mail) -> bytes``
    multipart/alternative (text + HTML), UTF-8, CRLF, RFC 2047 headers; every
    ``OutgoingMail`` carries its own as ``mail.raw``.

Anything a citizen controls (names, subjects, addresses, Message-IDs) passes
:func:`clean_header` before it reaches a header, so it can never add or split one.
"""

from __future__ import annotations

import re
import secrets
import sys
from base64 import encodebytes
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from email import policy
from email.header import Header
from email.headerregistry import Address
from email.utils import formataddr, format_datetime, parseaddr
from functools import lru_cache
from pathlib import Path
from time import monotonic
from typing import Any, Callable, Mapping, Sequence
from zoneinfo import ZoneInfo

from hijridate import Gregorian
from jinja2 import (
    Environment,
    FileSystemLoader,
    StrictUndefined,
    TemplateNotFound,
    TemplateSyntaxError,
    UndefinedError,
    select_autoescape,
)

from mailbot import db
from mailbot.rules import Rules

TEMPLATES = (
    "ack_status",
    "ack_unverified",
    "ack_no_number",
    "department_reply",
    "status_changed",
    "escalation",
    "queue_forward",
)
LANGUAGES = ("ar", "en")
AUTO_REPLIED = "auto-replied"  # RFC 3834: an answer to a citizen's mail
AUTO_GENERATED = "auto-generated"  # RFC 3834: a notification nobody's mail caused
# The part of our Message-IDs that says what kind of mail it was.
MESSAGE_ID_LABELS = {
    "ack_status": "ack",
    "ack_unverified": "ack",
    "ack_no_number": "ack",
    "department_reply": "reply",
    "status_changed": "status",
    "escalation": "esc",
    "queue_forward": "fwd",
}
MAX_REFERENCES = 10
MAX_SUBJECT = 200
ARABIC_DIGITS = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f\u2028\u2029\x85]+")
# The Gulf offices' zones named as their citizens say them (ar, en); any other zone is
# shown by its IANA name.
ZONE_LABELS = {
    "Asia/Riyadh": ("بتوقيت الرياض", "Riyadh time"),
    "Asia/Dubai": ("بتوقيت الإمارات", "UAE time"),
    "Asia/Kuwait": ("بتوقيت الكويت", "Kuwait time"),
    "Asia/Qatar": ("بتوقيت قطر", "Qatar time"),
    "Asia/Bahrain": ("بتوقيت البحرين", "Bahrain time"),
    "Asia/Muscat": ("بتوقيت مسقط", "Muscat time"),
}

GREGORIAN_MONTHS_AR = (
    "يناير", "فبراير", "مارس", "أبريل", "مايو", "يونيو",
    "يوليو", "أغسطس", "سبتمبر", "أكتوبر", "نوفمبر", "ديسمبر",
)


class ReplyError(ValueError):
    """A reply cannot be made: unknown template or language, bad recipient."""


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str
    html: str


@dataclass(frozen=True)
class OutgoingMail:
    sender_name: str
    sender: str
    recipient: str
    subject: str
    message_id: str
    text: str
    html: str
    template: str
    language: str
    auto_submitted: str
    recipient_name: str | None = None
    in_reply_to: str | None = None
    references: tuple[str, ...] = ()
    reply_to: str | None = None
    date: datetime = field(default_factory=db.utcnow)
    # The bytes as sent (to_bytes), made once with the mail: callers compose before they
    # open a write transaction, so the database is not held while the mail is encoded.
    raw: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "raw", to_bytes(self))


def clean_header(value: object) -> str:
    """One safe header line: CR, LF, NUL and other controls become one space."""
    return " ".join(_UNSAFE.sub(" ", str(value)).split())


def tag(inquiry: int) -> str:
    return f"[INQ-{inquiry:06d}]"


def arabic_digits(value: object) -> str:
    return str(value).translate(ARABIC_DIGITS)


def format_date(value: datetime | None, language: str) -> str:
    """Arabic: Umm al-Qura Hijri date and Gregorian date; English: both too, Gregorian first."""
    if value is None:
        return ""
    return _date_text(value.date(), language)


@lru_cache(maxsize=256)
def _date_text(value: date, language: str) -> str:
    # Cached: every outgoing mail shows a few dates, nearly all of them today's.
    try:
        hijri = Gregorian(value.year, value.month, value.day).to_hijri()
    except (OverflowError, ValueError):  # Umm al-Qura tables cover 1343-1500 AH (1924-2077) only
        hijri = None
    if hijri is None:
        if language == "ar":
            return arabic_digits(f"{value.day} {GREGORIAN_MONTHS_AR[value.month - 1]} {value.year}م")
        return f"{value.day} {value:%B %Y}"
    if language == "ar":
        text = (
            f"{hijri.day} {hijri.month_name('ar')} {hijri.year}هـ"
            f" الموافق {value.day} {GREGORIAN_MONTHS_AR[value.month - 1]} {value.year}م"
        )
        return arabic_digits(text)
    return f"{value.day} {value:%B %Y} ({hijri.day} {hijri.month_name('en')} {hijri.year} AH)"


@lru_cache(maxsize=256)  # a batch of mails shows the same few times: now, and now plus an SLA
def format_time(value: datetime | None, language: str, zone: str = "UTC") -> str:
    """Date and time on the clock of ``zone`` (an IANA name), the zone named after it."""
    if value is None:
        return ""
    here = value.astimezone(ZoneInfo(zone))
    text = f"{format_date(here, language)} {here:%H:%M} {zone_label(zone, language)}"
    return arabic_digits(text) if language == "ar" else text


def zone_label(zone: str, language: str) -> str:
    """How a time's zone is named: Riyadh's in words, any other by its IANA name."""
    if zone == "UTC":
        return "UTC"
    label = ZONE_LABELS.get(zone)
    if label is None:
        return f"({zone})"
    return label[0] if language == "ar" else label[1]


def format_number(value: object, language: str) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return arabic_digits(value) if language == "ar" else str(value)


# How often a template's file is looked at for an admin's edit.
TEMPLATE_CHECK_SECONDS = 1.0


class _Loader(FileSystemLoader):
    """A FileSystemLoader that looks at a template file's modification time at most once
    every TEMPLATE_CHECK_SECONDS: an admin's edit still goes live within a second, and a
    worker answering hundreds of mails a second does not stat a template, its layout and
    its macros for every mail."""

    def get_source(self, environment: Environment, template: str) -> tuple[str, str, Callable[[], bool]]:
        source, filename, uptodate = super().get_source(environment, template)
        checked_at = monotonic()

        def checked_now_and_then() -> bool:
            nonlocal checked_at
            if monotonic() - checked_at < TEMPLATE_CHECK_SECONDS:
                return True
            checked_at = monotonic()
            return uptodate()

        return source, filename, checked_now_and_then


@lru_cache(maxsize=8)
def _environment(templates_dir: str) -> Environment:
    # Autoescape for .html only: the .txt parts are plain text, where "&amp;" would be wrong.
    # StrictUndefined: a misspelt variable fails loudly instead of printing nothing.
    return Environment(
        loader=_Loader(templates_dir),
        autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _context(template_id: str, language: str, context: Mapping[str, Any], rules: Rules) -> dict[str, Any]:
    values = dict(context)
    if "inquiry" not in values:
        raise ReplyError(f"template {template_id}: context needs 'inquiry' (the reference number)")
    now = values.get("now") or db.utcnow()
    department_id = values.get("department")
    department = None
    if department_id:
        try:
            department = rules.department(department_id)
        except KeyError:
            raise ReplyError(f"template {template_id}: unknown department {department_id!r}") from None
    values.update(
        language=language,
        now=now,
        tag=tag(values["inquiry"]),
        reference=f"INQ-{values['inquiry']:06d}",
        office_name=getattr(rules.office.name, language),
        office_address=rules.office.address,
        signature=list(getattr(rules.office.signature, language)),
        department_name=getattr(department.name, language) if department else None,
        sla_hours=values.get("sla_hours", department.sla_hours if department else None),
        working_hours=department is not None and not department.round_the_clock,
        direction="rtl" if language == "ar" else "ltr",
        align="right" if language == "ar" else "left",
    )
    values.setdefault("name", None)
    values.setdefault("subject", None)
    values["transactions"] = [
        {
            "number": entry["number"],
            "status": entry.get("status"),
            "label": rules.status_label(entry["status"], language) if entry.get("status") else None,
            "updated_at": entry.get("updated_at"),
        }
        for entry in values.get("transactions", ())
    ]
    return values


def _helpers(language: str, rules: Rules) -> dict[str, Any]:
    return {
        "date": lambda value: format_date(value and value.astimezone(ZoneInfo(rules.office.timezone)), language),
        "time": lambda value: format_time(value, language, rules.office.timezone),
        "num": lambda value: format_number(value, language),
        "status_label": lambda status: rules.status_label(status, language),
    }


def render(
    template_id: str,
    language: str,
    context: Mapping[str, Any],
    rules: Rules,
    templates_dir: Path,
) -> Rendered:
    """Subject, text and HTML of one template in one language (pure apart from reading files)."""
    if template_id not in TEMPLATES:
        raise ReplyError(f"unknown template {template_id!r} (expected one of: {', '.join(TEMPLATES)})")
    if language not in LANGUAGES:
        raise ReplyError(f"unknown language {language!r} (expected ar or en)")
    environment = _environment(str(templates_dir))
    values = _context(template_id, language, context, rules)
    values.update(_helpers(language, rules))
    # Admins edit templates: a missing file, a syntax error or a variable the
    # context lacks is a ReplyError naming the template, not a bare Jinja error.
    try:
        text_template = environment.get_template(f"{language}/{template_id}.txt")
        html_template = environment.get_template(f"{language}/{template_id}.html")
        subject_block = text_template.blocks.get("subject")
        if subject_block is None:
            raise ReplyError(f"{templates_dir}/{language}/{template_id}.txt has no {{% block subject %}}")
        subject = "".join(subject_block(text_template.new_context(values)))
        return Rendered(
            subject=clean_header(subject)[:MAX_SUBJECT],
            text=text_template.render(values).lstrip("\n"),  # staff mails have no greeting line
            html=html_template.render(values),
        )
    except TemplateNotFound as error:
        raise ReplyError(f"{templates_dir}/{error.name}: template file missing") from None
    except TemplateSyntaxError as error:
        raise ReplyError(f"{templates_dir}/{error.name}:{error.lineno}: {error.message}") from None
    except UndefinedError as error:
        raise ReplyError(f"template {template_id} ({language}): {error.message}") from None


def make_message_id(inquiry: int, template_id: str, rules: Rules) -> str:
    domain = rules.office.address.rpartition("@")[2]
    label = MESSAGE_ID_LABELS.get(template_id, "mail")
    return f"<inq-{inquiry:06d}.{label}.{secrets.token_hex(8)}@{domain}>"


def _message_ids(values: Sequence[str | None]) -> tuple[str, ...]:
    found: list[str] = []
    for value in values:
        for message_id in re.findall(r"<[^<>\s]+>", clean_header(value or "")):
            if message_id not in found:
                found.append(message_id)
    return tuple(found)


def thread_references(references: Sequence[str], message_id: str | None) -> tuple[str, ...]:
    """RFC 5322 3.6.4: their References plus their Message-ID; keep the first and the newest."""
    ids = _message_ids([*references, message_id])
    if len(ids) > MAX_REFERENCES:
        ids = (ids[0], *ids[-(MAX_REFERENCES - 1):])
    return ids


@lru_cache(maxsize=4096)  # the office's, the queues' and each citizen's address come back again and again
def clean_address(address: str) -> str:
    """The bare addr-spec of ``address``; ReplyError for anything else, line breaks included."""
    _, addr = parseaddr(address)
    if _UNSAFE.search(address) or addr not in address or not re.fullmatch(r"[^@\s<>\"(),;:\[\]\\]+@[^@\s<>\"(),;:\[\]\\]+\.[^@\s<>\"(),;:\[\]\\]+", addr):
        raise ReplyError(f"not a usable recipient address: {address!r}")
    return addr


def compose(
    template_id: str,
    language: str,
    context: Mapping[str, Any],
    rules: Rules,
    templates_dir: Path,
    *,
    inquiry: int,
    recipient: str,
    recipient_name: str | None = None,
    in_reply_to: str | None = None,
    references: Sequence[str] = (),
    auto_submitted: str = AUTO_REPLIED,
    reply_to: str | None = None,
) -> OutgoingMail:
    """Render ``template_id`` and address it; ``in_reply_to`` is the Message-ID of the mail answered."""
    rendered = render(template_id, language, {**context, "inquiry": inquiry}, rules, templates_dir)
    parent = _message_ids([in_reply_to])
    return OutgoingMail(
        sender_name=clean_header(getattr(rules.office.name, language)),
        sender=rules.office.address,
        recipient=clean_address(recipient),
        recipient_name=clean_header(recipient_name) if recipient_name else None,
        subject=rendered.subject,
        message_id=make_message_id(inquiry, template_id, rules),
        in_reply_to=parent[0] if parent else None,
        references=thread_references(references, parent[0] if parent else None),
        auto_submitted=auto_submitted,
        reply_to=clean_address(reply_to) if reply_to else None,
        text=rendered.text,
        html=rendered.html,
        template=template_id,
        language=language,
    )


def _address(name: str | None, addr: str) -> Address:
    username, _, domain = addr.rpartition("@")
    return Address(display_name=clean_header(name or ""), username=username, domain=domain)


def _mailbox_line(name: str, display_name: str | None, addr: str) -> str:
    """``Name: display name <addr>``: an Arabic name as one RFC 2047 word (formataddr, quick);
    a line too long for that is folded by the policy (the citizen's name is in every reply)."""
    line = f"{name}: {formataddr((clean_header(display_name or ''), addr), charset='utf-8')}"
    if len(line) <= policy.SMTP.max_line_length:
        return f"{line}\r\n"
    return fold(name, str(_address(display_name, addr)))


@lru_cache(maxsize=1024)  # the office's From and the queues' To repeat in every mail
def fold(name: str, value: str) -> str:
    """``Name: value`` as it goes on the wire, RFC 2047-encoded and folded by the stdlib."""
    if value.isascii() and len(name) + 2 + len(value) <= policy.SMTP.max_line_length:
        return f"{name}: {value}\r\n"  # what the policy gives too, without its parse (hot path)
    return policy.SMTP.header_factory(name, value).fold(policy=policy.SMTP)


def _subject_line(subject: str) -> str:
    """``Subject: ...`` with its leading ASCII words (the inquiry tag) as they are and the rest
    as UTF-8 RFC 2047 words, folded at 78 by ``email.header``: a third of the policy's time,
    and it decodes back to exactly the subject, long Arabic ones included."""
    if subject.isascii():
        return fold("Subject", subject)
    first = next(i for i, char in enumerate(subject) if not char.isascii())
    cut = subject.rfind(" ", 0, first) + 1
    header = Header(header_name="Subject", maxlinelen=policy.SMTP.max_line_length)
    if cut:
        header.append(subject[:cut], "us-ascii")
    header.append(subject[cut:], "utf-8")
    encoded = header.encode(linesep="\r\n")
    return f"Subject: {encoded}\r\n"


def _text_part(subtype: str, text: str) -> str:
    # The bytes email.mime.text.MIMEText(text, subtype, "utf-8") gives under compat32 with
    # CRLF: base64 lines of 76, which can never contain a boundary line (no run of "=").
    encoded = encodebytes(text.encode("utf-8")).decode("ascii").replace("\n", "\r\n")
    return (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\nMIME-Version: 1.0\r\n'
        f"Content-Transfer-Encoding: base64\r\n\r\n{encoded}"
    )


def _alternative(text: str, html: str) -> str:
    """multipart/alternative of the two parts, as the compat32 generator writes it, without its cost."""
    boundary = f"==============={secrets.randbelow(sys.maxsize):019d}=="
    return (
        f'Content-Type: multipart/alternative;\r\n boundary="{boundary}"\r\nMIME-Version: 1.0\r\n\r\n'
        f"--{boundary}\r\n{_text_part('plain', text)}\r\n"
        f"--{boundary}\r\n{_text_part('html', html)}\r\n"
        f"--{boundary}--\r\n"
    )


def to_bytes(mail: OutgoingMail) -> bytes:
    """The mail as sent: CRLF line ends, RFC 2047 for non-ASCII headers, base64 UTF-8 parts.

    Headers that carry names, subjects or Message-IDs are folded by ``policy.SMTP``
    (RFC 2047, no hand folding).  The two base64 parts are written out directly, in
    the exact layout of the compat32 MIME classes: their generator re-parses and
    re-scans every part, which cost more than rendering the mail.
    """
    lines = [
        _mailbox_line("From", mail.sender_name, mail.sender),
        _mailbox_line("To", mail.recipient_name, clean_address(mail.recipient)),
    ]
    if mail.reply_to:
        lines.append(_mailbox_line("Reply-To", None, clean_address(mail.reply_to)))
    lines.append(_subject_line(clean_header(mail.subject)))
    lines.append(f"Date: {format_datetime(mail.date)}\r\n")
    lines.append(fold("Message-ID", clean_header(mail.message_id)))
    if mail.in_reply_to:
        lines.append(fold("In-Reply-To", clean_header(mail.in_reply_to)))
    if mail.references:
        lines.append(fold("References", " ".join(clean_header(ref) for ref in mail.references)))
    lines.append(f"Auto-Submitted: {clean_header(mail.auto_submitted)}\r\n")
    # Asks Exchange/Outlook not to answer us with out-of-office replies (loop safety).
    lines.append("X-Auto-Response-Suppress: All\r\n")
    lines.append(f"Content-Language: {clean_header(mail.language)}\r\n")
    lines.append(_alternative(mail.text, mail.html))  # utf-8 -> base64: 7-bit safe for every relay
    return "".join(lines).encode("ascii")


def sample_context(now: datetime | None = None) -> dict[str, Any]:
    """Example data for ``mailbot preview``: every key any template uses."""
    now = now or db.utcnow()
    return {
        "inquiry": 123,
        "now": now,
        "name": "محمد العتيبي",
        "subject": "استفسار عن معاملة",
        "department": "rights",
        "due_at": now + timedelta(hours=24),
        "transactions": [{"number": "1446/00321", "status": "under_review", "updated_at": now - timedelta(days=2)}],
        "answer": "تمت دراسة طلبكم، ويرجى مراجعة الإدارة لاستلام الخطاب.\n\nمع التحية.",
        "number": "1446/00321",
        "old_status": "under_review",
        "new_status": "completed",
        "changed_at": now,
        "note": "يرجى إرسال صورة من صك الملكية.",
        "sender": "citizen@example.com",
        "sender_name": "محمد العتيبي",
        "text": "السلام عليكم،\nأرجو إفادتي عن حالة المعاملة رقم ١٤٤٦/٠٠٣٢١.",
        "received_at": now - timedelta(hours=30),
        "overdue_hours": 6,
        "claimed_by": None,
        "followup": False,
    }
