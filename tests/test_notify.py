"""Status-change notifications, stop/start words, SLA escalation — against real databases."""

from __future__ import annotations

import email
from datetime import datetime, timedelta, timezone
from email import policy
from textwrap import dedent

import pytest
from sqlalchemy import select, text

from mailbot import db, notify, store, transactions
from mailbot.models import Inquiry, InquiryEvent, Outbox, Subscription, Transaction, Undeliverable
from mailbot.settings import Settings

NOW = datetime(2025, 1, 25, 6, 0, tzinfo=timezone.utc)
CITIZEN = "noura.alotaibi@outlook.example"
NUMBER = "1446/123456"
SETTINGS = Settings()


def open_inquiry(engine, *, sla=timedelta(hours=24), language="ar", subscribe=True, mail=1) -> int:
    """An open prisons inquiry about NUMBER whose sender was told its status."""
    raw = dedent(f"""\
        From: =?utf-8?B?2YbZiNix2Kkg2KfZhNi52KrZitio2Yo=?= <{CITIZEN}>
        To: prisons@emirate.example
        Subject: =?utf-8?B?2LLZitin2LHYqSDYs9is2YrZhg==?=
        Message-ID: <noura-{mail}@outlook.example>

        السلام عليكم، ما حالة المعاملة {NUMBER}؟
        """).encode()
    stored = store.store_raw(engine, raw, origin="smtp")
    with db.session(engine) as session:
        if session.get(Transaction, NUMBER) is None:
            session.add(Transaction(number=NUMBER, department="prisons", status="received",
                                    applicant_emails=CITIZEN, updated_at=NOW, created_at=NOW))
        inquiry = Inquiry(message=stored.id, department="prisons", rule="department-alias", language=language,
                          sender=CITIZEN, sender_name="نورة العتيبي", subject="زيارة سجين", transactions=NUMBER,
                          created_at=NOW, due_at=NOW + sla)
        session.add(inquiry)
        session.flush()
        session.add(InquiryEvent(inquiry=inquiry.id, kind="citizen", message=stored.id, author=CITIZEN,
                                 text=f"ما حالة المعاملة {NUMBER}؟", at=NOW))
        if subscribe:
            notify.subscribe(session, NUMBER, CITIZEN, language, inquiry.id)
    return inquiry.id


def set_status_from_outside(engine, status: str) -> None:
    """Another system writing the database: a plain UPDATE, no history row, no mailbot code."""
    with engine.begin() as connection:
        connection.execute(text('UPDATE "transaction" SET status = :status WHERE number = :number'),
                           {"status": status, "number": NUMBER})


def mails(engine, template: str) -> list[Outbox]:
    with db.session(engine) as session:
        return list(session.execute(select(Outbox).where(Outbox.template == template).order_by(Outbox.id)).scalars())


def body(raw: bytes) -> str:
    message = email.message_from_bytes(raw, policy=policy.default)
    return message.get_body(("plain",)).get_content()


# --- stop and start words, pure ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("new_text", "word"),
    [
        ("STOP", "stop"),
        ("Unsubscribe.", "stop"),
        ("إيقاف", "stop"),
        ("ايقاف", "stop"),
        ("أوقِف التنبيهات!", "stop"),
        ("الغاء الاشتراك", "stop"),
        ("شكراً\nإلغاء الاشتراك", "stop"),
        ("start", "start"),
        ("تفعيل", "start"),
        ("اشتراك", "start"),
        ("please do not stop working on my case", None),
        ("لا أريد إيقاف المعاملة، متى تنتهي؟", None),
        ("سطر\nسطر\nسطر\nstop", None),  # only near the top, where the reply's own words are
    ],
)
def test_subscription_words(new_text, word):
    assert notify.read_subscription_word(new_text) == word


def test_escalation_levels():
    due = NOW + timedelta(hours=24)
    assert notify.escalation_level(NOW, due, due - timedelta(seconds=1)) == 0
    assert notify.escalation_level(NOW, due, due) == 1
    assert notify.escalation_level(NOW, due, NOW + timedelta(hours=47, minutes=59)) == 1
    assert notify.escalation_level(NOW, due, NOW + timedelta(hours=48)) == 2


# --- notifications -----------------------------------------------------------------------------------------

