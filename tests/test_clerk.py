"""Clerk replies by email: commands, relay under the office's name, refusals that change nothing."""

from __future__ import annotations

import email
from datetime import datetime, timedelta, timezone
from email import policy
from pathlib import Path
from textwrap import dedent

import pytest
from sqlalchemy import select

from mailbot import clerk, db, notify, queue, store, transactions
from mailbot.models import Inquiry, InquiryEvent, Outbox, Transaction, TransactionHistory
from mailbot.parse import parse_mail
from mailbot.settings import Settings
from mailbot.understand import understand

NOW = datetime(2025, 1, 25, 6, 0, tzinfo=timezone.utc)
CITIZEN = "ahmed.alqahtani@sahab.example"
CLERK = "f.alshehri@emirate.example"  # rights
OTHER_CLERK = "s.alharbi@emirate.example"  # prisons
NUMBER = "1446/00321"
CITIZEN_MAIL = dedent(f"""\
    From: =?utf-8?B?2KPYrdmF2K8g2LPYudivINin2YTZgtit2LfYp9mG2Yo=?= <{CITIZEN}>
    To: rights@emirate.example
    Subject: =?utf-8?B?2KfYs9iq2YHYs9in2LEg2LnZhiDZhdi52KfZhdmE2Kk=?=
    Message-ID: <citizen-1@sahab.example>
    Date: Sat, 25 Jan 2025 09:00:00 +0300
    Content-Type: text/plain; charset="utf-8"
    Content-Transfer-Encoding: 8bit

    السلام عليكم، أبغى أعرف وش صار على المعاملة رقم {NUMBER}
    """).encode()


def open_inquiry(engine, rules) -> tuple[int, str]:
    """An open rights inquiry about NUMBER, forwarded to its queue; returns (id, forward Message-ID)."""
    stored = store.store_raw(engine, CITIZEN_MAIL, origin="smtp")
    with db.session(engine) as session:
        session.add(Transaction(number=NUMBER, department="rights", status="under_review",
                                applicant_emails=CITIZEN, applicant_name="أحمد سعد القحطاني",
                                updated_at=NOW, created_at=NOW))
        inquiry = Inquiry(message=stored.id, department="rights", rule="department-alias", language="ar",
                          sender=CITIZEN, sender_name="أحمد سعد القحطاني", subject="استفسار عن معاملة",
                          transactions=NUMBER, created_at=NOW, due_at=NOW + timedelta(hours=24))
        session.add(inquiry)
        session.flush()
        session.add(InquiryEvent(inquiry=inquiry.id, kind="citizen", message=stored.id, author=CITIZEN,
                                 text=f"أبغى أعرف وش صار على المعاملة رقم {NUMBER}", at=NOW))
        notify.subscribe(session, NUMBER, CITIZEN, "ar", inquiry.id)
        assert queue.forward_to_queue(session, inquiry.id, rules, NOW)
        forward = session.execute(select(Outbox.message_id).where(Outbox.template == "queue_forward")).scalar_one()
    return inquiry.id, forward


def clerk_mail(inquiry: int, forward: str, body: str, *, sender: str = CLERK, message_id: str = "<c1@emirate.example>",
               dmarc: str = "pass") -> bytes:
    return (dedent(f"""\
        Authentication-Results: mx.emirate.example; dmarc={dmarc} header.from={sender.partition("@")[2]}
        From: =?utf-8?B?2YHZh9ivINin2YTYtNmH2LHZig==?= <{sender}>
        To: inquiries@emirate.example
        Subject: RE: [INQ-{inquiry:06d}] استفسار عن معاملة
        Message-ID: {message_id}
        In-Reply-To: {forward}
        References: {forward}
        Date: Sat, 25 Jan 2025 10:05:00 +0300
        Content-Type: text/plain; charset="utf-8"
        Content-Transfer-Encoding: 8bit

        """) + body).encode()


def deliver(engine, rules, raw: bytes, *, now: datetime = NOW) -> clerk.ClerkOutcome:
    """What the pipeline does with a clerk_reply: store, parse, understand, handle."""
    stored = store.store_raw(engine, raw, origin="imap")
    understanding = understand(parse_mail(raw), rules)
    with db.session(engine) as session:
        return clerk.handle_clerk_reply(session, stored.id, understanding, rules, now)


def outbox_rows(engine, template: str | None = None) -> list[Outbox]:
    with db.session(engine) as session:
        query = select(Outbox).order_by(Outbox.id)
        if template:
            query = query.where(Outbox.template == template)
        return list(session.execute(query).scalars())


