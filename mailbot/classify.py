"""What a mail is: bounce, auto_reply, bulk, clerk_reply, followup or inquiry.

The order is SPEC "Never answer automatically": the first kind that applies wins.
Every answer carries the reason, for `mailbot triage` and the logs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mailbot.parse import ParsedMail
from mailbot.rules import Rules
from mailbot.text import normalize_arabic

BOUNCE = "bounce"
AUTO_REPLY = "auto_reply"
BULK = "bulk"
CLERK_REPLY = "clerk_reply"
FOLLOWUP = "followup"
INQUIRY = "inquiry"

INQUIRY_TAG = re.compile(r"\[(INQ-\d+)\]", re.IGNORECASE)
_DAEMONS = ("mailer-daemon", "postmaster", "mail-daemon", "mailerdaemon", "post_master", "mail.delivery.system")
# Subjects (and first lines) of delivery failures from servers that send no RFC 3464 report.
# Together with a robot origin (null return path, no or a robot From) they make a bounce.
_FAILURE_TEXT = re.compile(
    r"mail delivery (failed|failure|system)|undeliver(able|ed) (mail|message)|failure notice|"
    r"delivery status notification|returned mail|could not be delivered|error sending your mail|"
    r"invalid user address|no such user|are not member|loop alert|"
    r"メールエラー通知|送信できませんでした|配信できませんでした",
    re.IGNORECASE,
)
_ROBOT_LOCAL = re.compile(r"^(no-?reply|sysadmin|[\w.-]+-admin|mmsc)$", re.IGNORECASE)
# Amazon SES sends its delivery notifications (bounce, complaint, delivery) through SNS as JSON.
_SES_NOTICE = re.compile(r'"notificationType"\s*:\s*"(Bounce|Complaint|Delivery)"')
_HOTMAIL_COMPLAINT = re.compile(r"^\s*complaint about message from\b", re.IGNORECASE)
# The return path of each mail we send (see verp.py): the bounce names it in To or Delivered-To.
_VERP = re.compile(r"^bounces\+\d+-[0-9a-f]+@", re.IGNORECASE)
# Subjects of out-of-office notices; Arabic compared after normalisation.
_OUT_OF_OFFICE = re.compile(
    r"\b(out of (the )?office|automatic reply|auto[- ]?reply|autoreply|auto[- ]?response|"
    r"away from (the )?office|vacation reply|abwesenheitsnotiz|r[ée]ponse automatique)\b"
    r"|خارج المكتب|رد تلقائي|رد الي|الرد الالي|الرد التلقائي|رساله تلقائيه",
    re.IGNORECASE,
)
_BULK_PRECEDENCE = ("bulk", "junk", "list")
_QMAIL_RECIPIENT = re.compile(r"^<([^<>\s]+@[^<>\s]+)>:\s*$", re.MULTILINE)
_MESSAGE_ID_LINE = re.compile(r"^message-id:\s*(<[^<>\s]+>)", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Bounce:
    recipients: tuple[str, ...]  # the addresses that failed
    original_message_id: str | None  # the Message-ID of our mail that bounced
    status: str | None  # RFC 3463 status code, e.g. 5.1.1
    diagnostic: str | None
    # Candidate VERP return paths (bounces+<outbox id>-<mac>@...) the report was sent to;
    # inquiries.record_bounce checks their mac.
    return_paths: tuple[str, ...] = ()
    feedback_type: str | None = None  # set for abuse feedback reports (RFC 5965): abuse, opt-out ...


@dataclass(frozen=True)
class Kind:
    kind: str
    reason: str
    bounce: Bounce | None = None


def classify(mail: ParsedMail, rules: Rules, body: str) -> Kind:
    """The kind of ``mail``; ``body`` is its whole text (bounces quote the original there)."""
    for check in (_bounce, _auto_reply, _bulk):
        found = check(mail, body)
        if found is not None:
            return found
    clerks = {clerk.lower(): d.id for d in rules.departments for clerk in d.clerks}
    if mail.sender in clerks:
        return Kind(CLERK_REPLY, f"From {mail.sender} is a clerk of {clerks[mail.sender]}")
    tags = inquiry_tags(mail.subject)
    if tags:
        return Kind(FOLLOWUP, f"inquiry tag [{tags[0]}] in the subject")
    ours = our_message_ids(mail, rules.office.domains)
    if ours:
        return Kind(FOLLOWUP, f"In-Reply-To/References name our message {ours[0]}")
    return Kind(INQUIRY, "none of bounce, auto-reply, bulk, clerk, follow-up applies")


def inquiry_tags(subject: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(tag.upper() for tag in INQUIRY_TAG.findall(subject)))


def our_message_ids(mail: ParsedMail, domains: list[str]) -> tuple[str, ...]:
    wanted = [d.lower() for d in domains]
    ids = ((mail.in_reply_to,) if mail.in_reply_to else ()) + mail.references
    result = []
    for message_id in ids:
        domain = message_id.strip("<>").rpartition("@")[2].lower()
        if any(domain == d or domain.endswith("." + d) for d in wanted):
            result.append(message_id)
    return tuple(dict.fromkeys(result))


def _is_daemon(address: str | None) -> bool:
    return address is not None and address.partition("@")[0] in _DAEMONS


def _bounce(mail: ParsedMail, body: str) -> Kind | None:
    content_type = (mail.header("content-type") or "").lower()
    if mail.feedback_report is not None or (
        mail.content_type == "multipart/report" and "feedback-report" in content_type
    ):
        return Kind(BOUNCE, "abuse feedback report (RFC 5965)", _read_feedback(mail, body))
    if _HOTMAIL_COMPLAINT.search(mail.subject) and mail.original_headers:
        return Kind(BOUNCE, "abuse complaint with the original attached", _read_feedback(mail, body))
    if mail.delivery_status is not None or (
        mail.content_type == "multipart/report" and "delivery-status" in content_type
    ):
        return Kind(BOUNCE, "delivery-status report (RFC 3464)", _read_dsn(mail, body))
    if _is_daemon(mail.sender):
        return Kind(BOUNCE, f"sender {mail.sender} is a mailer daemon", _read_text_bounce(mail, body))
    if _is_robot_origin(mail) and _FAILURE_TEXT.search(f"{mail.subject}\n{mail.text[:2000]}"):
        return Kind(BOUNCE, "delivery failure notice from a robot sender", _read_text_bounce(mail, body))
    ses = _SES_NOTICE.search(mail.text[:10000])
    if ses and (mail.sender or "").endswith(".amazonaws.com"):
        return Kind(BOUNCE, f"Amazon SES {ses.group(1).lower()} notification", _read_text_bounce(mail, body))
    return None


def _is_robot_origin(mail: ParsedMail) -> bool:
    """A null return path (RFC 5321 4.5.5: how servers send reports), no From address, or a robot From."""
    if mail.return_path == "<>" or not mail.sender:
        return True
    return bool(_ROBOT_LOCAL.match(mail.sender.partition("@")[0]))


def _return_paths(mail: ParsedMail) -> tuple[str, ...]:
    found = [a.lower() for a in (*mail.delivered_to, *mail.to) if _VERP.match(a)]
    return tuple(dict.fromkeys(found))


def _dsn_fields(text: str) -> list[dict[str, str]]:
    groups = []
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            name, sep, value = line.partition(":")
            if sep and not line[:1].isspace():
                fields[name.strip().lower()] = value.strip()
        if fields:
            groups.append(fields)
    return groups


def _read_dsn(mail: ParsedMail, body: str) -> Bounce:
    recipients: list[str] = []
    status = diagnostic = None
    for fields in _dsn_fields(mail.delivery_status or "")[1:]:
        recipient = fields.get("final-recipient") or fields.get("original-recipient")
        if not recipient or fields.get("action", "failed").lower() not in ("failed", ""):
            continue
        recipients.append(recipient.rpartition(";")[2].strip().strip("<>").lower())
        status = status or fields.get("status")
        diagnostic = diagnostic or fields.get("diagnostic-code")
    original = mail.original_headers.get("message-id") or _message_id_in(body)
    return Bounce(tuple(dict.fromkeys(recipients)), original, status, diagnostic, _return_paths(mail))


def _read_feedback(mail: ParsedMail, body: str) -> Bounce:
    fields = (_dsn_fields(mail.feedback_report or "") or [{}])[0]
    named = fields.get("original-rcpt-to") or fields.get("removal-recipient") or mail.original_headers.get("to") or ""
    recipients = tuple(dict.fromkeys(a.lower() for a in re.findall(r"[^\s<>,;:\"]+@[^\s<>,;\"]+", named)))
    original = mail.original_headers.get("message-id") or _message_id_in(body)
    return Bounce(recipients, original, None, None, _return_paths(mail), fields.get("feedback-type") or "abuse")


def _read_text_bounce(mail: ParsedMail, body: str) -> Bounce:
    # qmail and other pre-RFC 3464 bounces: "<address>:" lines, then the original inline.
    recipients = tuple(dict.fromkeys(a.lower() for a in _QMAIL_RECIPIENT.findall(body)))
    status = re.search(r"\b([45]\.\d{1,3}\.\d{1,3})\b", body)
    original = mail.original_headers.get("message-id") or _message_id_in(body)
    return Bounce(recipients, original, status.group(1) if status else None, None, _return_paths(mail))


def _message_id_in(body: str) -> str | None:
    found = _MESSAGE_ID_LINE.search(body)
    return found.group(1) if found else None


def _auto_reply(mail: ParsedMail, body: str) -> Kind | None:
    submitted = (mail.header("auto-submitted") or "").split(";")[0].strip().lower()
    if submitted and submitted != "no":
        return Kind(AUTO_REPLY, f"Auto-Submitted: {submitted}")
    for name in ("x-autoreply", "x-autorespond", "x-auto-response-suppress"):
        value = mail.header(name)
        if value is not None and value.strip().lower() not in ("no", "false", "0"):
            return Kind(AUTO_REPLY, f"{name}: {value}")
    subject = normalize_arabic(mail.subject)
    match = _OUT_OF_OFFICE.search(subject)
    if match:
        return Kind(AUTO_REPLY, f"out-of-office subject ({match.group(0)!r})")
    return None


def _bulk(mail: ParsedMail, body: str) -> Kind | None:
    precedence = (mail.header("precedence") or "").strip().lower()
    if precedence in _BULK_PRECEDENCE:
        return Kind(BULK, f"Precedence: {precedence}")
    for name in ("list-id", "list-unsubscribe"):
        if mail.header(name) is not None:
            return Kind(BULK, f"{name} header present")
    return None