def test_direct_sql_update_is_notified_exactly_once(engine, rules):
    inquiry = open_inquiry(engine)
    assert notify.notify_status_changes(engine, rules, SETTINGS) == 0  # told "received" already
    set_status_from_outside(engine, "completed")
    assert notify.notify_status_changes(engine, rules, SETTINGS) == 1
    assert notify.notify_status_changes(engine, rules, SETTINGS) == 0
    [mail] = mails(engine, "status_changed")
    assert (mail.recipient, mail.inquiry, mail.key) == (CITIZEN, inquiry, f"status:{NUMBER}:{CITIZEN}:completed:1")
    sent = email.message_from_bytes(mail.raw, policy=policy.default)
    assert sent["Auto-Submitted"] == "auto-generated"
    assert sent["In-Reply-To"] == "<noura-1@outlook.example>"
    assert f"[INQ-{inquiry:06d}]" in sent["Subject"]
    assert "الحالة السابقة: تم الاستلام" in body(mail.raw) and "الحالة الحالية: منجزة" in body(mail.raw)
    with db.session(engine) as session:
        [subscription] = session.execute(select(Subscription)).scalars().all()
    assert (subscription.last_status, subscription.changes_told) == ("completed", 1)


def test_back_and_forth_is_told_every_time(engine, rules):
    open_inquiry(engine)
    for status in ("awaiting_documents", "received", "awaiting_documents"):
        set_status_from_outside(engine, status)
        assert notify.notify_status_changes(engine, rules, SETTINGS) == 1
    assert [m.key.rsplit(":", 2)[1:] for m in mails(engine, "status_changed")] == [
        ["awaiting_documents", "1"], ["received", "2"], ["awaiting_documents", "3"]]


def test_english_subscriber_gets_english(engine, rules):
    open_inquiry(engine, language="en")
    set_status_from_outside(engine, "rejected")
    assert notify.notify_status_changes(engine, rules, SETTINGS) == 1
    [mail] = mails(engine, "status_changed")
    assert "Rejected" in body(mail.raw)


def test_stop_word_stops_and_start_word_starts_again(engine, rules):
    inquiry = open_inquiry(engine)
    with db.session(engine) as session:
        assert notify.apply_subscription_words(session, inquiry, CITIZEN.upper(), "أوقف التنبيهات") == "stop"
    set_status_from_outside(engine, "under_review")
    assert notify.notify_status_changes(engine, rules, SETTINGS) == 0
    with db.session(engine) as session:
        assert notify.apply_subscription_words(session, inquiry, CITIZEN, "شكرا جزيلا") is None
        assert notify.apply_subscription_words(session, inquiry, CITIZEN, "تفعيل") == "start"
    # The change made while stopped is told now, then the next one.
    assert notify.notify_status_changes(engine, rules, SETTINGS) == 1
    set_status_from_outside(engine, "completed")
    assert notify.notify_status_changes(engine, rules, SETTINGS) == 1
    assert [body(m.raw).count("منجزة") for m in mails(engine, "status_changed")] == [0, 1]


def test_no_notification_to_an_undeliverable_address_or_past_the_daily_limit(engine, rules):
    open_inquiry(engine)
    with db.session(engine) as session:
        session.add(Undeliverable(email=CITIZEN, reason="bounce", at=NOW))
    set_status_from_outside(engine, "forwarded")
    assert notify.notify_status_changes(engine, rules, SETTINGS, now=NOW + timedelta(days=29)) == 0
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM undeliverable"))
    strict = rules.model_copy(update={"policy": rules.policy.model_copy(update={"max_auto_replies_per_day": 0})})
    assert notify.notify_status_changes(engine, strict, SETTINGS) == 0  # deferred, not lost
    assert notify.notify_status_changes(engine, rules, SETTINGS) == 1


def test_an_undeliverable_mark_expires_after_30_days(engine, rules):
    open_inquiry(engine)
    with db.session(engine) as session:
        session.add(Undeliverable(email=CITIZEN, reason="bounce", at=NOW))
    set_status_from_outside(engine, "forwarded")
    assert notify.notify_status_changes(engine, rules, SETTINGS, now=NOW + timedelta(days=29, hours=23)) == 0
    assert notify.notify_status_changes(engine, rules, SETTINGS, now=NOW + timedelta(days=30, seconds=1)) == 1
    assert [m.recipient for m in mails(engine, "status_changed")] == [CITIZEN]


