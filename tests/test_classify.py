"""Kinds in SPEC order: bounce → auto_reply → bulk → clerk_reply → followup → inquiry."""

from __future__ import annotations

from textwrap import dedent

import pytest

from mailbot.classify import classify, inquiry_tags
from mailbot.parse import parse_mail
from mailbot.rules import Rules


def kind_of(headers: str, rules: Rules, body: str = "السلام عليكم\n"):  # noqa: ANN201 - Kind
    raw = (dedent(headers).strip("\n") + "\n\n" + body).encode("utf-8")
    parsed = parse_mail(raw)
    return classify(parsed, rules, parsed.text)


DSN = """\
--r
Content-Type: text/plain; charset=us-ascii

This is the mail system at host out.emirate.example.
I'm sorry to have to inform you that your message could not be delivered.

<old.address@dead-isp.example>: host mx.dead-isp.example said: 550 5.1.1 user unknown
--r
Content-Type: message/delivery-status

Reporting-MTA: dns; out.emirate.example
Arrival-Date: Sun, 26 Jan 2025 09:00:05 +0300

Final-Recipient: rfc822; Old.Address@dead-isp.example
Original-Recipient: rfc822;old.address@dead-isp.example
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 <old.address@dead-isp.example>: Recipient address rejected

Final-Recipient: rfc822; fine@ok.example
Action: delayed
Status: 4.4.1
--r
Content-Type: message/rfc822

From: inquiries@emirate.example
To: old.address@dead-isp.example
Message-ID: <inq-000058.ack@emirate.example>
Subject: [INQ-000058] received

Your transaction 1446/44120
--r--
"""


def test_rfc3464_report_is_a_bounce_with_recipient_and_original(rules: Rules) -> None:
    kind = kind_of(
        """
        From: Mail Delivery System <MAILER-DAEMON@out.emirate.example>
        To: inquiries@emirate.example
        Subject: Undelivered Mail Returned to Sender
        Auto-Submitted: auto-replied
        Content-Type: multipart/report; report-type=delivery-status; boundary="r"
        """,
        rules,
        DSN,
    )
    assert (kind.kind, kind.reason) == ("bounce", "delivery-status report (RFC 3464)")
    assert kind.bounce is not None
    assert kind.bounce.recipients == ("old.address@dead-isp.example",)
    assert kind.bounce.original_message_id == "<inq-000058.ack@emirate.example>"
    assert kind.bounce.status == "5.1.1"
    assert kind.bounce.diagnostic.startswith("smtp; 550 5.1.1")


def test_old_style_qmail_bounce(rules: Rules) -> None:
    body = dedent(
        """\
        Hi. This is the qmail-send program at mail.oldisp.example.
        I'm afraid I wasn't able to deliver your message to the following addresses.
        This is a permanent error; I've given up. Sorry it didn't work out.

        <Majed.Old@oldisp.example>:
        Sorry, no mailbox here by that name. (#5.1.1)

        --- Below this line is a copy of the message.

        Return-Path: <inquiries@emirate.example>
        Message-ID: <inq-000060.ack@emirate.example>
        Subject: [INQ-000060] received

        transaction 1446/61234
        """
    )
    kind = kind_of(
        """
        From: MAILER-DAEMON@mail.oldisp.example
        Subject: failure notice
        """,
        rules,
        body,
    )
    assert (kind.kind, kind.reason) == ("bounce", "sender mailer-daemon@mail.oldisp.example is a mailer daemon")
    assert kind.bounce.recipients == ("majed.old@oldisp.example",)
    assert kind.bounce.original_message_id == "<inq-000060.ack@emirate.example>"
    assert kind.bounce.status == "5.1.1"


def test_postmaster_sender_is_a_bounce(rules: Rules) -> None:
    kind = kind_of("From: postmaster@isp.example\nSubject: Delivery failure", rules, "no such user\n")
    assert kind.kind == "bounce"
    assert kind.bounce.recipients == () and kind.bounce.original_message_id is None


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("Auto-Submitted: auto-replied", "Auto-Submitted: auto-replied"),
        ("Auto-Submitted: Auto-Generated; owner-email=x@y", "Auto-Submitted: auto-generated"),
        ("X-Autoreply: yes", "x-autoreply: yes"),
        ("X-Autorespond: Out of office", "x-autorespond: Out of office"),
        ("X-Auto-Response-Suppress: All", "x-auto-response-suppress: All"),
    ],
)
def test_auto_reply_headers(rules: Rules, header: str, reason: str) -> None:
    kind = kind_of(f"From: someone@sahab.example\nSubject: hello\n{header}\nList-Id: <x.example>", rules)
    assert (kind.kind, kind.reason) == ("auto_reply", reason)


