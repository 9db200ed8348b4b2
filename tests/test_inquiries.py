"""inquiries.py: one inquiry and one acknowledgement per mail, follow-ups join, no mail loops."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import make_msgid
from textwrap import dedent

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from mailbot import db, inquiries, store
from mailbot.models import Inquiry, InquiryEvent, Outbox, Subscription, Undeliverable
from mailbot.parse import parse_mail
from mailbot.pipeline import Outcome
from mailbot.route import Decision
from mailbot.transactions import import_csv
from mailbot.understand import understand
from conftest import CORPUS, process_stored

SAMPLES = CORPUS / "samples"
NOW = datetime(2026, 11, 23, 9, 0, tzinfo=timezone.utc)


@pytest.fixture
def office(engine: Engine, rules) -> Engine:
    """A database holding the sample back-office records."""
    report = import_csv(engine, SAMPLES / "transactions.csv", rules)
    assert not report.errors
    return engine


def handle(engine: Engine, rules, raw: bytes, now: datetime = NOW) -> Outcome:
    return process_stored(engine, rules, raw, now)


def outbox_rows(engine: Engine) -> list:
    """The acknowledgements queued (each new inquiry's queue_forward to the clerks is left out)."""
    table = Outbox.__table__
    with engine.connect() as connection:
        return connection.execute(select(table).where(table.c.key.like("ack:%")).order_by(table.c.id)).all()


def forwards(engine: Engine) -> list:
    table = Outbox.__table__
    with engine.connect() as connection:
        return connection.execute(
            select(table).where(table.c.template == "queue_forward").order_by(table.c.id)
        ).all()


def count(engine: Engine, table) -> int:  # noqa: ANN001 - SQLModel table class
    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(table.__table__)).scalar_one()


def citizen_mail(sender: str, subject: str, body: str, **headers: str) -> bytes:
    mail = EmailMessage()
    mail["From"] = sender
    mail["To"] = "inquiries@emirate.example"
    mail["Subject"] = subject
    mail["Message-ID"] = make_msgid(domain="example.com")
    mail["Date"] = "Mon, 23 Nov 2026 12:00:00 +0300"
    for name, value in headers.items():
        mail[name.replace("_", "-")] = value
    mail.set_content(body)
    return mail.as_bytes()


def test_arabic_windows_1256_inquiry_gets_one_arabic_ack_status(office: Engine, rules) -> None:
    raw = (SAMPLES / "mail" / "040-windows-1256-qp.eml").read_bytes()
    handled = handle(office, rules, raw)
    [row] = outbox_rows(office)
    sent = message_from_bytes(row.raw, policy=policy.default)
    text, html = sent.get_payload()

    assert (handled.action, handled.reply, handled.reason) == ("opened", "ack_status", None)
    assert row.key.startswith("ack:") and row.template == "ack_status"
    assert row.recipient == "turki.alanazi@sahab.example"
    assert sent["In-Reply-To"] == "<CAZ1oO9h=Ag2@mail.sahab.example>"
    assert sent["Subject"].startswith(f"[INQ-{handled.inquiry:06d}] ")
    assert sent["Auto-Submitted"] == "auto-replied"
    assert sent["From"].addresses[0].display_name == "إمارة المنطقة"
    assert '<html dir="rtl" lang="ar">' in html.get_content()
    assert "١٤٤٥/٢٠٥٠٠" in text.get_content()
    with db.session(office) as session:
        inquiry = session.get(Inquiry, handled.inquiry)
        subscription = session.execute(select(Subscription)).scalar_one()
        event = session.execute(select(InquiryEvent)).scalar_one()
    assert (inquiry.department, inquiry.language, inquiry.transactions) == ("governorates", "ar", "1445/20500")
    # 24 working hours from Monday 12:00 Riyadh time: Monday 3, Tuesday 7, Wednesday 7, Thursday 7.
    assert inquiry.due_at == datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)  # Thursday 15:00 in Riyadh
    assert (subscription.number, subscription.email) == ("1445/20500", "turki.alanazi@sahab.example")
    assert (event.kind, event.message) == ("citizen", inquiry.message)
    [forward] = forwards(office)
    assert (forward.recipient, forward.inquiry) == ("governorates-queue@emirate.example", handled.inquiry)