def status_of(engine, number: str = NUMBER) -> str:
    with db.session(engine) as session:
        return session.get(Transaction, number).status


def whole_mail_text(raw: bytes) -> str:
    """Headers and every decoded part: where an address could hide."""
    message = email.message_from_bytes(raw, policy=policy.default)
    parts = [str(value) for _, value in message.items()]
    parts += [part.get_content() for part in message.walk() if part.get_content_maintype() == "text"]
    return "\n".join(parts)


# --- commands, pure ---------------------------------------------------------------------------------------

def test_commands_are_read_from_their_own_lines_and_removed_from_the_answer(rules):
    mail = clerk.read_clerk_mail("#status completed\nتم إنجاز المعاملة.\n#close\n#1446/00321 جاهزة", rules)
    assert mail.commands == (clerk.Command("status", "completed"), clerk.Command("close"))
    assert mail.text == "تم إنجاز المعاملة.\n#1446/00321 جاهزة"  # "#" before a digit is a number, not a command
    assert mail.errors == ()


def test_status_of_one_named_transaction_and_internal_note_on_the_same_line(rules):
    mail = clerk.read_clerk_mail("#status 1446/00321 Awaiting_Documents\n#internal اتصلت بالمراجع", rules)
    assert mail.commands == (clerk.Command("status", "awaiting_documents", "1446/00321"),
                             clerk.Command("internal", "اتصلت بالمراجع"))
    assert mail.is_internal and mail.text == "اتصلت بالمراجع"


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("#stat completed", "unknown command '#stat' (expected one of: #status, #internal, #close, #assign)"),
        ("#status done", "unknown status 'done' (expected one of: received, under_review, awaiting_documents, "
                         "forwarded, completed, rejected)"),
        ("#status", "#status needs a status id, e.g. '#status completed' (one of: received, under_review, "
                    "awaiting_documents, forwarded, completed, rejected)"),
        ("#assign police", "unknown department 'police' (expected one of: rights, prisons, criminal, statements, "
                           "governorates, completion, general)"),
        ("#close now", "#close takes no argument, got 'now'"),
    ],
)
def test_bad_commands_are_errors(rules, line, error):
    assert clerk.read_clerk_mail(f"{line}\nنص", rules).errors == (error,)


# --- clerk mail against a real database -------------------------------------------------------------------

def test_answer_with_status_is_relayed_under_the_office_name_and_notified(engine, rules):
    inquiry, forward = open_inquiry(engine, rules)
    body = f"#status completed\nتم إنجاز المعاملة {NUMBER} ويمكن استلام الصك.\n\nفهد الشهري\n{CLERK}\n"
    outcome = deliver(engine, rules, clerk_mail(inquiry, forward, body))
    assert outcome == clerk.ClerkOutcome(inquiry, "relayed")

    [relay] = outbox_rows(engine, "department_reply")
    assert relay.recipient == CITIZEN
    text = whole_mail_text(relay.raw)
    assert "f.alshehri" not in text.lower() and b"f.alshehri" not in relay.raw.lower()
    assert "تم إنجاز المعاملة" in text and "#status" not in text
    sent = email.message_from_bytes(relay.raw, policy=policy.default)
    assert sent["From"].addresses[0].addr_spec == "inquiries@emirate.example"
    assert sent["In-Reply-To"] == "<citizen-1@sahab.example>"
    assert "<citizen-1@sahab.example>" in sent["References"]
    assert sent["Subject"].startswith(f"[INQ-{inquiry:06d}]")

    assert status_of(engine) == "completed"
    with db.session(engine) as session:
        [history] = session.execute(select(TransactionHistory)).scalars().all()
        row = session.get(Inquiry, inquiry)
    assert (history.status, history.previous_status, history.source) == ("completed", "under_review", "clerk")
    assert row.state == "answered" and row.first_response_at == NOW and row.claimed_by == CLERK

    assert notify.notify_status_changes(engine, rules, Settings()) == 1
    [changed] = outbox_rows(engine, "status_changed")
    assert changed.recipient == CITIZEN and changed.inquiry == inquiry
    assert "منجزة" in whole_mail_text(changed.raw)
    # The clerk's text is the change's note in the status mail, without the clerk's address.
    assert "ويمكن استلام الصك" in whole_mail_text(changed.raw)
    assert "f.alshehri" not in whole_mail_text(changed.raw).lower()


def test_the_same_clerk_mail_twice_relays_once(engine, rules):
    inquiry, forward = open_inquiry(engine, rules)
    raw = clerk_mail(inquiry, forward, "تمت مراجعة طلبكم.\n")
    assert deliver(engine, rules, raw).action == "relayed"
    assert deliver(engine, rules, raw).action == "duplicate"
    assert len(outbox_rows(engine, "department_reply")) == 1


