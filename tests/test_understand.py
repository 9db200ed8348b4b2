"""understand(): parsed mail + rules -> kind, language, numbers with evidence; the whole real-world corpus."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from textwrap import dedent

from mailbot.parse import ParseError, parse_mail
from mailbot.rules import Rules
from mailbot.understand import Understanding, understand

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus"


def understood(raw: str | bytes, rules: Rules) -> Understanding:
    data = dedent(raw).lstrip("\n").encode("utf-8") if isinstance(raw, str) else raw
    return understand(parse_mail(data), rules)


def test_reply_quoting_old_numbers_puts_the_new_one_first(rules: Rules) -> None:
    u = understood(
        """\
        From: Abeer <abeer@sahab.example>
        To: inquiries@emirate.example
        Subject: =?UTF-8?B?2LHYrzog2KPYsdmC2KfZhSDYp9mE2YXYudin2YXZhNin2Ko=?=
        Content-Type: text/plain; charset=utf-8

        السلام عليكم
        أبغى أستفسر عن معاملتي أنا رقم ١٤٤٦/٤٧٣٠٠ فقط، أما اللي تحت فهي لخالد.

        أُرسلت من الـ iPhone

        في الأحد، ١٢ يناير ٢٠٢٥ في ٨:٠٣ ص، كتب خالد الشهري <khalid.sh@sahab.example>:
        > 1446/00321
        > 1445/9031
        > جوالي 0557654321
        """,
        rules,
    )
    assert u.kind == "inquiry" and u.language == "ar"
    assert u.numbers == ("1446/47300", "1446/00321", "1445/9031")
    assert [(f.where, f.pattern, f.written) for f in u.transactions] == [
        ("new", "year-serial", "١٤٤٦/٤٧٣٠٠"), ("quoted", "year-serial", "1446/00321"),
        ("quoted", "year-serial", "1445/9031"),
    ]
    assert u.mail.subject == "رد: أرقام المعاملات"
    assert u.signature == "أُرسلت من الـ iPhone"
    assert u.new_text.endswith("فهي لخالد.")
    assert u.quoted_text.startswith("في الأحد")
    assert u.bounce is None and u.inquiry_tags == ()


def test_subject_number_comes_first_and_english_with_arabic_greeting(rules: Rules) -> None:
    u = understood(
        """\
        From: john@contoso.example
        Subject: Request 1446/82004
        In-Reply-To: <inq-000040.ack@emirate.example>
        Content-Type: text/plain; charset=utf-8

        السلام عليكم,

        I am asking again about my application; the old one was Transaction No. 1445/20500.
        Thank you very much for your help.

        شكراً
        """,
        rules,
    )
    assert (u.kind, u.language) == ("followup", "en")
    assert u.language_reason == "letters of the new text are mostly Latin"
    assert u.numbers == ("1446/82004", "1445/20500")
    assert u.transactions[0].where == "subject"


def test_windows_1256_html_only_outlook_reply(rules: Rules) -> None:
    html = (
        '<html dir="rtl"><body><p>أرفقت صورة البلاغ للمعاملة 1446/5521، أرجو إضافتها.</p>'
        '<div id="divRplyFwdMsg"><b>من:</b> خدمة المراجعين &lt;inquiries@emirate.example&gt;<br>'
        "<b>الموضوع:</b> [INQ-000052] تم استلام استفساركم</div>"
        "<div>المعاملة 1446/7789: قيد الدراسة</div></body></html>"
    )
    raw = (
        b"From: reem@sahab.example\nSubject: =?windows-1256?B?"
        + base64.b64encode("رد: [INQ-000052] تم استلام استفساركم".encode("cp1256"))
        + b"?=\nContent-Type: text/html; charset=windows-1256\nContent-Transfer-Encoding: 8bit\n\n"
        + html.encode("cp1256")
    )
    u = understood(raw, rules)
    assert (u.kind, u.kind_reason) == ("followup", "inquiry tag [INQ-000052] in the subject")
    assert u.inquiry_tags == ("INQ-000052",)
    assert u.language == "ar"
    assert [(f.number, f.where) for f in u.transactions] == [("1446/5521", "new"), ("1446/7789", "quoted")]


def test_bounce_language_is_its_notification_text(rules: Rules) -> None:
    u = understood(
        """\
        From: MAILER-DAEMON@mx.isp.example
        Subject: =?UTF-8?B?2YHYtNmEINin2YTYqtiz2YTZitmF?=
        Content-Type: text/plain; charset=utf-8

        تعذر تسليم رسالتك إلى العنوان التالي لأن صندوق البريد ممتلئ:
        <sultan@isp.example>:
        """,
        rules,
    )
    assert (u.kind, u.language) == ("bounce", "ar")
    assert u.bounce is not None and u.bounce.recipients == ("sultan@isp.example",)


def test_no_letters_at_all(rules: Rules) -> None:
    u = understood("From: a@b.example\nSubject: 1446/12345\n\n1446/12345\n", rules)
    assert (u.language, u.language_reason) == ("ar", "no letters at all; the office's own language")
    assert u.numbers == ("1446/12345",)


def test_sample_corpus_kinds_languages_and_numbers(rules: Rules) -> None:
    # The development corpus's answers, as a regression net (the held-out set decides quality).
    samples = CORPUS / "samples"
    wrong = []
    for line in (samples / "answers.jsonl").read_text(encoding="utf-8").splitlines():
        answer = json.loads(line)
        u = understood((samples / "mail" / answer["file"]).read_bytes(), rules)
        optional = set(answer["optional"])
        got = [n for n in u.numbers if n not in optional]
        if (u.kind, u.language, got) != (answer["kind"], answer["language"], answer["transactions"]):
            wrong.append((answer["file"], u.kind, u.language, u.numbers))
    assert wrong == []


def test_every_real_world_file_is_understood_or_refused_with_a_reason(rules: Rules) -> None:
    files = sorted(p for p in (CORPUS / "realworld").rglob("*") if p.is_file())
    assert len(files) > 500
    refused: dict[str, str] = {}
    kinds: dict[str, int] = {}
    started = time.monotonic()
    for path in files:
        try:
            u = understand(parse_mail(path.read_bytes()), rules)
        except ParseError as error:
            refused[path.name] = str(error)
            continue
        assert u.kind in ("inquiry", "followup", "clerk_reply", "auto_reply", "bulk", "bounce"), path
        assert u.language in ("ar", "en"), path
        kinds[u.kind] = kinds.get(u.kind, 0) + 1
    # Loose bound: the whole folder must finish (no hang), far below a minute each.
    assert time.monotonic() - started < 120
    assert set(refused.values()) <= {"no headers", "empty message"}
    assert len(refused) <= 10
    assert kinds["bounce"] > 200  # sisimai's bounce collection is recognised as bounces


def test_mail_forwarded_as_attachment_counts_as_quoted(rules: Rules) -> None:
    u = understood(
        """\
        From: wafa@sahab.example
        Subject: Fwd: notice
        Content-Type: multipart/mixed; boundary="m"

        --m
        Content-Type: text/plain; charset=utf-8

        وصلتني الرسالة المرفقة عن معاملتي رقم 1443/4410، هل هي منجزة؟
        --m
        Content-Type: message/rfc822
        Content-Disposition: attachment

        From: info@adl-law.example
        Subject: =?UTF-8?B?2KXYtNi52KfYsQ==?=
        Message-ID: <n1@adl-law.example>
        Content-Type: text/plain; charset=utf-8

        ملف آخر برقم 1445/61001
        --m--
        """,
        rules,
    )
    assert [(f.number, f.where) for f in u.transactions] == [("1443/4410", "new"), ("1445/61001", "quoted")]
    assert u.mail.attached_text == "ملف آخر برقم 1445/61001"
    assert u.mail.original_headers["message-id"] == "<n1@adl-law.example>"
    assert u.new_text.startswith("وصلتني") and "1445/61001" not in u.new_text
