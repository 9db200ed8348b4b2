"""Arabic normalisation, language, and splitting new text from quotes and signatures."""

from __future__ import annotations

from textwrap import dedent

import pytest

from mailbot import text
from mailbot.text import (
    QUOTE_MARK,
    detect_language,
    html_to_text,
    normalize_arabic,
    normalize_digits,
    split_mail,
    without_closing,
)


@pytest.mark.parametrize(
    ("written", "normal"),
    [
        ("أإآٱا", "ااااا"),
        ("إفادة", "افاده"),
        ("مستشفى", "مستشفي"),
        ("مُطالَبة مالِيَّة", "مطالبه ماليه"),
        ("بـــلاغ الحـــادث", "بلاغ الحادث"),
        ("١٤٤٦/٠٠٣٢١ و ۱۴۴۵/۸۸۲۱۷", "1446/00321 و 1445/88217"),
        ("\u200fرقم\u200e", "رقم"),
        ("Transaction No. 1446/55102", "Transaction No. 1446/55102"),
    ],
)
def test_normalize_arabic(written: str, normal: str) -> None:
    assert normalize_arabic(written) == normal


def test_normalize_digits_keeps_length() -> None:
    assert normalize_digits("رقم ١٤٤٦/۱۲۳") == "رقم 1446/123"


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("السلام عليكم، أرجو إفادتي عن حالة المعاملة", "ar"),
        ("Dear Sir, could you tell me the status of my transaction?", "en"),
        ("السلام عليكم,\n\nMy brother is a prisoner since December. How can I book a visit?\n\nشكراً", "en"),
        ("السلام عليكم، أبغى أعرف عن المعاملة وش صار عليها\nTransaction No. 1446/15900\nشكراً لكم وجزاكم الله خير",
         "ar"),
        ("مرحبا ahmed.alqahtani.long.address@sahab.example https://example.com/a/very/long/path", "ar"),
    ],
)
def test_language_by_share_of_letters(text: str, language: str) -> None:
    assert detect_language(text) == language


def split(text: str):  # noqa: ANN201 - Split
    return split_mail(dedent(text).strip("\n"))


def test_gmail_english_quote() -> None:
    s = split(
        """
        Thanks John. My own case is 1446/73003.

        On Wed, 15 Jan 2025 at 12:44, John Carter <john.carter@contoso.example> wrote:
        > my transaction number is 1446/18830.
        """
    )
    assert s.new == "Thanks John. My own case is 1446/73003."
    assert s.quoted.startswith("On Wed, 15 Jan 2025") and "1446/18830" in s.quoted


def test_gmail_quote_header_wrapped_over_two_lines() -> None:
    s = split(
        """
        new text
        On Wed, 15 Jan 2025 at 12:44, John Carter <
        john.carter@contoso.example> wrote:
        > old
        """
    )
    assert s.new == "new text"
    assert "> old" in s.quoted


def test_gmail_arabic_quote() -> None:
    s = split(
        """
        أبغى أستفسر عن معاملتي رقم 1446/47300 فقط.

        في الأحد، ١٢ يناير ٢٠٢٥ في ٨:٠٣ ص، كتب خالد الشهري <khalid.sh@sahab.example>:
        > 1446/00321
        """
    )
    assert s.new == "أبغى أستفسر عن معاملتي رقم 1446/47300 فقط."
    assert "1446/00321" in s.quoted


def test_thunderbird_arabic_quote_header() -> None:
    s = split("شكراً\n\nكتب أحمد في 12/01/2025 10:00 م:\n> قديم")
    assert s.new == "شكراً"
    assert s.quoted.endswith("> قديم")


def test_outlook_original_message() -> None:
    s = split(
        """
        My transaction ref 1446-9300712 is still awaiting documents.

        -----Original Message-----
        From: Legal Desk <legal.desk@globex.example>
        Sent: Monday, January 20, 2025 4:10 PM
        Subject: follow-up

        the old file 1446/73003
        """
    )
    assert s.new == "My transaction ref 1446-9300712 is still awaiting documents."
    assert s.quoted.startswith("-----Original Message-----")


