"""reply.py: templates in Arabic and English, headers that cannot be injected, real MIME bytes."""

from __future__ import annotations

import os
import re
import shutil
from datetime import datetime, timedelta, timezone
from email import message_from_bytes, policy
from email.header import decode_header, make_header
from email.parser import BytesParser
from email.policy import compat32
from email.utils import parseaddr

import pytest
from click.testing import CliRunner

from mailbot import reply
from mailbot.cli import cli
from mailbot.settings import SHIPPED_TEMPLATES

NOW = datetime(2026, 11, 23, 9, 30, tzinfo=timezone.utc)  # 13 Jumada al-Akhirah 1448 (Umm al-Qura)


def context(**overrides: object) -> dict[str, object]:
    values = reply.sample_context(NOW)
    values.update(overrides)
    return values


@pytest.mark.parametrize("language", reply.LANGUAGES)
@pytest.mark.parametrize("template_id", reply.TEMPLATES)
def test_every_template_renders_in_both_languages(rules, template_id: str, language: str) -> None:
    rendered = reply.render(template_id, language, context(), rules, SHIPPED_TEMPLATES)

    assert rendered.subject.startswith("[INQ-000123] ")
    assert "\n" not in rendered.subject
    assert "INQ-000123" in rendered.text and "INQ-000123" in rendered.html
    assert rendered.html.startswith("<!DOCTYPE html>")
    office = rules.office.name.ar if language == "ar" else rules.office.name.en
    assert office in rendered.html
    for line in getattr(rules.office.signature, language):
        assert line in rendered.text
    if language == "ar":
        assert '<html dir="rtl" lang="ar">' in rendered.html
        assert "١٣ جمادى الآخرة ١٤٤٨هـ الموافق ٢٣ نوفمبر ٢٠٢٦م" in rendered.text
    else:
        assert '<html dir="ltr" lang="en">' in rendered.html
        assert "23 November 2026 (13 Jumada al-Akhirah 1448 AH)" in rendered.text
    assert "<style" not in rendered.html  # Gmail/Outlook drop or mangle <style>: inline styles only


def test_ack_status_shows_status_labels_from_the_rules(rules) -> None:
    ar = reply.render("ack_status", "ar", context(), rules, SHIPPED_TEMPLATES)
    en = reply.render("ack_status", "en", context(), rules, SHIPPED_TEMPLATES)

    assert "المعاملة رقم ١٤٤٦/٠٠٣٢١: قيد الدراسة" in ar.text
    assert "خلال ٢٤ ساعة" in ar.text
    assert "إدارة الحقوق" in ar.text
    assert "Transaction 1446/00321: Under review" in en.text
    assert "within 24 working hours" in en.text


def test_ack_no_number_explains_how_to_write_the_number(rules) -> None:
    ar = reply.render("ack_no_number", "ar", context(transactions=[]), rules, SHIPPED_TEMPLATES)
    en = reply.render("ack_no_number", "en", context(transactions=[]), rules, SHIPPED_TEMPLATES)

    assert "١٤٤٦/٠٠٣٢١" in ar.text and "١٤٤٦/٠٠٣٢١" in ar.html
    assert "Transaction No. 1446/00321" in en.text


def test_ack_unverified_names_numbers_but_no_status(rules) -> None:
    rendered = reply.render("ack_unverified", "ar", context(), rules, SHIPPED_TEMPLATES)

    assert "١٤٤٦/٠٠٣٢١" in rendered.text
    for status in rules.statuses:
        assert status.label.ar not in rendered.text
        assert status.label.ar not in rendered.html


def test_html_is_escaped_and_text_is_not(rules) -> None:
    hostile = '<script>alert("x")</script> & Co'
    rendered = reply.render(
        "department_reply", "en", context(name=hostile, answer=f"line one\n\n{hostile}"), rules, SHIPPED_TEMPLATES
    )

    assert "<script>" not in rendered.html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; Co" in rendered.html
    assert f"Dear {hostile}," in rendered.text
    assert f"\n{hostile}\n" in rendered.text