def test_english_inquiry_gets_an_english_ack(office: Engine, rules) -> None:
    raw = (SAMPLES / "mail" / "002-plain-en-basic.eml").read_bytes()
    handled = handle(office, rules, raw)
    [row] = outbox_rows(office)
    sent = message_from_bytes(row.raw, policy=policy.default)
    text, html = sent.get_payload()

    assert handled.reply == "ack_status"
    assert sent["From"].addresses[0].display_name == "Regional Emirate"
    assert sent["In-Reply-To"] == parse_mail(raw).message_id
    assert "Transaction 1446/55102: Completed" in text.get_content()
    assert '<html dir="ltr" lang="en">' in html.get_content()


def test_same_mail_twice_is_one_inquiry_and_one_reply(office: Engine, rules) -> None:
    raw = (SAMPLES / "mail" / "039-windows-1256-base64-csv-case.eml").read_bytes()
    first = handle(office, rules, raw)
    second = handle(office, rules, raw)

    assert first.inquiry == second.inquiry
    assert second.reason == "already processed"
    assert count(office, Inquiry) == 1
    assert len(outbox_rows(office)) == 1
    assert len(forwards(office)) == 1
    assert count(office, InquiryEvent) == 1


def test_the_reference_is_the_number_of_the_mail_that_opened_it(engine: Engine, rules) -> None:
    """Known before anything is written, so both mails are composed outside the write transaction."""
    first = handle(engine, rules, citizen_mail("x@example.com", "Question", "Where is my certificate?"))
    followup = handle(engine, rules, citizen_mail("x@example.com", f"Re: [INQ-{first.inquiry:06d}]", "And?"))
    second = handle(engine, rules, citizen_mail("y@example.com", "سؤال", "متى يصل الرد؟"))

    assert (first.inquiry, followup.action, second.inquiry) == (1, "joined", 3)
    with engine.connect() as connection:
        rows = connection.execute(select(Inquiry.__table__.c.id, Inquiry.__table__.c.message)).all()
    assert sorted(rows) == [(1, 1), (3, 3)]
    ack = message_from_bytes(outbox_rows(engine)[-1].raw, policy=policy.default)
    assert "[INQ-000003]" in str(ack["Subject"]) and ack["Message-ID"].startswith("<inq-000003.ack.")


def test_a_reference_taken_by_an_older_inquiry_gives_the_next_free_one(engine: Engine, rules) -> None:
    """Inquiries opened before references followed mail numbers keep theirs; the new one takes
    the next free number, and its mails say that number."""
    with db.session(engine) as session:
        for number, reference in ((1, 3), (2, 4)):  # mails 1 and 2 opened inquiries 3 and 4
            older = store.store_raw(engine, citizen_mail(f"old{number}@example.com", "Old", "Before."), origin="cli")
            session.add(Inquiry(id=reference, message=older.id, department="general", rule="general", language="en",
                                state="open", sender=f"old{number}@example.com", subject="Old", transactions="",
                                created_at=NOW, due_at=NOW))

    handled = handle(engine, rules, citizen_mail("x@example.com", "Question", "Where is my certificate?"))

    # Mail 3's own number is taken by an older inquiry: the next free reference is 5.
    assert handled.action == "opened" and handled.inquiry == 5
    [ack] = outbox_rows(engine)
    assert ack.inquiry == 5 and ack.message_id.startswith("<inq-000005.ack.")
    assert "[INQ-000005]" in str(message_from_bytes(ack.raw, policy=policy.default)["Subject"])
    [forward] = forwards(engine)
    assert forward.key == "forward:5:general" and forward.message_id.startswith("<inq-000005.fwd.")


def test_unknown_sender_gets_no_status_and_no_number_gets_the_howto(engine: Engine, rules) -> None:
    asked = handle(engine, rules, citizen_mail("x@example.com", "Question", "What about 1446/00321 please?"))
    nothing = handle(engine, rules, citizen_mail("y@example.com", "استفسار", "متى يتم الرد على طلبي؟"))
    rows = outbox_rows(engine)

    assert (asked.reply, nothing.reply) == ("ack_unverified", "ack_no_number")
    unverified = message_from_bytes(rows[0].raw, policy=policy.default).get_payload()[0].get_content()
    assert "1446/00321" in unverified and "Under review" not in unverified
    howto = message_from_bytes(rows[1].raw, policy=policy.default).get_payload()[0].get_content()
    assert "١٤٤٦/٠٠٣٢١" in howto