def test_outlook_header_block_without_separator_english() -> None:
    s = split(
        """
        Please see below.

        ________________________________
        From: HR <hr@contoso.example>
        Sent: Monday, January 20, 2025 4:10 PM
        To: John <john@contoso.example>
        Subject: visit

        old text 1446/10001
        """
    )
    assert "1446/10001" not in s.new
    assert s.quoted.startswith("From: HR")


def test_outlook_arabic_header_block() -> None:
    s = split(
        """
        طلب زيارة رقم الطلب 1446/64070

        من: نوف اليامي <nouf.alyami@outlook.example>
        المرسل: الاثنين، ٢٠ يناير ٢٠٢٥ ٩:١٥ م
        إلى: عائشة اليامي <aisha.alyami@outlook.example>
        الموضوع: طلب زيارة

        برقم 1446/58815
        """
    )
    assert s.new == "طلب زيارة رقم الطلب 1446/64070"
    assert s.quoted.startswith("من: نوف")


def test_from_line_alone_is_not_a_quote() -> None:
    s = split("من: أحمد\nأبغى أعرف عن المعاملة 1446/12345")
    assert s.quoted == ""
    assert "1446/12345" in s.new


@pytest.mark.parametrize(
    "marker",
    [
        "---------- Forwarded message ---------",
        "---------- رسالة مُعاد توجيهها ---------",
        "-------- Original Message --------",
        "Begin forwarded message:",
        "-----الرسالة الأصلية-----",
        "--- Below this line is a copy of the message.",
    ],
)
def test_forward_and_original_markers(marker: str) -> None:
    s = split_mail(f"انظروا تحت\n\n{marker}\nFrom: x@y.example\nold 1446/10001")
    assert s.new == "انظروا تحت"
    assert s.quoted.startswith(marker)


def test_greater_than_quoting_bottom_posted() -> None:
    s = split_mail("> old question 1446/00321\n> more\n\nmy answer 1446/47300")
    assert s.new == "my answer 1446/47300"
    assert s.quoted == "> old question 1446/00321\n> more"


@pytest.mark.parametrize(
    "signature",
    ["-- \nأحمد\nجوال: 0551234567", "Sent from my iPhone", "أُرسلت من الـ iPhone", "Get Outlook for Android",
     "تم الإرسال من جهاز Samsung", "مرسل من جوالي", "Sent from Mail for Windows", "Sent from my Galaxy"],
)
def test_signatures(signature: str) -> None:
    s = split_mail(f"السلام عليكم\nالمعاملة 1446/33015\n\n{signature}")
    assert s.new == "السلام عليكم\nالمعاملة 1446/33015"
    assert s.signature == signature.strip()


def test_sentences_starting_like_a_client_signature_stay_new() -> None:
    text = "السلام عليكم\nأرسلت من قبل طلب عن المعاملة 1446/12345 ولم يرد أحد إلى الآن، أرجو الإفادة"
    assert split_mail(text).new == text
    assert split_mail("Sent from the branch office last week, still no answer").signature == ""


def test_html_gmail_quote_and_blockquote() -> None:
    html = (
        '<div dir="rtl">شكراً، رقمي 1446/47300</div>'
        '<div class="gmail_quote"><div class="gmail_attr">في الأحد كتب خالد:</div>'
        "<blockquote>1446/00321</blockquote></div>"
    )
    s = split_mail(html_to_text(html), html, text_from_html=True)
    assert s.new == "شكراً، رقمي 1446/47300"
    assert "1446/00321" in s.quoted and "1446/47300" not in s.quoted


def test_html_outlook_div_rply_fwd_msg() -> None:
    html = (
        "<html><body><p>Thank you, Transaction No. 1446/47300.</p>"
        '<div id="divRplyFwdMsg"><b>From:</b> Citizen Services<br><b>Sent:</b> Thursday<br>'
        "<b>Subject:</b> [INQ-000047]</div><div>about transaction 1446/12345</div></body></html>"
    )
    s = split_mail(html_to_text(html), html, text_from_html=True)
    assert s.new == "Thank you, Transaction No. 1446/47300."
    assert "1446/12345" in s.quoted


