"""The terminal queue (`mailbot queue ...`) and queue health, against real databases."""

from __future__ import annotations

import email
from datetime import datetime, timedelta, timezone
from email import policy

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from mailbot import db, health, queue, store
from mailbot.cli import cli
from mailbot.models import Inquiry, InquiryEvent, Outbox

CLERK = "f.alshehri@emirate.example"  # rights
NOW = datetime(2025, 1, 25, 6, 0, tzinfo=timezone.utc)


def add_inquiry(engine, *, n: int, department: str = "rights", age: timedelta, state: str = "open",
                sla: timedelta = timedelta(hours=24), now: datetime | None = None) -> int:
    """``age`` before ``now`` (default: the real clock, which the CLI reads)."""
    raw = (f"From: citizen{n}@sahab.example\r\nTo: inquiries@emirate.example\r\nSubject: x\r\n"
           f"Message-ID: <c{n}@sahab.example>\r\n\r\nاستفسار\r\n").encode()
    stored = store.store_raw(engine, raw, origin="smtp")
    created = (now or db.utcnow()) - age
    with db.session(engine) as session:
        inquiry = Inquiry(message=stored.id, department=department, rule="dept-keywords", language="ar",
                          state=state, sender=f"citizen{n}@sahab.example", sender_name=f"مواطن {n}",
                          subject=f"استفسار رقم {n}", created_at=created, due_at=created + sla)
        session.add(inquiry)
        session.flush()
        session.add(InquiryEvent(inquiry=inquiry.id, kind="citizen", message=stored.id,
                                 author=inquiry.sender, text=f"نص الاستفسار {n}", at=created))
    return inquiry.id


def run(db_url: str, *args: str, stdin: str | None = None):
    return CliRunner().invoke(cli, ["queue", *args], input=stdin, env={"MAILBOT_DB": db_url},
                              catch_exceptions=False)


def test_list_puts_overdue_first_then_oldest(engine, db_url):
    now = db.utcnow()
    fresh = add_inquiry(engine, n=1, age=timedelta(hours=2), now=now)
    older = add_inquiry(engine, n=2, age=timedelta(hours=10), department="prisons", now=now)
    overdue = add_inquiry(engine, n=3, age=timedelta(hours=30), now=now)
    answered = add_inquiry(engine, n=4, age=timedelta(hours=40), state="answered", now=now)
    add_inquiry(engine, n=5, age=timedelta(hours=50), state="closed", now=now)
    with db.session(engine) as session:
        items = queue.list_queue(session, now)
        assert [i.id for i in items] == [overdue, older, fresh, answered]
        assert (items[0].overdue, items[0].sla_left, items[0].age) == (True, timedelta(hours=-6), timedelta(hours=30))
        assert [i.id for i in queue.list_queue(session, now, overdue=True)] == [overdue]
        assert [i.id for i in queue.list_queue(session, now, department="prisons")] == [older]

    result = run(db_url, "list", "--department", "rights")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"INQ-{overdue:06d}  rights") and "OVERDUE" in lines[0]
    assert lines[1].startswith(f"INQ-{fresh:06d}") and "age 2h0" in lines[1] and "sla 21h5" in lines[1]
    assert lines[2].startswith(f"INQ-{answered:06d}") and "answered" in lines[2]
    bad = run(db_url, "list", "--department", "police")
    assert bad.exit_code == 1
    assert "unknown department 'police' (expected one of: rights, prisons" in bad.stderr


def test_claim_reply_close_from_the_terminal(engine, db_url):
    inquiry = add_inquiry(engine, n=1, age=timedelta(hours=1))
    refused = run(db_url, "claim", f"INQ-{inquiry:06d}", "--clerk", "s.alharbi@emirate.example")
    assert refused.exit_code == 1
    assert f"s.alharbi@emirate.example is not a clerk of department rights (INQ-{inquiry:06d})" in refused.stderr
    assert run(db_url, "claim", str(inquiry), "--clerk", CLERK.upper()).exit_code == 0

    result = run(db_url, "reply", f"[INQ-{inquiry:06d}]", "--clerk", CLERK,
                 stdin=f"تمت معالجة طلبكم، ويمكنكم مراجعة الإدارة يوم الأحد.\n{CLERK}\n")
    assert result.exit_code == 0, result.output
    with db.session(engine) as session:
        [mail] = session.execute(select(Outbox).where(Outbox.template == "department_reply")).scalars().all()
        row = session.get(Inquiry, inquiry)
    assert mail.recipient == "citizen1@sahab.example"
    sent = email.message_from_bytes(mail.raw, policy=policy.default)
    assert sent["From"].addresses[0].addr_spec == "inquiries@emirate.example"
    assert sent["In-Reply-To"] == "<c1@sahab.example>"
    assert "يوم الأحد" in sent.get_body(("plain",)).get_content()
    assert b"f.alshehri" not in mail.raw and "f.alshehri" not in sent.get_body(("plain",)).get_content()
    assert row.state == "answered" and row.first_response_at is not None and row.claimed_by == CLERK

    assert run(db_url, "close", str(inquiry)).exit_code == 0
    again = run(db_url, "close", str(inquiry))
    assert again.exit_code == 1 and f"INQ-{inquiry:06d} is already closed" in again.stderr

    shown = run(db_url, "show", str(inquiry))
    assert shown.exit_code == 0
    for expected in ("[closed]", "citizen citizen1@sahab.example", "نص الاستفسار 1", f"claimed by {CLERK}",
                     "clerk f.alshehri@emirate.example", "يوم الأحد", "department_reply (pending)", "closed"):
        assert expected in shown.stdout