def test_followup_with_tag_joins_without_a_new_ack(engine: Engine, rules) -> None:
    opened = handle(engine, rules, citizen_mail("x@example.com", "Question", "Where is my certificate?"))
    tag = f"[INQ-{opened.inquiry:06d}]"
    joined = handle(engine, rules, citizen_mail("x@example.com", f"Re: {tag} Question", "Any news?"))
    again = handle(engine, rules, citizen_mail("x@example.com", f"Re: {tag} Question", "Any news, please?"))

    assert (joined.action, joined.inquiry, joined.reply) == ("joined", opened.inquiry, None)
    assert again.inquiry == opened.inquiry
    assert count(engine, Inquiry) == 1
    assert len(outbox_rows(engine)) == 1
    with db.session(engine) as session:
        kinds = session.execute(select(InquiryEvent.kind).order_by(InquiryEvent.id)).scalars().all()
    assert kinds == ["citizen", "followup", "followup"]


def test_followup_by_references_to_our_ack_joins(engine: Engine, rules) -> None:
    opened = handle(engine, rules, citizen_mail("x@example.com", "Question", "Where is my certificate?"))
    [ack] = outbox_rows(engine)
    reply = citizen_mail("x@example.com", "Re: Question", "Thanks, and?", In_Reply_To=ack.message_id,
                         References=ack.message_id)
    joined = handle(engine, rules, reply)

    assert (joined.action, joined.inquiry) == ("joined", opened.inquiry)
    assert len(outbox_rows(engine)) == 1


def test_followup_of_an_unknown_inquiry_is_a_new_inquiry(engine: Engine, rules) -> None:
    handled = handle(engine, rules, citizen_mail("x@example.com", "Re: [INQ-000999] Question", "Still waiting."))

    assert handled.action == "opened" and handled.inquiry != 999
    assert handled.reply == "ack_no_number"
    assert len(outbox_rows(engine)) == 1


@pytest.mark.parametrize(
    ("sender", "headers", "reason"),
    [
        ("robot@example.com", {"Auto_Submitted": "auto-replied"}, "kind auto_reply is never answered automatically"),
        ("news@example.com", {"Precedence": "bulk", "List_Id": "<news.example.com>"}, "kind bulk is never answered automatically"),
    ],
)
def test_robots_and_lists_are_never_answered(sqlite_url: str, rules, sender: str, headers: dict, reason: str) -> None:
    engine = db.get_engine(sqlite_url)
    handled = handle(engine, rules, citizen_mail(sender, "Question 1446/00321", "Hello", **headers))

    assert (handled.action, handled.inquiry, handled.reason) == ("ignored", None, reason)
    assert outbox_rows(engine) == []


@pytest.mark.parametrize(
    ("sender", "reason"),
    [
        ("no-reply@bank.example", "robot sender no-reply@bank.example"),
        ("Postmaster@example.com", "robot sender postmaster@example.com"),
        ("rights@emirate.example", "our own address rights@emirate.example"),
        ("someone@emirate.example", "our own address someone@emirate.example"),
    ],
)
def test_unanswerable_senders_get_an_inquiry_but_no_ack(sqlite_url: str, rules, sender: str, reason: str) -> None:
    engine = db.get_engine(sqlite_url)
    mail = parse_mail(citizen_mail(sender, "استفسار", "متى يتم الرد؟"))
    understanding = understand(mail, rules)
    stored = store.store_raw(engine, citizen_mail(sender, "x", "y"), origin="cli")
    with db.session(engine) as session:
        # Straight to the opening: classify would call some of these senders' mail a bounce.
        opening = inquiries.plan_opening(session, stored.id, understanding, Decision("general", "fallback"), [],
                                         rules, NOW, known={})
        handled = inquiries.write_opening(session, opening, NOW)

    assert handled.reason == reason
    assert handled.inquiry is not None and handled.reply is None
    assert outbox_rows(engine) == []
    assert len(forwards(engine)) == 1  # the clerks still see it


def test_empty_sender_is_never_answered(rules) -> None:
    assert inquiries.unanswerable_sender(None, rules) == "empty sender"
    assert inquiries.unanswerable_sender("", rules) == "empty sender"
    assert inquiries.unanswerable_sender("citizen@example.com", rules) is None