@pytest.mark.parametrize(
    "subject",
    ["Automatic reply: [INQ-000057] received", "Out of Office: back Sunday", "رد تلقائي: خارج المكتب",
     "خارج المكتب حتى ١٥ يناير", "Auto-Reply: on vacation", "رد آلي: شكراً لتواصلكم", "Réponse automatique"],
)
def test_out_of_office_subjects(rules: Rules, subject: str) -> None:
    assert kind_of(f"From: someone@sahab.example\nSubject: {subject}", rules).kind == "auto_reply"


@pytest.mark.parametrize("subject", ["Absence of documents in my file", "طلب إجازة لزيارة السجين", "Re: reply soon"])
def test_ordinary_subjects_are_not_out_of_office(rules: Rules, subject: str) -> None:
    assert kind_of(f"From: someone@sahab.example\nSubject: {subject}", rules).kind == "inquiry"


def test_auto_submitted_no_is_a_human(rules: Rules) -> None:
    kind = kind_of("From: a@sahab.example\nSubject: المعاملة 1446/26004\nAuto-Submitted: no", rules)
    assert kind.kind == "inquiry"


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("Precedence: bulk", "Precedence: bulk"),
        ("Precedence: junk", "Precedence: junk"),
        ("Precedence: List", "Precedence: list"),
        ("List-Id: Newsletter <news.example>", "list-id header present"),
        ("List-Unsubscribe: <mailto:unsub@news.example>", "list-unsubscribe header present"),
    ],
)
def test_bulk(rules: Rules, header: str, reason: str) -> None:
    kind = kind_of(f"From: news@news.example\nSubject: [INQ-000001] نشرة\n{header}", rules)
    assert (kind.kind, kind.reason) == ("bulk", reason)


def test_clerk_reply_beats_followup(rules: Rules) -> None:
    kind = kind_of(
        """
        From: Fahad <F.AlShehri@Emirate.Example>
        Subject: RE: [INQ-000054] استفسار جديد
        In-Reply-To: <inq-000054.fwd@emirate.example>
        """,
        rules,
    )
    assert (kind.kind, kind.reason) == ("clerk_reply", "From f.alshehri@emirate.example is a clerk of rights")


def test_followup_by_tag(rules: Rules) -> None:
    kind = kind_of("From: reem@sahab.example\nSubject: رد: [inq-000052] تم استلام استفساركم", rules)
    assert (kind.kind, kind.reason) == ("followup", "inquiry tag [INQ-000052] in the subject")


@pytest.mark.parametrize(
    "headers",
    [
        "In-Reply-To: <inq-000050.ack@emirate.example>",
        "References: <other@gmail.example> <inq-000050.ack@EMIRATE.example>",
        "In-Reply-To: <x@mail.emirate.example>",
    ],
)
def test_followup_by_our_message_id(rules: Rules, headers: str) -> None:
    kind = kind_of(f"From: a@contoso.example\nSubject: Re: my visit\n{headers}", rules)
    assert kind.kind == "followup"
    assert kind.reason.startswith("In-Reply-To/References name our message <")


@pytest.mark.parametrize(
    "headers",
    [
        "In-Reply-To: <CAF=abc@mail.gmail.example>",
        "In-Reply-To: <x@emirate.example.evil.example>",
        "In-Reply-To: <x@notemirate.example>",
        "",
    ],
)
def test_everything_else_is_an_inquiry(rules: Rules, headers: str) -> None:
    kind = kind_of(f"From: a@contoso.example\nSubject: Re: my request\n{headers}", rules)
    assert (kind.kind, kind.reason) == ("inquiry", "none of bounce, auto-reply, bulk, clerk, follow-up applies")


def test_inquiry_tags_upper_cased_and_once() -> None:
    assert inquiry_tags("RE: [inq-000047] [INQ-000047] and [INQ-000048]") == ("INQ-000047", "INQ-000048")
    assert inquiry_tags("INQ-000047 without brackets") == ()
