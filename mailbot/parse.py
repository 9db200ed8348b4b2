"""Raw bytes -> ParsedMail: headers decoded, body as text, attachments as metadata only.

Charsets are taken as they come.  Citizens' mail arrives in utf-8, windows-1256 and
iso-8859-6, and often mislabelled (windows-1256 bytes declared as iso-8859-1, utf-8
declared as windows-1256, 8-bit headers without RFC 2047).  Decoding falls back
instead of failing; only a mail that cannot be read as a message at all raises
ParseError.
"""

from __future__ import annotations

import base64
import codecs
import email.header
import email.utils
import logging
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import NamedTuple

import mailparser
from mailparser.exceptions import MailParserError

from mailbot.text import html_to_text

log = logging.getLogger(__name__)
# mail-parser warns about every MIME type it does not render ("'report' not
# handled"); that is normal for bounces and would drown the triage output.
logging.getLogger("mailparser").setLevel(logging.ERROR)

CLASSIFY_HEADERS = (
    "auto-submitted",
    "precedence",
    "list-id",
    "list-unsubscribe",
    "x-autoreply",
    "x-autorespond",
    "x-auto-response-suppress",
    "content-type",
)

# Single-byte "western" labels that decode any byte sequence without error, so a
# successful decode proves nothing: Arabic windows-1256 mail is often sent under them.
_PERMISSIVE = {"ascii", "latin-1", "iso8859-1", "cp1252"}
# Encodings whose bytes are not ASCII-compatible: the label must be believed.
_WIDE = {"utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be", "iso2022_jp", "iso2022_kr",
         "hz", "utf-7"}
_ARABIC_FALLBACK = "cp1256"
_SPACE = re.compile(r"\s+")
_HIGH_WORD = re.compile(rb"[\x80-\xff]{2,}")
_HIGH_BYTE = re.compile(rb"[\x80-\xff]")

# Mails above this size are parsed from a slim copy (see slim_copy): a scanned document
# of 200 KB made the parse (and mail-parser's copy of its payload) cost more than the
# rest of the pipeline.  Below it the mail is parsed as it is.
SLIM_ABOVE = 128 * 1024
# A base64 body at least this long, of a non-text leaf part, is left out of the slim copy.
_ELIDE_AT_LEAST = 64 * 1024
_BLANK_LINE = re.compile(rb"\n\r?\n")
_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/=\r\n]*")
_HEADER_LINE = re.compile(rb"(?:[!-9;-~]+:.*|[ \t].*)")
_HEADERS_AT_MOST = 64 * 1024


class ParseError(Exception):
    """The bytes are not a readable mail message."""


class Attachment(NamedTuple):
    """An attachment's metadata; its bytes stay in the archived raw mail."""

    filename: str
    content_type: str
    size: int


@dataclass(frozen=True)
class ParsedMail:
    message_id: str | None
    subject: str
    sender: str | None  # lower-cased address from From:
    sender_name: str
    to: tuple[str, ...]
    cc: tuple[str, ...]
    reply_to: tuple[str, ...]
    delivered_to: tuple[str, ...]  # Delivered-To and X-Original-To, in header order
    date: datetime | None
    in_reply_to: str | None
    references: tuple[str, ...]
    auth_results: tuple[str, ...]
    headers: dict[str, str]  # the CLASSIFY_HEADERS present, lower-case names, decoded values
    content_type: str
    text: str
    html: str | None
    text_from_html: bool  # the mail had no text/plain part; text was rendered from html
    attached_text: str  # text of mails attached whole (message/rfc822): forwards, bounced originals
    attachments: tuple[Attachment, ...]
    # For bounces (RFC 3464): the message/delivery-status part as text, and the
    # headers of the returned original (message/rfc822 or text/rfc822-headers).
    delivery_status: str | None
    original_headers: dict[str, str]
    # For abuse feedback reports (RFC 5965): the message/feedback-report part as text.
    feedback_report: str | None
    return_path: str | None

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def decode_bytes(data: bytes, declared: str | None = None) -> str:
    """Text from bytes under a possibly wrong charset label; never raises."""
    charset = _codec(declared)
    if not _HIGH_BYTE.search(data) and charset not in _WIDE:
        return data.decode("ascii", "replace")
    # Valid multi-byte utf-8 is very unlikely to be accidental, whatever the label says.
    if charset not in _WIDE:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            pass
    if charset and charset not in _PERMISSIVE and charset != "utf-8":
        try:
            return data.decode(charset)
        except UnicodeDecodeError:
            pass
    if _looks_arabic_single_byte(data):
        return data.decode(_ARABIC_FALLBACK, "replace")
    if charset in _PERMISSIVE:
        return data.decode("cp1252" if charset == "ascii" else charset, "replace")
    return data.decode(_ARABIC_FALLBACK, "replace")


