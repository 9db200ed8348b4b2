"""parse_mail: real bytes in, ParsedMail out; charsets as they come, never a crash."""

from __future__ import annotations

import base64
import quopri
import resource
from datetime import datetime, timedelta, timezone
from email import policy
from email.header import Header
from email.message import EmailMessage
from pathlib import Path
from textwrap import dedent

import mailparser
import pytest

from mailbot import parse
from mailbot.parse import ParseError, decode_bytes, parse_mail

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus"
ARABIC = "السلام عليكم، أرجو إفادتي عن المعاملة رقم 1446/61234 الخاصة بمطالبة مالية."


def mail(headers: str, body: bytes = b"", *, crlf: bool = False) -> bytes:
    head = dedent(headers).strip("\n").encode("utf-8")
    raw = head + b"\n\n" + body
    return raw.replace(b"\n", b"\r\n") if crlf else raw


def test_plain_utf8_mail_headers_and_body() -> None:
    raw = mail(
        """
        Return-Path: <ahmed@sahab.example>
        Delivered-To: inquiries@emirate.example
        X-Original-To: rights@emirate.example
        Authentication-Results: mx.emirate.example; dmarc=pass header.from=sahab.example
        Authentication-Results: relay.other.example; dmarc=fail
        From: =?UTF-8?B?2KPYrdmF2K8g2KfZhNmC2K3Yt9in2YbZig==?= <Ahmed.AlQahtani@Sahab.Example>
        To: Rights <RIGHTS@emirate.example>, inquiries@emirate.example
        Cc: brother@sahab.example
        Reply-To: other@sahab.example
        Subject: =?UTF-8?B?2KfYs9iq2YHYs9in2LEg2LnZhiDZhdi52KfZhdmE2Kk=?=
        Date: Sun, 12 Jan 2025 10:15:00 +0300
        Message-ID: <abc.123@sahab.example>
        In-Reply-To: <old.1@emirate.example>
        References: <first@emirate.example>
         <old.1@emirate.example>
        Auto-Submitted: no
        Precedence: list
        List-Id: <news.example>
        Content-Type: text/plain; charset="utf-8"
        Content-Transfer-Encoding: 8bit
        """,
        ARABIC.encode("utf-8"),
    )
    parsed = parse_mail(raw)
    assert parsed.message_id == "<abc.123@sahab.example>"
    assert parsed.subject == "استفسار عن معاملة"
    assert parsed.sender == "ahmed.alqahtani@sahab.example"
    assert parsed.sender_name == "أحمد القحطاني"
    assert parsed.to == ("rights@emirate.example", "inquiries@emirate.example")
    assert parsed.cc == ("brother@sahab.example",)
    assert parsed.reply_to == ("other@sahab.example",)
    assert parsed.delivered_to == ("inquiries@emirate.example", "rights@emirate.example")
    assert parsed.date == datetime(2025, 1, 12, 7, 15, tzinfo=timezone.utc)
    assert parsed.date.utcoffset() == timedelta(hours=3)
    assert parsed.in_reply_to == "<old.1@emirate.example>"
    assert parsed.references == ("<first@emirate.example>", "<old.1@emirate.example>")
    assert parsed.auth_results == (
        "mx.emirate.example; dmarc=pass header.from=sahab.example",
        "relay.other.example; dmarc=fail",
    )
    assert parsed.header("Auto-Submitted") == "no"
    assert parsed.header("precedence") == "list"
    assert parsed.header("list-id") == "<news.example>"
    assert parsed.header("x-autoreply") is None
    assert parsed.return_path == "<ahmed@sahab.example>"
    assert parsed.text == ARABIC
    assert parsed.html is None and parsed.attachments == ()