def test_render_errors_name_the_problem(rules) -> None:
    with pytest.raises(reply.ReplyError, match="unknown template 'ack_maybe'"):
        reply.render("ack_maybe", "ar", context(), rules, SHIPPED_TEMPLATES)
    with pytest.raises(reply.ReplyError, match="unknown language 'fr' \\(expected ar or en\\)"):
        reply.render("ack_status", "fr", context(), rules, SHIPPED_TEMPLATES)
    with pytest.raises(reply.ReplyError, match="context needs 'inquiry'"):
        reply.render("ack_status", "ar", {"now": NOW}, rules, SHIPPED_TEMPLATES)
    with pytest.raises(reply.ReplyError, match="unknown department 'moon'"):
        reply.render("ack_status", "ar", context(department="moon"), rules, SHIPPED_TEMPLATES)


def test_template_problems_name_the_file(rules, tmp_path) -> None:
    for language in reply.LANGUAGES:
        (tmp_path / language).mkdir()
    (tmp_path / "layout.txt").write_text("{% block body %}{% endblock %}", encoding="utf-8")
    (tmp_path / "ar" / "ack_status.txt").write_text(
        "{% extends 'layout.txt' %}{% block subject %}{{ tag }}{% endblock %}\n{% block body %}\n{% if %}\n"
        "{% endblock %}", encoding="utf-8")
    (tmp_path / "en" / "ack_status.txt").write_text(
        "{% extends 'layout.txt' %}{% block subject %}{{ tag }} {{ nickname }}{% endblock %}", encoding="utf-8")
    (tmp_path / "en" / "ack_status.html").write_text("<p>{{ tag }}</p>", encoding="utf-8")

    with pytest.raises(reply.ReplyError, match=f"^{tmp_path}/ar/ack_status.txt:3: Expected an expression"):
        reply.render("ack_status", "ar", context(), rules, tmp_path)
    with pytest.raises(reply.ReplyError, match="^template ack_status \\(en\\): 'nickname' is undefined$"):
        reply.render("ack_status", "en", context(), rules, tmp_path)
    with pytest.raises(reply.ReplyError, match=f"^{tmp_path}/ar/escalation.txt: template file missing$"):
        reply.render("escalation", "ar", context(), rules, tmp_path)


def test_an_admins_template_edit_goes_live_within_a_second(rules, tmp_path, monkeypatch) -> None:
    folder = tmp_path / "templates"
    shutil.copytree(SHIPPED_TEMPLATES, folder)
    clock = [1000.0]
    monkeypatch.setattr(reply, "monotonic", lambda: clock[0])
    assert "Ramadan hours" not in reply.render("ack_no_number", "en", context(), rules, folder).text

    edited = folder / "en" / "ack_no_number.txt"
    edited.write_text(edited.read_text(encoding="utf-8").replace("{% block body %}",
                                                                  "{% block body %}Ramadan hours: 10-16.\n"),
                      encoding="utf-8")
    os.utime(edited, (edited.stat().st_mtime + 5, edited.stat().st_mtime + 5))
    clock[0] += 0.5  # within the second: the compiled template, no look at the file
    assert "Ramadan hours" not in reply.render("ack_no_number", "en", context(), rules, folder).text
    clock[0] += reply.TEMPLATE_CHECK_SECONDS
    assert "Ramadan hours: 10-16." in reply.render("ack_no_number", "en", context(), rules, folder).text


def compose(rules, **overrides: object) -> reply.OutgoingMail:
    arguments: dict[str, object] = dict(
        inquiry=123,
        recipient="citizen@example.com",
        recipient_name="محمد العتيبي",
        in_reply_to="<abc@mail.example.com>",
        references=["<first@mail.example.com>", "<second@mail.example.com>"],
    )
    language = overrides.pop("language", "ar")
    ctx = overrides.pop("context", context())
    arguments.update(overrides)
    return reply.compose("ack_status", language, ctx, rules, SHIPPED_TEMPLATES, **arguments)