def set_applicants(engine, emails: str) -> None:
    """The back office changing who applied (a CSV import or another system's UPDATE)."""
    with engine.begin() as connection:
        connection.execute(text('UPDATE "transaction" SET applicant_emails = :emails WHERE number = :number'),
                           {"emails": emails, "number": NUMBER})


def test_a_removed_applicant_is_no_longer_told_and_the_new_one_is(engine, rules):
    """Finding 5: after the back office changes the applicant e-mail, the former applicant hears nothing."""
    open_inquiry(engine)
    newcomer = "new.applicant@example.com"
    with db.session(engine) as session:
        notify.subscribe(session, NUMBER, newcomer, "en", 1)  # the new applicant asked too
    set_applicants(engine, newcomer)
    set_status_from_outside(engine, "completed")
    assert notify.notify_status_changes(engine, rules, SETTINGS) == 1
    assert [m.recipient for m in mails(engine, "status_changed")] == [newcomer]
    # The former applicant's subscription saw the change and is not told later either.
    assert notify.notify_status_changes(engine, rules, SETTINGS) == 0
    set_applicants(engine, f"{newcomer} {CITIZEN}")  # back on the record: told of the next change
    set_status_from_outside(engine, "rejected")
    assert notify.notify_status_changes(engine, rules, SETTINGS) == 2
    assert sorted(m.recipient for m in mails(engine, "status_changed")[1:]) == [newcomer, CITIZEN]


def test_subscribers_off_the_record_are_told_only_when_the_policy_allows(engine, rules):
    open_inquiry(engine)
    set_applicants(engine, "")
    set_status_from_outside(engine, "completed")
    assert notify.notify_status_changes(engine, rules, SETTINGS) == 0
    open_policy = rules.model_copy(
        update={"policy": rules.policy.model_copy(update={"notify_subscribers_off_record": True})})
    set_status_from_outside(engine, "rejected")
    assert notify.notify_status_changes(engine, open_policy, SETTINGS) == 1
    assert [m.recipient for m in mails(engine, "status_changed")] == [CITIZEN]


# --- escalation --------------------------------------------------------------------------------------------

def test_one_escalation_per_level_however_often_the_job_runs(engine, rules):
    inquiry = open_inquiry(engine, sla=timedelta(minutes=1), subscribe=False)
    for minute in (0, 0.5):
        assert notify.escalate_overdue(engine, rules, NOW + timedelta(minutes=minute)) == 0
    assert notify.escalate_overdue(engine, rules, NOW + timedelta(minutes=1)) == 1
    assert notify.escalate_overdue(engine, rules, NOW + timedelta(minutes=1.5)) == 0
    assert notify.escalate_overdue(engine, rules, NOW + timedelta(minutes=2)) == 1
    for minute in (3, 60, 6000):
        assert notify.escalate_overdue(engine, rules, NOW + timedelta(minutes=minute)) == 0
    escalations = mails(engine, "escalation")
    assert [(m.recipient, m.key) for m in escalations] == [
        ("prisons-head@emirate.example", f"escalation:{inquiry}:1"),
        ("prisons-head@emirate.example", f"escalation:{inquiry}:2"),
    ]
    assert "<noura.alotaibi@outlook.example>" in body(escalations[0].raw)
    with db.session(engine) as session:
        row = session.get(Inquiry, inquiry)
        events = session.execute(select(InquiryEvent.kind).where(InquiryEvent.kind == "escalation")).all()
    assert row.escalation_level == 2 and len(events) == 2


def test_answered_inquiry_is_not_escalated_and_a_late_job_sends_only_the_top_level(engine, rules):
    answered = open_inquiry(engine, sla=timedelta(minutes=1), subscribe=False)
    late = open_inquiry(engine, sla=timedelta(minutes=1), subscribe=False, mail=2)
    with db.session(engine) as session:
        session.get(Inquiry, answered).state = "answered"
    assert notify.escalate_overdue(engine, rules, NOW + timedelta(hours=5)) == 1
    assert [m.key for m in mails(engine, "escalation")] == [f"escalation:{late}:2"]


def test_subscribing_to_an_unknown_number_does_nothing(engine):
    inquiry = open_inquiry(engine, subscribe=False)
    with db.session(engine) as session:
        notify.subscribe(session, "1446/99999", CITIZEN, "ar", inquiry)
        assert session.execute(select(Subscription)).first() is None