@pytest.mark.parametrize("opening", [
    '<div class="gmail_quote">', '<div id="divRplyFwdMsg">', '<div id="appendonsend">',
    '<div class="moz-cite-prefix">', '<div class="moz-forward-container">', "<blockquote>",
    '<div class="OutlookMessageHeader">', '<div class="signature gmail_quote" dir="rtl">',
])
def test_html_quote_containers_of_each_mail_client(opening: str) -> None:
    closing = "</blockquote>" if opening == "<blockquote>" else "</div>"
    html = f'<div dir="rtl"><p>ما زلت أنتظر، رقمي 1446/47300</p></div>{opening}<p>معاملة 1446/00321</p>{closing}'
    s = split_mail(html_to_text(html), html, text_from_html=True)
    assert s.new == "ما زلت أنتظر، رقمي 1446/47300"
    assert "1446/00321" in s.quoted


def test_html_divs_that_are_no_quote_stay_new() -> None:
    html = '<div class="gmail_default">رقمي 1446/47300</div><div id="quote">والمعاملة الأخرى 1446/00321</div>'
    s = split_mail(html_to_text(html), html, text_from_html=True)
    assert "1446/47300" in s.new and "1446/00321" in s.new and s.quoted == ""


def test_an_html_body_is_parsed_once_for_its_text_and_its_marked_quote(monkeypatch) -> None:
    parses = []
    real = text.BeautifulSoup
    monkeypatch.setattr(text, "BeautifulSoup", lambda *args, **kwargs: parses.append(1) or real(*args, **kwargs))
    html = '<div dir="rtl">رقمي 1446/47300 (مرة واحدة)</div><blockquote>1446/00321</blockquote>'

    assert html_to_text(html) == "رقمي 1446/47300 (مرة واحدة)\n\n1446/00321"
    assert html_to_text(html, mark_quote=True) == f"رقمي 1446/47300 (مرة واحدة)\n\n{QUOTE_MARK}\n\n1446/00321"
    assert len(parses) == 1


def test_html_to_text_ignores_scripts_and_keeps_blocks() -> None:
    text = html_to_text("<style>x{}</style><p>سطر&nbsp;أول</p><p>سطر ثاني<br>ثالث</p><script>1446/1</script>")
    assert [line for line in text.split("\n") if line] == ["سطر أول", "سطر ثاني", "ثالث"]


def test_citizen_sentences_that_look_like_quote_headers_stay_new() -> None:
    s = split_mail("كتبت لكم الأسبوع الماضي عن المعاملة التالية:\n1446/12345\nOn Monday I wrote:\nno answer")
    assert s.quoted == ""
    assert "1446/12345" in s.new


def test_a_third_script_is_answered_in_english() -> None:
    assert detect_language("Превед, как дела?") == "en"
    assert detect_language("こんにちは") == "en"


def test_without_closing_drops_the_signature_block_after_a_closing_line() -> None:
    text = ("السلام عليكم\nأرجو إفادتي عن حالة المعاملة رقم 1446/12345 الخاصة بالشركة\nوتقبلوا تحياتي\n"
            "John Smith | Senior Procurement Manager\nGlobex Arabia Trading Company, King Fahd Road\nMobile +966")
    assert without_closing(text).endswith("وتقبلوا تحياتي")
    assert detect_language(text) == "en"
    assert detect_language(without_closing(text)) == "ar"


def test_without_closing_keeps_a_mail_that_starts_with_thanks() -> None:
    text = "Thanks,\nI still wait for my answer about the visit.\nPlease reply soon."
    assert without_closing(text) == text
    body = "\n".join(["Hello"] + [f"line {i}" for i in range(12)] + ["Regards,"] + ["x"] * 10)
    assert without_closing(body) == body  # a "closing" with a long text after it is not the end