def test_outgoing_arabic_mail_is_threaded_multipart_utf8(rules) -> None:
    mail = compose(rules)
    raw = reply.to_bytes(mail)
    parsed = BytesParser(policy=policy.default).parsebytes(raw)

    assert re.fullmatch(r"<inq-000123\.ack\.[0-9a-f]{16}@emirate\.example>", mail.message_id)
    assert parsed["Message-ID"] == mail.message_id
    assert parsed["In-Reply-To"] == "<abc@mail.example.com>"
    assert parsed["References"].split() == [
        "<first@mail.example.com>", "<second@mail.example.com>", "<abc@mail.example.com>"
    ]
    assert parsed["Auto-Submitted"] == "auto-replied"
    assert parsed["From"].addresses[0].display_name == "إمارة المنطقة"
    assert parsed["From"].addresses[0].addr_spec == "inquiries@emirate.example"
    assert parsed["To"].addresses[0].addr_spec == "citizen@example.com"
    assert parsed["Subject"] == "[INQ-000123] رد: استفسار عن معاملة"
    assert parsed.get_content_type() == "multipart/alternative"
    text, html = parsed.get_payload()
    assert (text.get_content_type(), text.get_content_charset()) == ("text/plain", "utf-8")
    assert (html.get_content_type(), html.get_content_charset()) == ("text/html", "utf-8")
    assert '<html dir="rtl" lang="ar">' in html.get_content()
    assert "قيد الدراسة" in text.get_content()
    # The tag stays plain ASCII on the Subject line, not inside an encoded-word.
    assert re.search(rb"^Subject: \[INQ-000123\] =\?utf-8\?", raw, re.MULTILINE)
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")


def test_english_mail_has_english_sender_name(rules) -> None:
    parsed = message_from_bytes(reply.to_bytes(compose(rules, language="en")), policy=policy.default)
    assert parsed["From"].addresses[0].display_name == "Regional Emirate"
    assert parsed["Content-Language"] == "en"


def test_notifications_are_auto_generated(rules) -> None:
    mail = compose(rules, auto_submitted=reply.AUTO_GENERATED, in_reply_to=None, references=())
    parsed = message_from_bytes(reply.to_bytes(mail), policy=policy.default)
    assert parsed["Auto-Submitted"] == "auto-generated"
    assert parsed["In-Reply-To"] is None and parsed["References"] is None


def test_injected_headers_never_reach_the_mail(rules) -> None:
    injected = "\r\nBcc: victim@x\r\nX-Evil: 1"
    mail = compose(
        rules,
        context=context(subject=f"Question{injected}", name=f"Ali{injected}"),
        recipient_name=f"Ali{injected}\n\nbody",
        in_reply_to=f"<abc@mail.example.com>{injected}",
        references=[f"<first@mail.example.com>{injected}"],
    )
    raw = reply.to_bytes(mail)
    head = raw.split(b"\r\n\r\n", 1)[0]
    names = [line.split(b":", 1)[0] for line in head.split(b"\r\n") if not line.startswith((b" ", b"\t"))]
    parsed = message_from_bytes(raw, policy=policy.default)

    assert b"Bcc" not in names and b"X-Evil" not in names
    assert parsed["Bcc"] is None and parsed["X-Evil"] is None
    assert sorted(set(names)) == sorted({
        b"From", b"To", b"Subject", b"Date", b"Message-ID", b"In-Reply-To", b"References",
        b"Auto-Submitted", b"X-Auto-Response-Suppress", b"Content-Language", b"MIME-Version", b"Content-Type",
    })
    assert parsed["Subject"] == "[INQ-000123] رد: Question Bcc: victim@x X-Evil: 1"
    assert parsed["To"].addresses[0].addr_spec == "citizen@example.com"
    assert parsed["To"].addresses[0].display_name == "Ali Bcc: victim@x X-Evil: 1 body"
    assert parsed["In-Reply-To"] == "<abc@mail.example.com>"


def test_recipient_with_injection_is_refused(rules) -> None:
    with pytest.raises(reply.ReplyError, match="not a usable recipient address"):
        compose(rules, recipient="")
    with pytest.raises(reply.ReplyError, match="not a usable recipient address: 'citizen@example.com\\\\r\\\\nBcc: victim@x'"):
        compose(rules, recipient="citizen@example.com\r\nBcc: victim@x")
    assert compose(rules, recipient="Ali <Citizen@Example.com>").recipient == "Citizen@Example.com"