def test_no_auto_reply_rule_opens_without_ack(sqlite_url: str, rules) -> None:
    engine = db.get_engine(sqlite_url)
    raw = citizen_mail("x@example.com", "Question", "Hello")
    stored = store.store_raw(engine, raw, origin="cli")
    with db.session(engine) as session:
        handled = inquiries.handle_understood(session, stored.id, understand(parse_mail(raw), rules),
                                              Decision("general", "vip", no_auto_reply=True), [], rules, NOW,
                                              existing=None, known={})
    assert handled.reason == "rule vip says no_auto_reply"
    assert outbox_rows(engine) == []


def test_daily_limit_caps_automatic_replies_to_one_address(engine: Engine, rules) -> None:
    limit = rules.policy.max_auto_replies_per_day
    results = [
        handle(engine, rules, citizen_mail("busy@example.com", f"Question {n}", f"Question number {n}"))
        for n in range(limit + 2)
    ]

    assert [r.reply for r in results] == ["ack_no_number"] * limit + [None, None]
    assert results[-1].reason == f"daily limit of {limit} automatic replies reached"
    assert count(engine, Inquiry) == limit + 2  # still stored and queued for the clerks
    assert len(outbox_rows(engine)) == limit
    tomorrow = handle(engine, rules, citizen_mail("busy@example.com", "Next day", "Hello"), NOW + timedelta(days=1, minutes=1))
    assert tomorrow.reply == "ack_no_number"


def delivery_report(failed: str, original_message_id: str) -> bytes:
    """An RFC 3464 bounce from a receiving MTA, with the returned mail's headers."""
    bounce = EmailMessage()
    bounce["From"] = "MAILER-DAEMON@mx.example.com"
    bounce["To"] = "inquiries@emirate.example"
    bounce["Subject"] = "Undelivered Mail Returned to Sender"
    bounce["Message-ID"] = make_msgid(domain="mx.example.com")
    bounce.set_content("This is the mail system at host mx.example.com.\n\nI'm sorry to have to inform you "
                       "that your message could not be delivered to one or more recipients.\n\n"
                       f"<{failed}>: host mx.example.com said: 550 5.1.1 User unknown\n")
    bounce.add_attachment(
        f"Reporting-MTA: dns; mx.example.com\n\nFinal-Recipient: rfc822; {failed}\n"
        "Action: failed\nStatus: 5.1.1\nDiagnostic-Code: smtp; 550 5.1.1 User unknown\n",
        subtype="delivery-status",
    )
    original = EmailMessage()
    original["Message-ID"] = original_message_id
    original["To"] = failed
    original.set_content("x")
    bounce.add_attachment(original)
    bounce.replace_header("Content-Type", bounce["Content-Type"].replace("multipart/mixed", "multipart/report")
                          + "; report-type=delivery-status")
    return bounce.as_bytes()


def test_bounce_naming_our_message_id_marks_the_recipient_until_they_write_again(engine: Engine, rules) -> None:
    opened = handle(engine, rules, citizen_mail("gone@example.com", "Question", "Hello"))
    [ack] = outbox_rows(engine)
    handled = handle(engine, rules, delivery_report("gone@example.com", ack.message_id))
    with db.session(engine) as session:
        mark = session.get(Undeliverable, "gone@example.com")
        assert mark is not None and f"outbox={ack.id}" in (mark.reason or "")
    later = handle(engine, rules, citizen_mail("gone@example.com", "Again", "Hello?"))

    assert handled.action == "bounce"
    assert handled.inquiry == opened.inquiry
    assert handled.reason == "undeliverable: gone@example.com"
    # Writing again proves the mailbox works: acknowledged, and the mark is gone.
    assert later.action == "opened" and later.reply == "ack_no_number"
    assert count(engine, Undeliverable) == 0
    assert len(outbox_rows(engine)) == 2


def test_forged_bounce_cannot_silence_someone_we_never_wrote_to(sqlite_url: str, rules) -> None:
    engine = db.get_engine(sqlite_url)
    handled = handle(engine, rules, delivery_report("victim@example.com", "<not-ours@example.com>"))
    later = handle(engine, rules, citizen_mail("victim@example.com", "Question", "Hello"))

    assert (handled.action, handled.reason) == ("bounce", "names no mail of ours: nothing marked")
    assert count(engine, Undeliverable) == 0
    assert later.reply == "ack_no_number"