def test_windows_1256_base64_body_and_rfc2047_b_subject() -> None:
    subject = Header("مطالبة مالية", "windows-1256").encode()
    raw = mail(
        f"""
        From: =?windows-1256?B?{base64.b64encode("ماجد السبيعي".encode("cp1256")).decode()}?= <majed@outlook.example>
        Subject: {subject}
        Content-Type: text/plain; charset="windows-1256"
        Content-Transfer-Encoding: base64
        """,
        base64.encodebytes(ARABIC.encode("cp1256")),
    )
    parsed = parse_mail(raw)
    assert subject.startswith("=?windows-1256?b?") or subject.startswith("=?windows-1256?B?")
    assert parsed.subject == "مطالبة مالية"
    assert parsed.sender_name == "ماجد السبيعي"
    assert parsed.text == ARABIC


def test_windows_1256_quoted_printable_body_and_q_subject() -> None:
    encoded = quopri.encodestring("سبب رفض المعاملة".encode("cp1256"), header=True).decode()
    raw = mail(
        f"""
        From: turki@sahab.example
        Subject: =?windows-1256?Q?{encoded}?=
        Content-Type: text/plain; charset=windows-1256
        Content-Transfer-Encoding: quoted-printable
        """,
        quopri.encodestring(ARABIC.encode("cp1256")),
        crlf=True,
    )
    parsed = parse_mail(raw)
    assert parsed.subject == "سبب رفض المعاملة"
    assert parsed.text == ARABIC


def test_iso_8859_6_body() -> None:
    text = "السلام عليكم المعاملة 1446/12345"
    raw = mail("From: a@b.example\nContent-Type: text/plain; charset=iso-8859-6\nContent-Transfer-Encoding: 8bit",
               text.encode("iso-8859-6"))
    assert parse_mail(raw).text == text


@pytest.mark.parametrize("label", ["iso-8859-1", "us-ascii", "windows-1252", ""])
def test_windows_1256_bytes_under_a_western_or_missing_label(label: str) -> None:
    content_type = f"text/plain; charset={label}" if label else "text/plain"
    raw = mail(f"From: a@b.example\nContent-Type: {content_type}\nContent-Transfer-Encoding: 8bit",
               ARABIC.encode("cp1256"))
    assert parse_mail(raw).text == ARABIC


def test_utf8_bytes_labelled_windows_1256() -> None:
    raw = mail("From: a@b.example\nContent-Type: text/plain; charset=windows-1256\nContent-Transfer-Encoding: 8bit",
               ARABIC.encode("utf-8"))
    assert parse_mail(raw).text == ARABIC


def test_unknown_charset_label_falls_back() -> None:
    raw = mail("From: a@b.example\nContent-Type: text/plain; charset=x-no-such-charset\n"
               "Content-Transfer-Encoding: 8bit", ARABIC.encode("utf-8"))
    assert parse_mail(raw).text == ARABIC


def test_latin_1_text_stays_latin_1() -> None:
    text = "Bonjour, la référence est 1446/12345. Merci beaucoup, André."
    raw = mail("From: a@b.example\nContent-Type: text/plain; charset=iso-8859-1\nContent-Transfer-Encoding: 8bit",
               text.encode("latin-1"))
    assert parse_mail(raw).text == text


def test_decode_bytes_never_raises_on_garbage() -> None:
    garbage = bytes(range(256)) * 3
    for label in (None, "utf-8", "windows-1256", "iso-8859-6", "bogus", "utf-16"):
        assert isinstance(decode_bytes(garbage, label), str)


def test_raw_8bit_headers_rfc6532_and_windows_1256() -> None:
    raw = (
        "From: هدى الشمري <huda@icloud.example>\nSubject: متابعة المطالبة ١٤٤٥/٧٠٠٠١\n".encode("utf-8")
        + "X-Note: x\nTo: ".encode() + "إمارة".encode("cp1256") + b" <inquiries@emirate.example>\n"
        + b"Content-Type: text/plain; charset=utf-8\n\nbody\n"
    )
    parsed = parse_mail(raw)
    assert parsed.sender_name == "هدى الشمري"
    assert parsed.subject == "متابعة المطالبة ١٤٤٥/٧٠٠٠١"
    assert parsed.to == ("inquiries@emirate.example",)