def _codec(label: str | None) -> str:
    """Python's name for a charset label; "" when absent or unknown."""
    try:
        return codecs.lookup((label or "").strip().strip('"')).name if label else ""
    except (LookupError, ValueError):
        return ""


def _looks_arabic_single_byte(data: bytes) -> bool:
    # Arabic words in a single-byte charset are runs of high bytes; European text
    # has an accented letter here and there between ASCII letters.
    high = len(_HIGH_BYTE.findall(data))
    in_words = sum(len(word) for word in _HIGH_WORD.findall(data))
    return high > 0 and in_words / high >= 0.7


def _unescape(value: str) -> str:
    # compat32 keeps raw 8-bit header bytes as surrogate escapes.
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return decode_bytes(value.encode("ascii", "surrogateescape"))


def decode_header(value: str | None) -> str:
    """An unstructured header as one line of text (RFC 2047 words decoded)."""
    if value is None:
        return ""
    value = _unescape(str(value))
    if "=?" in value:
        try:
            chunks = email.header.decode_header(value)
        except (ValueError, LookupError, AssertionError):
            chunks = [(value, None)]
        value = "".join(
            chunk if isinstance(chunk, str) else decode_bytes(chunk, charset)
            for chunk, charset in chunks
        )
    return _SPACE.sub(" ", value).strip()


def _all(message: Message, name: str) -> list[str]:
    # Raw stored values: compat32's get() wraps 8-bit (RFC 6532) headers in a
    # Header object whose str() has lost the bytes.  NUL is never meaningful in
    # mail text, and PostgreSQL text columns cannot hold it.
    return [str(value).replace("\x00", "") for key, value in message.raw_items() if key.lower() == name]


def _first(message: Message, name: str) -> str | None:
    values = _all(message, name)
    return values[0] if values else None


def _addresses(message: Message, *names: str) -> list[tuple[str, str]]:
    values = [_unescape(v) for name in names for v in _all(message, name)]
    pairs = email.utils.getaddresses(values)
    return [(decode_header(name), addr.strip().lower()) for name, addr in pairs if "@" in addr]