FORGED_TEXT_BOUNCE = """\
From: MAILER-DAEMON@mx.evil.example
To: inquiries@emirate.example
Subject: failure notice
Message-ID: <forged-1@mx.evil.example>
Date: Mon, 23 Nov 2026 12:00:00 +0300

Hi. This is the qmail-send program at mx.evil.example.
I'm afraid I wasn't able to deliver your message to the following addresses.
This is a permanent error; I've given up. Sorry it didn't work out.

<{victim}>:
550 5.1.1 mailbox unavailable

--- Below this line is a copy of the message.

Message-ID: <{message_id}>
From: inquiries@emirate.example
To: {victim}
Subject: Re: Question
"""


@pytest.mark.parametrize("shape", ["rfc3464", "text"])
def test_forged_bounce_naming_an_address_we_mailed_but_no_mail_of_ours_marks_nothing(
    engine: Engine, rules, shape: str
) -> None:
    """Finding 6: a DSN from mailer-daemon@ naming a citizen we did write to, with a made-up Message-ID."""
    handle(engine, rules, citizen_mail("victim@example.com", "Question", "Hello"))
    [ack] = outbox_rows(engine)
    made_up = "<inq-000001.ack.0123456789abcdef@emirate.example>"  # our form, not one we sent
    assert made_up != ack.message_id
    raw = (delivery_report("victim@example.com", made_up) if shape == "rfc3464"
           else FORGED_TEXT_BOUNCE.format(victim="victim@example.com", message_id=made_up.strip("<>")).encode())
    handled = handle(engine, rules, raw)

    assert understand(parse_mail(raw), rules).kind == "bounce"
    assert (handled.action, handled.reason) == ("bounce", "names no mail of ours: nothing marked")
    assert count(engine, Undeliverable) == 0


def feedback_report(original_message_id: str, complainant: str, feedback_type: str = "abuse") -> bytes:
    """An RFC 5965 abuse report (ARF) as mailbox providers send them, the original attached."""
    return dedent(f"""\
        From: Mail Feedback <feedback@fbl.mail.example>
        To: abuse@emirate.example
        Subject: Abuse report
        Message-ID: <fbl-{feedback_type}@fbl.mail.example>
        Date: Mon, 23 Nov 2026 12:00:00 +0300
        MIME-Version: 1.0
        Content-Type: multipart/report; report-type=feedback-report; boundary="ARF"

        --ARF
        Content-Type: text/plain; charset=us-ascii

        This is an email abuse report for an email message received from IP 192.0.2.1.
        Please do not reply: رقم المعاملة 1446/00321 ما حالتها؟

        --ARF
        Content-Type: message/feedback-report

        Feedback-Type: {feedback_type}
        User-Agent: ExampleFBL/1.0
        Version: 1
        Original-Mail-From: <bounces@emirate.example>
        Original-Rcpt-To: <{complainant}>
        Arrival-Date: Mon, 23 Nov 2026 11:00:00 +0300

        --ARF
        Content-Type: text/rfc822-headers

        From: inquiries@emirate.example
        To: {complainant}
        Subject: Re: Question
        Message-ID: {original_message_id}

        --ARF--
        """).encode()


def test_feedback_report_is_stored_never_answered_and_suppresses_our_recipient(engine: Engine, rules) -> None:
    opened = handle(engine, rules, citizen_mail("annoyed@example.com", "Question", "Hello"))
    [ack] = outbox_rows(engine)
    raw = feedback_report(ack.message_id, "annoyed@example.com")
    understood = understand(parse_mail(raw), rules)
    handled = handle(engine, rules, raw)

    assert (understood.kind, understood.bounce.feedback_type) == ("bounce", "abuse")
    assert handled.reply is None and handled.action == "bounce" and handled.inquiry == opened.inquiry
    assert handled.reason == "feedback report (abuse): annoyed@example.com"
    assert len(outbox_rows(engine)) == 1  # nothing answered
    assert count(engine, Inquiry) == 1  # no inquiry opened for the report
    with db.session(engine) as session:
        assert session.get(Undeliverable, "annoyed@example.com") is not None
        thread = session.execute(select(InquiryEvent.text).where(InquiryEvent.inquiry == opened.inquiry)).scalars()
        assert "feedback report (abuse): annoyed@example.com" in list(thread)