def test_long_reference_chains_keep_the_first_and_the_newest() -> None:
    ids = [f"<m{i}@example.com>" for i in range(30)]
    kept = reply.thread_references(ids, "<last@example.com>")
    assert len(kept) == reply.MAX_REFERENCES
    assert kept[0] == "<m0@example.com>" and kept[-1] == "<last@example.com>"
    assert kept[-2] == "<m29@example.com>"


def test_clean_header_removes_every_line_break() -> None:
    assert reply.clean_header("a\r\nb\nc\rd\x00e\u2028f\tg") == "a b c d e f g"


def test_dates_are_hijri_and_gregorian() -> None:
    assert reply.format_date(NOW, "ar") == "١٣ جمادى الآخرة ١٤٤٨هـ الموافق ٢٣ نوفمبر ٢٠٢٦م"
    assert reply.format_date(NOW + timedelta(days=20), "en") == "13 December 2026 (4 Rajab 1448 AH)"
    assert reply.format_date(None, "ar") == ""
    outside = datetime(2100, 1, 2, tzinfo=timezone.utc)  # beyond the Umm al-Qura tables: Gregorian alone
    assert reply.format_date(outside, "ar") == "٢ يناير ٢١٠٠م"
    assert reply.format_date(outside, "en") == "2 January 2100"


def test_preview_command_renders_sample_data() -> None:
    runner = CliRunner()
    text = runner.invoke(cli, ["preview", "ack_no_number", "--lang", "ar"])
    html = runner.invoke(cli, ["preview", "ack_status", "--lang", "ar", "--html"])
    bad = runner.invoke(cli, ["preview", "ack_maybe", "--lang", "en"])

    assert text.exit_code == 0, text.output
    assert text.output.startswith("Subject: [INQ-000123] ")
    assert "١٤٤٦/٠٠٣٢١" in text.output
    assert html.exit_code == 0, html.output
    assert '<html dir="rtl" lang="ar">' in html.output
    assert bad.exit_code == 1
    assert "unknown template 'ack_maybe'" in bad.output


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Subject", "[INQ-000123] Re: Question about my transaction"),
        ("Message-ID", "<inq-000123.ack.0123456789abcdef@emirate.example>"),
        ("To", 'Ali "the citizen" <ali@example.com>'),
        ("References", "<a@example.com> <b@example.com>"),
    ],
)
def test_short_ascii_headers_fold_as_the_policy_does(name: str, value: str) -> None:
    assert reply.fold(name, value) == policy.SMTP.header_factory(name, value).fold(policy=policy.SMTP)


@pytest.mark.parametrize(
    "name",
    ["محمد العتيبي", "عبدالرحمن بن عبدالعزيز بن عبدالله بن محمد بن سعود آل عبدالكريم العتيبي", 'Ali "the" O\'Neil, Jr.', ""],
)
def test_the_citizens_name_reads_back_the_same_in_short_and_long_to_lines(rules, name: str) -> None:
    raw = reply.to_bytes(compose(rules, recipient_name=name or None))
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    # Decoded as RFC 2047 says clients do (space between encoded-words ignored); Python 3.11's
    # policy.default address parser puts a space there, splitting a long name mid-word.
    value = message_from_bytes(raw, policy=compat32)["To"]
    assert parseaddr(str(make_header(decode_header(value)))) == (name, "citizen@example.com")


@pytest.mark.parametrize(
    "subject",
    [
        "[INQ-000123] استفسار عن معاملة 1446/00321",
        "[INQ-000123] " + "استفسار طويل جدا عن حالة المعاملة رقم ١٤٤٦/٠٠٣٢١ " * 6,
        "[INQ-000123] Re: Status 1446/00001 / حالة المعاملة",
    ],
)
def test_arabic_subjects_decode_back_exactly_with_the_tag_readable(rules, subject: str) -> None:
    mail = compose(rules)
    raw = reply.to_bytes(reply.OutgoingMail(**{**_fields(mail), "subject": subject}))
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    assert re.search(rb"^Subject: \[INQ-000123\] ", head, re.MULTILINE)
    assert message_from_bytes(raw, policy=policy.default)["Subject"] == reply.clean_header(subject)


def _fields(mail: reply.OutgoingMail) -> dict[str, object]:
    return {name: getattr(mail, name) for name in reply.OutgoingMail.__dataclass_fields__ if name != "raw"}