def test_a_reply_to_the_forwarded_followup_answers_the_citizen_and_marks_it_answered(engine, rules):
    inquiry, _forward = open_inquiry(engine, rules)
    with db.session(engine) as session:
        row = session.get(Inquiry, inquiry)
        assert queue.forward_followup(session, row, 99, "ونسيت أن أسأل عن موعد الاستلام.", rules, NOW)
        followup_forward = session.execute(
            select(Outbox.message_id).where(Outbox.key == "followup:99")
        ).scalar_one()
    outcome = deliver(engine, rules, clerk_mail(inquiry, followup_forward, "موعد الاستلام يوم الأحد.\n"))

    assert outcome == clerk.ClerkOutcome(inquiry, "relayed")
    [relay] = outbox_rows(engine, "department_reply")
    assert relay.recipient == CITIZEN and "موعد الاستلام يوم الأحد." in whole_mail_text(relay.raw)
    with db.session(engine) as session:
        assert session.get(Inquiry, inquiry).state == "answered"


def test_non_clerk_and_forged_clerk_change_nothing_and_get_no_answer(engine, rules):
    inquiry, forward = open_inquiry(engine, rules)
    before = len(outbox_rows(engine))
    stranger = deliver(engine, rules, clerk_mail(inquiry, forward, "#status completed\n", sender=CITIZEN))
    forged = deliver(engine, rules, clerk_mail(inquiry, forward, "#status completed\n", message_id="<c2@x>",
                                               dmarc="fail"))
    assert stranger == clerk.ClerkOutcome(None, "ignored", (f"{CITIZEN}: not a clerk address",))
    assert forged == clerk.ClerkOutcome(None, "ignored", (f"{CLERK}: failed authentication",))
    assert status_of(engine) == "under_review"
    assert len(outbox_rows(engine)) == before  # no answer to a stranger: no backscatter, no loop


def test_clerk_of_another_department_is_told_why_and_nothing_changes(engine, rules):
    inquiry, forward = open_inquiry(engine, rules)
    outcome = deliver(engine, rules, clerk_mail(inquiry, forward, "#status completed\nتم\n", sender=OTHER_CLERK))
    error = f"{OTHER_CLERK} is not a clerk of department rights, which INQ-{inquiry:06d} belongs to"
    assert outcome == clerk.ClerkOutcome(inquiry, "rejected", (error,), notice_sent=True)
    assert status_of(engine) == "under_review"
    assert outbox_rows(engine, "department_reply") == []
    [notice] = outbox_rows(engine, "clerk_notice")
    assert notice.recipient == OTHER_CLERK
    assert error in whole_mail_text(notice.raw)
    assert email.message_from_bytes(notice.raw)["Auto-Submitted"] == "auto-replied"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("#status done\nتم\n", "unknown status 'done'"),
        ("#escalate\nتم\n", "unknown command '#escalate'"),
        ("#assign rights\n", "#assign: INQ-000001 is already in department rights"),
    ],
)
def test_bad_command_from_the_right_clerk_changes_nothing(engine, rules, body, error):
    inquiry, forward = open_inquiry(engine, rules)
    outcome = deliver(engine, rules, clerk_mail(inquiry, forward, body))
    assert outcome.action == "rejected" and outcome.notice_sent
    assert outcome.errors[0].startswith(error)
    assert status_of(engine) == "under_review"
    assert outbox_rows(engine, "department_reply") == []
    with db.session(engine) as session:
        assert session.get(Inquiry, inquiry).state == "open"


def test_internal_note_is_kept_and_nothing_is_sent(engine, rules):
    inquiry, forward = open_inquiry(engine, rules)
    outcome = deliver(engine, rules, clerk_mail(inquiry, forward, "#internal\nتم التواصل مع مركز الشرطة.\n"))
    assert outcome.action == "internal"
    assert outbox_rows(engine, "department_reply") == []
    with db.session(engine) as session:
        row = session.get(Inquiry, inquiry)
        notes = session.execute(select(InquiryEvent).where(InquiryEvent.kind == "internal")).scalars().all()
    assert [(n.author, n.text) for n in notes] == [(CLERK, "تم التواصل مع مركز الشرطة.")]
    assert row.state == "open" and row.first_response_at is None