def test_feedback_report_about_a_mail_not_ours_or_no_complaint_marks_nothing(engine: Engine, rules) -> None:
    handle(engine, rules, citizen_mail("someone@example.com", "Question", "Hello"))
    [ack] = outbox_rows(engine)
    stranger = handle(engine, rules, feedback_report("<other@mail.example>", "someone@example.com"))
    dmarc = handle(engine, rules, feedback_report(ack.message_id, "someone@example.com", "auth-failure"))

    assert (stranger.action, stranger.reply, stranger.reason) == ("bounce", None, "names no mail of ours: nothing marked")
    assert dmarc.reason == f"feedback report (auth-failure) about outbox={ack.id}: nothing marked"
    assert count(engine, Undeliverable) == 0


@pytest.mark.parametrize("polite", [True, False], ids=["auto-submitted", "no-headers-keeps-tag"])
def test_out_of_office_robot_exchange_stops_after_one_round(sqlite_url: str, rules, polite: bool) -> None:
    """A robot that answers every mail it receives: politely (RFC 3834 headers) or not at all politely."""
    engine = db.get_engine(sqlite_url)
    first = handle(engine, rules, citizen_mail("away@example.com", "Question", "Where is 1446/00321?"))
    answered = 0
    while answered < 20:
        ours = outbox_rows(engine)[answered:]
        if not ours:
            break
        for row in ours:
            sent = message_from_bytes(row.raw, policy=policy.default)
            headers = {"In_Reply_To": sent["Message-ID"], "References": sent["Message-ID"]}
            if polite:
                headers["Auto_Submitted"] = "auto-replied"
                subject = f"Automatic reply: {sent['Subject']}"
            else:
                subject = f"Re: {sent['Subject']}"
            handle(engine, rules, citizen_mail("away@example.com", subject, "I am out of the office until Sunday.",
                                               **headers))
            answered += 1

    assert first.reply == "ack_unverified"
    assert answered == 1  # our ack, one robot answer, nothing more
    assert len(outbox_rows(engine)) == 1
    assert count(engine, Inquiry) == 1


def set_state(engine: Engine, inquiry: int, state: str) -> None:
    with db.session(engine) as session:
        row = session.get(Inquiry, inquiry)
        row.state, row.escalation_level = state, 2
        row.closed_at = NOW if state == "closed" else None


def test_the_citizens_followup_reaches_the_queue_and_reopens_an_answered_or_closed_inquiry(
    engine: Engine, rules
) -> None:
    opened = handle(engine, rules, citizen_mail("x@example.com", "استفسار", "أين وصلت شهادتي؟"))
    tag = f"[INQ-{opened.inquiry:06d}]"
    later = NOW + timedelta(days=3)
    for state in ("answered", "closed"):
        set_state(engine, opened.inquiry, state)
        followup = citizen_mail("X@Example.com", f"رد: {tag} استفسار", f"لم يصلني شيء بعد ({state}).")
        handled = handle(engine, rules, followup, now=later)
        assert (handled.action, handled.inquiry, handled.reply) == ("reopened", opened.inquiry, None)
        with db.session(engine) as session:
            row = session.get(Inquiry, opened.inquiry)
            department = rules.department(row.department)
            assert (row.state, row.escalation_level, row.closed_at) == ("open", 0, None)
            # From Thursday 12:00 Riyadh time, over the weekend: Thursday 3, Sunday 7, Monday 7, Tuesday 7.
            assert row.due_at == datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
            events = session.execute(select(InquiryEvent.text).where(InquiryEvent.kind == "system")).scalars()
            assert f"reopened ({state}): the citizen wrote again" in list(events)
        forward = forwards(engine)[-1]
        sent = message_from_bytes(forward.raw, policy=policy.default)
        assert forward.key.startswith("followup:") and forward.recipient == department.queue
        assert sent["Subject"].startswith(f"{tag} ") and "متابعة" in sent["Subject"]
        assert f"لم يصلني شيء بعد ({state})." in sent.get_payload()[0].get_content()
        assert sent["Reply-To"] == "inquiries@emirate.example"
    assert len(outbox_rows(engine)) == 1  # no second acknowledgement to the citizen
    assert len(forwards(engine)) == 3