def test_an_unusable_address_is_stopped_and_does_not_block_the_others(engine, rules):
    open_inquiry(engine)
    rules = rules.model_copy(  # "broken address@" cannot be on a record: a subscriber the policy lets be told
        update={"policy": rules.policy.model_copy(update={"notify_subscribers_off_record": True})})
    with db.session(engine) as session:
        session.add(Subscription(number=NUMBER, email="broken address@", language="ar", inquiry=1,
                                 last_status="received", created_at=NOW))
    set_status_from_outside(engine, "completed")
    assert notify.notify_status_changes(engine, rules, SETTINGS) == 1
    with db.session(engine) as session:
        states = dict(session.execute(select(Subscription.email, Subscription.active)).all())
    assert states == {CITIZEN: True, "broken address@": False}


def test_two_runs_racing_over_the_same_change_queue_it_once(engine, rules):
    open_inquiry(engine)
    set_status_from_outside(engine, "completed")
    stale = notify._changed(engine, 0, 100, NOW)  # what a second, slower run read before the first committed
    assert notify.notify_status_changes(engine, rules, SETTINGS) == 1
    with db.session(engine) as session:
        assert notify._tell_batch(session, stale, rules, SETTINGS.templates_dir, NOW) == 0
    assert len(mails(engine, "status_changed")) == 1


def test_csv_import_and_cli_status_changes_are_noticed_too(engine, rules, tmp_path):
    open_inquiry(engine)
    csv_file = tmp_path / "export.csv"
    csv_file.write_text("number,department,status,applicant_email,applicant_name,updated_at\n"
                        f"{NUMBER},prisons,under_review,{CITIZEN},نورة محمد العتيبي,2025-01-26T08:00:00+03:00\n",
                        encoding="utf-8")
    assert transactions.import_csv(engine, csv_file, rules).status_changes == 1
    assert notify.notify_status_changes(engine, rules, SETTINGS) == 1
    transactions.set_status(engine, NUMBER, "forwarded", rules, source="cli")
    assert notify.notify_status_changes(engine, rules, SETTINGS) == 1
    first, second = (body(m.raw) for m in mails(engine, "status_changed"))
    assert "الحالة الحالية: قيد الدراسة" in first
    assert "الحالة السابقة: قيد الدراسة" in second and "الحالة الحالية: أحيلت إلى الجهة المختصة" in second


def test_the_note_of_a_status_change_reaches_the_citizen_and_an_old_note_is_not_repeated(engine, rules):
    open_inquiry(engine)
    transactions.set_status(engine, NUMBER, "awaiting_documents", rules, note="يرجى إرسال صورة من صك الملكية")
    assert notify.notify_status_changes(engine, rules, SETTINGS) == 1
    [told] = mails(engine, "status_changed")
    assert "ملاحظة من الإدارة:\nيرجى إرسال صورة من صك الملكية" in body(told.raw)
    html = email.message_from_bytes(told.raw, policy=policy.default).get_body(("html",)).get_content()
    assert "يرجى إرسال صورة من صك الملكية" in html
    # The back-office's own UPDATE writes no history: its changes carry no note, least of all the old one.
    for status in ("completed", "awaiting_documents"):
        set_status_from_outside(engine, status)
        assert notify.notify_status_changes(engine, rules, SETTINGS) == 1
        assert "ملاحظة" not in body(mails(engine, "status_changed")[-1].raw), status


def test_set_status_says_who_is_told_and_when(db_url, engine, rules, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mailbot import health
    from mailbot.cli import cli

    monkeypatch.chdir(tmp_path)
    open_inquiry(engine)
    env = {"MAILBOT_DB": db_url}
    stopped = CliRunner().invoke(cli, ["transactions", "set-status", NUMBER, "under_review"], env=env)
    assert stopped.exit_code == 0, stopped.output
    assert f"1 citizen(s) will be told when `mailbot run` starts (no daemon is running now): {CITIZEN}" in stopped.stdout
    health.beat(engine, db.utcnow())
    running = CliRunner().invoke(cli, ["transactions", "set-status", NUMBER, "awaiting_documents",
                                       "--note", "يرجى إرسال صورة من صك الملكية"], env=env)
    assert (f"1 citizen(s) will be told within 30 s, at the daemon's next status run, with the note: {CITIZEN}"
            in running.stdout)