def test_empty_answer_and_unknown_inquiry_are_refused(engine, db_url):
    inquiry = add_inquiry(engine, n=1, age=timedelta(hours=1))
    empty = run(db_url, "reply", str(inquiry), "--clerk", CLERK, "--text", "   ")
    assert empty.exit_code == 1
    assert f"nothing to send to the citizen of INQ-{inquiry:06d}: the answer is empty" in empty.stderr
    assert "no inquiry INQ-000999" in run(db_url, "show", "INQ-000999").stderr
    assert "'abc' is not an inquiry reference (e.g. INQ-000123 or 123)" in run(db_url, "show", "abc").stderr


def test_assign_moves_and_forwards(engine, db_url):
    inquiry = add_inquiry(engine, n=1, age=timedelta(hours=1))
    assert run(db_url, "assign", str(inquiry), "completion").exit_code == 0
    with db.session(engine) as session:
        [forward] = session.execute(select(Outbox).where(Outbox.template == "queue_forward")).scalars().all()
        assert session.get(Inquiry, inquiry).department == "completion"
    sent = email.message_from_bytes(forward.raw, policy=policy.default)
    assert forward.recipient == "completion-queue@emirate.example"
    assert sent["Reply-To"] == "inquiries@emirate.example"
    assert sent["Message-ID"].startswith(f"<inq-{inquiry:06d}.fwd.") and sent["Message-ID"].endswith("@emirate.example>")
    assert f"[INQ-{inquiry:06d}]" in sent["Subject"]
    assert "نص الاستفسار 1" in sent.get_body(("plain",)).get_content()
    bad = run(db_url, "assign", str(inquiry), "police")
    assert bad.exit_code == 1 and "unknown department 'police'" in bad.stderr
    same = run(db_url, "assign", str(inquiry), "completion")
    assert f"INQ-{inquiry:06d} is already in department completion" in same.stderr


def test_health_counts_queues_overdue_and_stuck_outbox(engine, rules):
    add_inquiry(engine, n=1, age=timedelta(hours=30))
    add_inquiry(engine, n=2, age=timedelta(hours=1), department="prisons")
    add_inquiry(engine, n=3, age=timedelta(hours=1), state="closed")
    with db.session(engine) as session:
        queue.forward_to_queue(session, 1, rules, NOW)
    health = queue.queue_health(engine, db.utcnow())
    assert health.open_by_department == {"rights": 1, "prisons": 1}
    assert health.overdue_by_department == {"rights": 1}
    assert health.outbox["pending"] == 1 and health.outbox_stuck == 0 and not health.is_stuck
    later = queue.queue_health(engine, db.utcnow() + timedelta(minutes=16))
    assert later.outbox_stuck == 1 and later.is_stuck


@pytest.mark.parametrize(("value", "text"), [(timedelta(minutes=12), "12m"), (timedelta(hours=5, minutes=7), "5h07m"),
                                              (timedelta(days=3, hours=4), "3d04h"), (timedelta(hours=-6), "-6h00m")])
def test_durations(value, text):
    assert queue.format_duration(value) == text


def test_status_shows_queues_and_fails_when_outbox_is_stuck(engine, db_url, rules):
    add_inquiry(engine, n=1, age=timedelta(hours=30))
    health.beat(engine, db.utcnow())  # a daemon serves the database
    ok = CliRunner().invoke(cli, ["status", "--json"], env={"MAILBOT_DB": db_url})
    assert ok.exit_code == 0, ok.output
    assert '"queues": {"open": {"rights": 1}, "overdue": {"rights": 1}}' in ok.stdout
    with db.session(engine) as session:
        queue.forward_to_queue(session, 1, rules, NOW)
        session.execute(Outbox.__table__.update().values(created_at=db.utcnow() - timedelta(hours=1)))
    stuck = CliRunner().invoke(cli, ["status"], env={"MAILBOT_DB": db_url})
    assert stuck.exit_code == 1
    assert "rights       1 / 1" in stuck.stdout
    assert "outbox stuck: 1 mail(s) unsent for over 15 minutes" in stuck.stderr