def test_multiline_encoded_subject_is_one_line() -> None:
    raw = mail(
        """
        From: a@b.example
        Subject: =?UTF-8?B?2LfZhNioINiy2YrYp9ix2Kk=?=
         =?UTF-8?B?INiz2KzZitmG?=
        """,
        b"x",
    )
    assert parse_mail(raw).subject == "طلب زيارة سجين"


def test_html_only_mail_is_converted_with_a_parser() -> None:
    html = (
        '<html dir="rtl"><head><style>p {color: red}</style></head><body>'
        "<p>السلام&nbsp;عليكم</p><div>رقم المعاملة <b>1446/5521</b><br>شكراً</div>"
        "<script>var x = '1446/99999';</script></body></html>"
    )
    raw = mail("From: a@b.example\nContent-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: base64",
               base64.encodebytes(html.encode()))
    parsed = parse_mail(raw)
    assert parsed.text_from_html
    assert parsed.html == html
    lines = [line for line in parsed.text.split("\n") if line]
    assert lines == ["السلام عليكم", "رقم المعاملة 1446/5521", "شكراً"]


def test_alternative_prefers_text_plain_and_keeps_html() -> None:
    raw = mail(
        """
        From: a@b.example
        Content-Type: multipart/alternative; boundary="b1"
        """,
        dedent(
            """\
            --b1
            Content-Type: text/plain; charset=utf-8

            plain version
            --b1
            Content-Type: text/html; charset=utf-8

            <p>html version</p>
            --b1--
            """
        ).encode(),
    )
    parsed = parse_mail(raw)
    assert parsed.text.strip() == "plain version"
    assert parsed.html is not None and "html version" in parsed.html
    assert not parsed.text_from_html


def test_attachments_are_metadata_only_with_rfc2231_arabic_name() -> None:
    pdf = b"%PDF-1.4\n" + bytes(1000)
    raw = mail(
        """
        From: a@b.example
        Content-Type: multipart/mixed; boundary="m"
        """,
        (
            "--m\nContent-Type: text/plain; charset=utf-8\n\nمرفق المخطط\n"
            "--m\nContent-Type: application/pdf\n"
            "Content-Disposition: attachment; filename*=utf-8''%D9%85%D8%AE%D8%B7%D8%B7.pdf\n"
            "Content-Transfer-Encoding: base64\n\n"
        ).encode()
        + base64.encodebytes(pdf)
        + b"--m\nContent-Type: image/jpeg; name=photo.jpg\nContent-Disposition: inline; filename=photo.jpg\n"
        + b"Content-Transfer-Encoding: base64\n\n" + base64.encodebytes(b"\xff\xd8\xff" + bytes(50)) + b"--m--\n",
    )
    parsed = parse_mail(raw)
    assert parsed.text.strip() == "مرفق المخطط"
    assert [(a.filename, a.content_type, a.size) for a in parsed.attachments] == [
        ("مخطط.pdf", "application/pdf", len(pdf)),
        ("photo.jpg", "image/jpeg", 53),
    ]