def test_a_followup_on_an_open_inquiry_is_forwarded_once_and_keeps_its_due_time(engine: Engine, rules) -> None:
    opened = handle(engine, rules, citizen_mail("x@example.com", "Question", "Where is my certificate?"))
    with db.session(engine) as session:
        due = session.get(Inquiry, opened.inquiry).due_at
    followup = citizen_mail("x@example.com", f"Re: [INQ-{opened.inquiry:06d}] Question", "I also need a copy.")
    handled = handle(engine, rules, followup, now=NOW + timedelta(hours=2))
    understanding = understand(parse_mail(followup), rules)
    with db.session(engine) as session:  # the same mail processed again (a crash before its commit)
        mail_row = session.execute(select(InquiryEvent.message).where(InquiryEvent.kind == "followup")).scalar_one()
        inquiry = session.get(Inquiry, opened.inquiry)
        again = inquiries.join_followup(session, inquiry, mail_row, understanding, rules, NOW + timedelta(hours=3))

    assert handled.action == "joined" and again.reason == "already joined"
    with db.session(engine) as session:
        row = session.get(Inquiry, opened.inquiry)
        assert (row.state, row.due_at) == ("open", due)
    [first, added] = forwards(engine)
    assert "متابعة: Question" in message_from_bytes(added.raw, policy=policy.default)["Subject"]  # staff mail is Arabic
    assert first.key.startswith("forward:") and added.key.startswith("followup:")


def test_a_stop_word_or_a_third_party_does_not_reopen_or_reach_the_queue(engine: Engine, rules) -> None:
    opened = handle(engine, rules, citizen_mail("x@example.com", "Question", "Where is my certificate?"))
    set_state(engine, opened.inquiry, "answered")
    tag = f"[INQ-{opened.inquiry:06d}]"
    stop = handle(engine, rules, citizen_mail("x@example.com", f"Re: {tag} Question", "stop"))
    other = handle(engine, rules, citizen_mail("someone@else.example", f"Re: {tag} Question", "Reopen this!"))

    assert (stop.action, stop.reason) == ("joined", "stop/start word")
    assert (other.action, other.reason) == ("joined", "not from the inquiry's sender")
    with db.session(engine) as session:
        assert session.get(Inquiry, opened.inquiry).state == "answered"
    assert len(forwards(engine)) == 1


def test_a_second_mail_about_the_same_open_transaction_joins_its_inquiry(office: Engine, rules) -> None:
    """One inquiry per question: the citizen who writes twice before the answer gets one
    acknowledgement, the clerks one forward, and the second mail is on the thread."""
    first = handle(office, rules, citizen_mail("x@example.com", "استفسار", "ما حالة المعاملة رقم 1446/00321؟"))
    again = handle(office, rules, citizen_mail("X@Example.com", "استفسار مرة أخرى",
                                               "أكرر السؤال عن المعاملة ١٤٤٦/٠٠٣٢١ من فضلكم"))
    assert first.action == "opened"
    assert (again.action, again.inquiry, again.reply) == ("joined", first.inquiry, None)
    assert (len(outbox_rows(office)), len(forwards(office)), count(office, Inquiry)) == (1, 1, 1)
    with db.session(office) as session:
        thread = session.execute(select(InquiryEvent.kind, InquiryEvent.text)
                                 .where(InquiryEvent.inquiry == first.inquiry).order_by(InquiryEvent.id)).all()
    assert [kind for kind, _text in thread] == ["citizen", "followup"]
    assert "أكرر السؤال" in thread[1].text
    # Another number, another sender, or the inquiry closed: a new question, a new inquiry.
    other = handle(office, rules, citizen_mail("x@example.com", "استفسار", "وماذا عن المعاملة 1445/00123؟"))
    neighbour = handle(office, rules, citizen_mail("y@example.com", "استفسار", "المعاملة رقم 1446/00321"))
    set_state(office, first.inquiry, "closed")
    later = handle(office, rules, citizen_mail("x@example.com", "استفسار", "المعاملة رقم 1446/00321 مرة ثالثة"))
    assert [outcome.action for outcome in (other, neighbour, later)] == ["opened"] * 3
    assert len({first.inquiry, other.inquiry, neighbour.inquiry, later.inquiry}) == 4


def test_a_similar_number_is_not_the_same_question(engine: Engine, rules) -> None:
    first = handle(engine, rules, citizen_mail("x@example.com", "استفسار", "المعاملة رقم 1446/00123"))
    second = handle(engine, rules, citizen_mail("x@example.com", "استفسار", "المعاملة رقم 1446/0012"))
    assert first.action == "opened"
    assert second.action == "opened" and second.inquiry != first.inquiry