def _message_ids(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    found = re.findall(r"<[^<>\s]+>", value)
    return tuple(found) if found else tuple(value.split())


def _date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(decode_header(value))
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        # RFC 5322 "-0000": time is UTC, local offset unknown.
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed


def _part_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    return decode_bytes(payload, part.get_content_charset()).replace("\x00", "")


def _filename(part: Message) -> str | None:
    name = part.get_filename()
    return decode_header(name) if name else None


def _message(raw: bytes) -> Message:
    try:
        return mailparser.parse_from_bytes(raw).message
    except (AttributeError, TypeError, ValueError, IndexError, LookupError) as error:
        # mail-parser's own post-processing trips on some real bounces (e.g. a
        # multipart without a boundary parameter); the stdlib tree it builds
        # first is still good, so read that.
        log.info("mail-parser failed, reading with the stdlib: %r", error)
        return email.message_from_bytes(raw)


def slim_copy(raw: bytes) -> tuple[bytes, dict[bytes, int]]:
    """``raw`` with the large base64 bodies of non-text leaf parts replaced by short
    markers, and {decoded marker: decoded size of the body it replaced}.

    The stdlib parser (and mail-parser, which wraps it) keeps a body as a list of
    lines and then joins and decodes it: ~8 times the mail's size at the peak, over
    200 MB for one 25 MB attachment.  Attachments are only metadata here, so their
    bytes need not be parsed at all: the part's headers are read, and the decoded
    size is counted from the base64 text in place.  Anything that does not look
    exactly like such a body (text parts, other encodings, stray characters, odd
    padding) is kept as it is, so the parse gives what the whole mail would.
    """
    nonce = secrets.token_hex(8)
    elided: dict[bytes, int] = {}
    pieces: list[bytes] = []
    kept_up_to = 0
    for blank in _BLANK_LINE.finditer(raw):
        start = blank.end()
        if start < kept_up_to:
            continue
        # The body ends where the MIME parser ends it: at a boundary line, or the mail's end.
        end = raw.find(b"\n--", start) + 1 or len(raw)
        if end - start < _ELIDE_AT_LEAST or not _BASE64_TEXT.fullmatch(raw, start, end):
            continue
        size = _base64_size(raw, start, end)
        if size is None or not _is_boundary(raw, end) or not _elidable(_part_headers(raw, blank.start())):
            continue
        marker = f"mailbot elided part {nonce} {len(elided)}".encode()
        elided[marker] = size
        pieces += [raw[kept_up_to:start], base64.b64encode(marker), b"\n"]
        kept_up_to = end
    if not elided:
        return raw, elided
    pieces.append(raw[kept_up_to:])
    return b"".join(pieces), elided


def _is_boundary(raw: bytes, line: int) -> bool:
    """Whether the line at ``line`` is the end of the mail or a boundary declared before it
    (any other "--" line would be body text to the MIME parser)."""
    if line == len(raw):
        return True
    eol = raw.find(b"\n", line)
    token = raw[line + 2 : eol if eol >= 0 else len(raw)].rstrip(b" \t\r").removesuffix(b"--")
    declared = re.compile(rb'boundary\s*=\s*"?' + re.escape(token) + rb'(?:"|[\s;]|$)', re.IGNORECASE | re.MULTILINE)
    return bool(token) and declared.search(raw, 0, line) is not None


def _part_headers(raw: bytes, body_break: int) -> Message | None:
    """The header block ending at ``body_break`` (its blank line): from the previous
    boundary line or blank line (an attached mail's headers), else the mail's start."""
    floor = max(0, body_break - _HEADERS_AT_MOST)
    boundary = raw.rfind(b"\n--", floor, body_break)
    blank = max(raw.rfind(b"\n\n", floor, body_break), raw.rfind(b"\n\r\n", floor, body_break))
    if boundary < 0 and blank < 0 and floor > 0:
        return None
    start = 0
    if boundary >= 0:
        start = raw.find(b"\n", boundary + 1) + 1
    if blank >= 0:
        start = max(start, raw.find(b"\n", blank + 1) + 1)
    block = raw[start:body_break]
    if not block or not all(_HEADER_LINE.fullmatch(line.rstrip(b"\r")) for line in block.split(b"\n")):
        return None
    return BytesHeaderParser(policy=compat32).parsebytes(block)


def _elidable(headers: Message | None) -> bool:
    return (
        headers is not None
        and headers.get_content_maintype() not in ("text", "multipart", "message")
        and str(headers.get("content-transfer-encoding", "")).strip().lower() == "base64"
    )


def _base64_size(raw: bytes, start: int, end: int) -> int | None:
    """Decoded size of the base64 lines raw[start:end]; None unless well-formed
    (whole quanta, padding only at the end), where decoders could differ."""
    chars = end - start - raw.count(b"\n", start, end) - raw.count(b"\r", start, end)
    tail = raw[max(start, end - 8):end].rstrip(b"\r\n")
    padding = len(tail) - len(tail.rstrip(b"="))
    if chars % 4 or padding > 2 or raw.count(b"=", start, end) != padding:
        return None
    return chars // 4 * 3 - padding


def parse_mail(raw: bytes) -> ParsedMail:
    if not raw or raw.isspace():  # not raw.strip(): that copies a 25 MB mail
        raise ParseError("empty message")
    source, elided = slim_copy(raw) if len(raw) > SLIM_ABOVE else (raw, {})
    try:
        message = _message(source)
    except (MailParserError, RecursionError) as error:
        raise ParseError(f"unreadable MIME structure: {error}") from error
    if message is None or not message.keys():
        raise ParseError("no headers")

    parts = _Parts(elided=elided)
    try:
        _walk(message, parts, in_attachment=False, in_mail=False)
        delivery_status = _report_part(message, "message/delivery-status")
        feedback_report = _report_part(message, "message/feedback-report")
    except RecursionError as error:
        raise ParseError("MIME nesting too deep") from error
    # Some clients send an empty text/plain beside the real HTML body.
    plain = [text for text in parts.plain if text.strip()]
    html_text = "\n\n".join(parts.html) if parts.html else None
    text = "\n\n".join(plain) if plain else (html_to_text(html_text) if html_text else "")

    senders = _addresses(message, "from")
    sender_name, sender = senders[0] if senders else ("", None)
    headers = {
        name: decode_header(_first(message, name)) for name in CLASSIFY_HEADERS if _first(message, name) is not None
    }
    return ParsedMail(
        message_id=decode_header(_first(message, "message-id")) or None,
        subject=decode_header(_first(message, "subject")),
        sender=sender,
        sender_name=sender_name,
        to=tuple(a for _, a in _addresses(message, "to")),
        cc=tuple(a for _, a in _addresses(message, "cc")),
        reply_to=tuple(a for _, a in _addresses(message, "reply-to")),
        delivered_to=tuple(a for _, a in _addresses(message, "delivered-to", "x-original-to")),
        date=_date(_first(message, "date")),
        in_reply_to=(_message_ids(decode_header(_first(message, "in-reply-to"))) or (None,))[0],
        references=_message_ids(decode_header(_first(message, "references"))),
        auth_results=tuple(decode_header(v) for v in _all(message, "authentication-results")),
        headers=headers,
        content_type=message.get_content_type(),
        text=text.replace("\r\n", "\n"),
        html=html_text,
        text_from_html=not plain and html_text is not None,
        attached_text=_attached_text(parts),
        attachments=tuple(parts.attachments),
        delivery_status=delivery_status,
        original_headers=parts.original_headers,
        feedback_report=feedback_report,
        return_path=(_message_ids(decode_header(_first(message, "return-path"))) or (None,))[0],
    )


@dataclass
class _Parts:
    """What one walk over the MIME tree collects."""

    plain: list[str] = field(default_factory=list)
    html: list[str] = field(default_factory=list)
    attached_plain: list[str] = field(default_factory=list)  # inside attached mails (message/rfc822)
    attached_html: list[str] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    original_headers: dict[str, str] = field(default_factory=dict)
    elided: dict[bytes, int] = field(default_factory=dict)  # from slim_copy


def _walk(part: Message, parts: _Parts, *, in_attachment: bool, in_mail: bool) -> None:
    content_type = part.get_content_type()
    disposition = part.get_content_disposition()
    filename = _filename(part)
    if content_type in ("message/rfc822", "text/rfc822-headers"):
        _read_original_headers(part, parts.original_headers)
    if part.is_multipart():
        attached = in_attachment or (disposition == "attachment" and content_type != "message/rfc822")
        for child in part.get_payload():
            if isinstance(child, Message):
                _walk(child, parts, in_attachment=attached, in_mail=in_mail or content_type == "message/rfc822")
        return
    if content_type in ("text/plain", "text/html") and not filename and disposition != "attachment":
        if in_mail:
            (parts.attached_plain if content_type == "text/plain" else parts.attached_html).append(_part_text(part))
        elif not in_attachment:
            (parts.plain if content_type == "text/plain" else parts.html).append(_part_text(part))
        return
    if content_type in ("message/delivery-status", "message/feedback-report", "text/rfc822-headers"):
        return
    payload = part.get_payload(decode=True)
    size = parts.elided.get(payload, len(payload)) if isinstance(payload, bytes) else 0
    del payload  # a 25 MB attachment must not outlive this loop
    parts.attachments.append(Attachment(filename or "", content_type, size))


def _attached_text(parts: _Parts) -> str:
    texts = parts.attached_plain or [html_to_text(h) for h in parts.attached_html]
    return "\n\n".join(texts).replace("\r\n", "\n").strip()


def _read_original_headers(part: Message, into: dict[str, str]) -> None:
    if into:
        return
    payload = part.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        source = payload[0]
    elif isinstance(payload, str):
        source = email.message_from_string(_unescape(payload).lstrip())
    else:
        return
    for name in ("message-id", "from", "to", "subject", "date"):
        value = _first(source, name)
        if value is not None:
            into[name] = decode_header(value)


def _report_part(message: Message, content_type: str) -> str | None:
    """The first ``content_type`` part (delivery-status, feedback-report) as ``name: value`` lines."""
    for part in message.walk():
        if part.get_content_type() != content_type:
            continue
        # compat32 parses delivery-status into one Message per field group, other message/* into one.
        payload = part.get_payload()
        if isinstance(payload, list):
            blocks = ["\n".join(f"{k}: {_unescape(str(v))}" for k, v in block.items()) for block in payload]
            return "\n\n".join(blocks)
        if isinstance(payload, str):
            return _unescape(payload)
    return None