def test_25_mb_attachment_keeps_memory_sane() -> None:
    payload = base64.encodebytes(bytes(range(256)) * (25 * 1024 * 1024 // 256))
    raw = (
        b"From: a@b.example\nContent-Type: multipart/mixed; boundary=m\n\n--m\nContent-Type: text/plain\n\nhi\n"
        b"--m\nContent-Type: application/octet-stream\nContent-Disposition: attachment; filename=big.bin\n"
        b"Content-Transfer-Encoding: base64\n\n" + payload + b"--m--\n"
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    parsed = parse_mail(raw)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert parsed.attachments[0].size == 25 * 1024 * 1024
    # The raw mail is ~34 MB; the parse may hold a few copies at once, never dozens.
    assert grown_mb < 250, f"parsing grew peak memory by {grown_mb:.0f} MB"
    assert all(not hasattr(a, "payload") for a in parsed.attachments)


def documents_mail(attachment: bytes, *, crlf: bool = False) -> bytes:
    """An Arabic mail with a PDF of the given bytes, a small photo and a forwarded mail with its own PDF."""
    forwarded = EmailMessage(policy=policy.SMTP)
    forwarded["From"] = "office@other.example"
    forwarded["Subject"] = "نسخة الطلب"
    forwarded.set_content("نص الرسالة المحولة")
    forwarded.add_attachment(attachment[: len(attachment) // 3], maintype="application", subtype="pdf",
                             filename="طلب.pdf")
    message = EmailMessage(policy=policy.SMTP if crlf else policy.default)
    message["From"] = "مواطن <citizen@example.com>"
    message["To"] = "inquiries@emirate.example"
    message["Subject"] = "مستندات المعاملة 1446/00321"
    message["Message-ID"] = "<docs@example.com>"
    message.set_content(ARABIC)
    message.add_attachment(attachment, maintype="application", subtype="pdf", filename="كل المستندات.pdf")
    message.add_attachment(b"\xff\xd8\xff" + bytes(50), maintype="image", subtype="jpeg", filename="photo.jpg")
    message.add_attachment(forwarded)
    return message.as_bytes()


def test_25_mb_attachment_mail_parses_like_a_small_one() -> None:
    big_pdf = bytes(range(256)) * (25 * 1024 * 1024 // 256) + b"%%EOF"
    big, small = parse_mail(documents_mail(big_pdf)), parse_mail(documents_mail(b"%PDF-1.4 small %%EOF"))
    assert [(a.filename, a.content_type) for a in big.attachments] == [
        (a.filename, a.content_type) for a in small.attachments
    ] == [("كل المستندات.pdf", "application/pdf"), ("photo.jpg", "image/jpeg"), ("طلب.pdf", "application/pdf")]
    assert [a.size for a in big.attachments] == [len(big_pdf), 53, len(big_pdf) // 3]
    assert big.text == small.text and big.text.strip() == ARABIC
    assert big.attached_text == small.attached_text == "نص الرسالة المحولة"
    assert (big.subject, big.sender, big.message_id, big.content_type) == (
        small.subject, small.sender, small.message_id, small.content_type
    ) == ("مستندات المعاملة 1446/00321", "citizen@example.com", "<docs@example.com>", "multipart/mixed")


@pytest.mark.parametrize("crlf", [False, True])
@pytest.mark.parametrize("blocks", [800, 8000], ids=["200KB-scan", "2MB"])
def test_slim_parse_of_a_large_mail_equals_the_whole_parse(crlf: bool, blocks: int,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    raw = documents_mail(bytes(range(256)) * blocks, crlf=crlf)
    assert len(raw) > parse.SLIM_ABOVE
    slim, elided = parse.slim_copy(raw)
    assert sorted(elided.values()) == [256 * blocks // 3, 256 * blocks] and len(slim) < 10_000
    parsed = parse_mail(raw)
    monkeypatch.setattr(parse, "SLIM_ABOVE", len(raw))
    assert parsed == parse_mail(raw)


def test_slim_copy_keeps_what_it_cannot_count_exactly() -> None:
    text = base64.encodebytes(("سطر عربي طويل " * 20_000).encode())  # a text part: its words are the body
    odd = base64.encodebytes(bytes(300_000))[:-3] + b"\n"  # a broken last quantum: let the parser decide
    padded = base64.encodebytes(b"ab") * 40_000  # padding inside: decoders disagree
    dashes = base64.encodebytes(bytes(300_000)) + b"--not the boundary\n"  # body text to the parser
    for content_type, body in (("text/plain; charset=utf-8", text), ("application/pdf", odd),
                               ("application/pdf", dashes), ("application/pdf", padded)):
        raw = (
            b"From: a@b.example\nContent-Type: multipart/mixed; boundary=m\n\n--m\nContent-Type: "
            + content_type.encode() + b"\nContent-Transfer-Encoding: base64\n\n" + body + b"--m--\n"
        )
        assert parse.slim_copy(raw) == (raw, {})
    assert parse_mail(raw).attachments[0].size == len(base64.decodebytes(padded))


def test_dsn_parts_for_the_bounce_parser() -> None:
    raw = mail(
        """
        From: MAILER-DAEMON@out.emirate.example (Mail Delivery System)
        Subject: Undelivered Mail Returned to Sender
        Content-Type: multipart/report; report-type=delivery-status; boundary="r"
        """,
        dedent(
            """\
            --r
            Content-Type: text/plain

            I'm sorry to have to inform you that your message could not be delivered.
            --r
            Content-Type: message/delivery-status

            Reporting-MTA: dns; out.emirate.example

            Final-Recipient: rfc822; old@dead.example
            Action: failed
            Status: 5.1.1
            --r
            Content-Type: text/rfc822-headers

            From: inquiries@emirate.example
            Message-ID: <inq-000058.ack@emirate.example>
            Subject: [INQ-000058] received
            --r--
            """
        ).encode(),
    )
    parsed = parse_mail(raw)
    assert parsed.sender == "mailer-daemon@out.emirate.example"
    assert parsed.content_type == "multipart/report"
    assert "Final-Recipient: rfc822; old@dead.example" in parsed.delivery_status
    assert parsed.original_headers["message-id"] == "<inq-000058.ack@emirate.example>"
    assert parsed.text.startswith("I'm sorry")
    assert parsed.attachments == ()


def test_missing_and_bad_dates() -> None:
    assert parse_mail(mail("From: a@b.example", b"x")).date is None
    assert parse_mail(mail("From: a@b.example\nDate: yesterday-ish", b"x")).date is None
    naive = parse_mail(mail("From: a@b.example\nDate: Sun, 12 Jan 2025 10:15:00 -0000", b"x")).date
    assert naive == datetime(2025, 1, 12, 10, 15, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty message"),
        (b"   \r\n\r\n  ", "empty message"),
        (b"just some text without any header line at all", "no headers"),
    ],
)
def test_unreadable_input_raises_parse_error(raw: bytes, reason: str) -> None:
    with pytest.raises(ParseError, match=f"^{reason}$"):
        parse_mail(raw)


def test_deep_nesting_is_a_parse_error_not_a_crash() -> None:
    depth = 3000
    head = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\n\n--b%d\n" % (i, i) for i in range(depth))
    with pytest.raises(ParseError, match="MIME"):
        parse_mail(b"From: a@b.example\n" + head + b"Content-Type: text/plain\n\nx\n")


def test_mail_parser_failure_falls_back_to_the_stdlib_tree() -> None:
    # mail-parser's own post-processing raises AttributeError on this real SendGrid bounce.
    path = CORPUS / "realworld" / "sisimai-set-of-emails" / "bsd" / "lhost-sendgrid-01.eml"
    with pytest.raises(AttributeError):
        mailparser.parse_from_bytes(path.read_bytes())
    parsed = parse_mail(path.read_bytes())
    assert parsed.subject == "Undelivered Mail Returned to Sender"
    assert parsed.sender == "mailer-daemon@nijo.example.jp"
    assert parsed.delivery_status is not None


def test_empty_text_part_beside_html_uses_the_html() -> None:
    raw = mail(
        'From: a@b.example\nContent-Type: multipart/alternative; boundary="b"',
        b'--b\nContent-Type: text/plain\n\n \n--b\nContent-Type: text/html; charset=utf-8\n\n'
        + "<p>رقم المعاملة 1446/5521</p>".encode() + b"\n--b--\n",
    )
    parsed = parse_mail(raw)
    assert parsed.text_from_html
    assert parsed.text == "رقم المعاملة 1446/5521"