def test_assign_forwards_to_the_other_queue_and_close_closes(engine, rules):
    inquiry, forward = open_inquiry(engine, rules)
    assert deliver(engine, rules, clerk_mail(inquiry, forward, "#assign prisons\n")).action == "commands"
    forwards = outbox_rows(engine, "queue_forward")
    assert [f.recipient for f in forwards] == ["rights-queue@emirate.example", "prisons-queue@emirate.example"]
    # The rights clerk no longer owns it; the prisons clerk answers and closes.
    later = deliver(engine, rules, clerk_mail(inquiry, forwards[1].message_id, "#close\nتمت الزيارة.\n",
                                              sender=OTHER_CLERK, message_id="<c3@emirate.example>"))
    assert later == clerk.ClerkOutcome(inquiry, "relayed")
    with db.session(engine) as session:
        row = session.get(Inquiry, inquiry)
    assert (row.department, row.state, row.closed_at) == ("prisons", "closed", NOW)


def test_mail_without_thread_or_tag_is_explained(engine, rules):
    open_inquiry(engine, rules)
    raw = dedent(f"""\
        From: <{CLERK}>
        To: inquiries@emirate.example
        Subject: سؤال
        Message-ID: <c9@emirate.example>

        #status completed
        """).encode()
    outcome = deliver(engine, rules, raw)
    assert outcome.action == "rejected" and outcome.inquiry is None
    assert outcome.errors == ("no inquiry found: answer by replying to the forwarded mail "
                              "and keep [INQ-nnnnnn] in the subject",)
    assert [n.recipient for n in outbox_rows(engine, "clerk_notice")] == [CLERK]


# --- the corpus' clerk replies, through understand() as the pipeline does ----------------------------------

SAMPLES = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus" / "samples"


@pytest.mark.parametrize(
    ("name", "inquiry", "department", "number", "citizen", "action", "status"),
    [
        ("067-clerk-reply-rights-status.eml", 51, "rights", "1446/00321", "ahmed.alqahtani@sahab.example",
         "relayed", "completed"),
        ("068-clerk-reply-prisons-html.eml", 55, "prisons", "1446/31007", "fatimah.alzahrani@outlook.example",
         "relayed", "awaiting_documents"),
        ("069-clerk-reply-criminal-internal.eml", 56, "criminal", "1446/73003", "d.wilson@contoso.example",
         "internal", "received"),
    ],
)
def test_corpus_clerk_replies(engine, rules, name, inquiry, department, number, citizen, action, status):
    assert transactions.import_csv(engine, SAMPLES / "transactions.csv", rules).applied
    stored = store.store_raw(engine, f"From: {citizen}\nMessage-ID: <q{inquiry}@example>\n\nسؤال\n".encode(),
                             origin="smtp")
    with db.session(engine) as session:
        session.add(Inquiry(id=inquiry, message=stored.id, department=department, rule="known-transaction",
                            language="ar", sender=citizen, transactions=number, created_at=NOW,
                            due_at=NOW + timedelta(hours=24)))
    raw = (SAMPLES / "mail" / name).read_bytes()
    assert understand(parse_mail(raw), rules).kind == "clerk_reply"
    assert deliver(engine, rules, raw) == clerk.ClerkOutcome(inquiry, action)
    assert status_of(engine, number) == status
    relays = outbox_rows(engine, "department_reply")
    assert [r.recipient for r in relays] == ([citizen] if action == "relayed" else [])
    for relay in relays:
        text = whole_mail_text(relay.raw)
        clerk_address = email.message_from_bytes(raw, policy=policy.default)["From"].addresses[0].addr_spec
        assert clerk_address not in text and "#status" not in text
        assert "Original Message" not in text and "0551234567" not in text  # the quoted forward stays behind
        assert "<q%d@example>" % inquiry in email.message_from_bytes(relay.raw)["In-Reply-To"]


def test_answer_to_a_robot_sender_is_refused_but_commands_still_work_alone(engine, rules):
    inquiry, forward = open_inquiry(engine, rules)
    with db.session(engine) as session:
        session.get(Inquiry, inquiry).sender = "no-reply@bank.example"
    outcome = deliver(engine, rules, clerk_mail(inquiry, forward, "#status completed\nتم.\n"))
    assert outcome.errors == (f"the answer cannot be sent to the sender of INQ-{inquiry:06d}: "
                              "robot sender no-reply@bank.example",)
    assert status_of(engine) == "under_review"
    only_status = deliver(engine, rules, clerk_mail(inquiry, forward, "#status completed\n", message_id="<c5@e>"))
    assert only_status == clerk.ClerkOutcome(inquiry, "commands")
    assert status_of(engine) == "completed" and outbox_rows(engine, "department_reply") == []
