"""The whole journey through real servers: Dovecot is the official inbox, aiosmtpd the relay,
``mailbot run`` a real process.

A citizen asks in Arabic about a known transaction, the rights clerk answers by
mail with ``#status completed``, the citizen hears the answer from the office
and is told of the status change.  Then: a direct SQL UPDATE from another
system, a non-clerk's command, an overdue inquiry, a SIGTERM in a busy run.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import time
from contextlib import contextmanager
from email.header import Header
from pathlib import Path
from typing import Callable, Iterator

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import Engine

from mailbot import db
from mailbot.models import Inquiry, Message, Outbox, Transaction, TransactionHistory
from conftest import MAILBOT
from dovecot import Dovecot
from smtpsink import Accepted, SmtpSink

CITIZEN = "citizen.journey@example.com"
CLERK = "f.alshehri@emirate.example"
QUEUE = "rights-queue@emirate.example"
NUMBER = "1446/00321"
TRUSTED_PASS = "mx.emirate.example; spf=pass smtp.mailfrom=example.com; dkim=pass header.d=example.com; dmarc=pass header.from=example.com"
CLERK_PASS = ("mx.emirate.example; spf=pass smtp.mailfrom=emirate.example; dkim=pass header.d=emirate.example; "
              "dmarc=pass header.from=emirate.example")


def citizen_mail(message_id: str, body: str, subject: str = "استفسار عن معاملة", sender: str = CITIZEN) -> bytes:
    encoded = Header(subject, "windows-1256").encode()
    return (
        f"Authentication-Results: {TRUSTED_PASS}\r\n"
        f"From: =?windows-1256?b?{_b64('سعد القحطاني')}?= <{sender}>\r\n"
        "To: inquiries@emirate.example\r\n"
        f"Subject: {encoded}\r\n"
        f"Message-ID: {message_id}\r\n"
        "Date: Sun, 23 Nov 2026 09:00:00 +0300\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=windows-1256\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode("ascii") + body.replace("\n", "\r\n").encode("windows-1256")


def _b64(value: str) -> str:
    return base64.b64encode(value.encode("windows-1256")).decode("ascii")


def clerk_mail(message_id: str, in_reply_to: str, tag: str, body: str, sender: str = CLERK,
               auth: str = CLERK_PASS) -> bytes:
    return (
        f"Authentication-Results: {auth}\r\n"
        f"From: {sender}\r\n"
        "To: inquiries@emirate.example\r\n"
        f"Subject: Re: {tag}\r\n"
        f"Message-ID: {message_id}\r\n"
        f"In-Reply-To: {in_reply_to}\r\n"
        f"References: {in_reply_to}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode("ascii") + body.replace("\n", "\r\n").encode("utf-8")


def wait_for(condition: Callable[[], object], what: str, log: Path, timeout: float = 30.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout:.0f} s: {what}\n--- daemon log ---\n"
                         f"{log.read_text(errors='replace')[-4000:] if log.exists() else ''}")


def mails_to(sink: SmtpSink, recipient: str, label: str) -> list[Accepted]:
    """Mail accepted by the relay for ``recipient`` whose Message-ID has ``label`` (ack, fwd, reply, status, esc)."""
    return [m for m in sink.accepted if recipient in m.rcpt_tos and f".{label}." in str(m.message["Message-ID"])]


@contextmanager
def mailbot_run(tmp_path: Path, dovecot: Dovecot, sink: SmtpSink, **extra: str) -> Iterator[subprocess.Popen]:
    env = {
        **os.environ, **dovecot.env(), **sink.env(),
        "MAILBOT_DB": f"sqlite:///{tmp_path / 'mailbot.db'}",
        "MAILBOT_SMTP_LISTEN": "",
        "MAILBOT_IMAP_POLL_SECONDS": "0.5",
        "MAILBOT_WORKER_SECONDS": "0.2",
        "MAILBOT_OUTBOX_SECONDS": "0.2",
        "MAILBOT_NOTIFY_SECONDS": "0.5",
        **extra,
    }
    log_path = tmp_path / "mailbot.log"
    # The log is appended to by every run of a test: wait for this run's start line, not an earlier one's
    # (a SIGTERM before the daemon's handlers are set would kill it).
    started_before = log_path.read_text(errors="replace").count("mailbot running") if log_path.exists() else 0
    with log_path.open("ab") as log:
        daemon = subprocess.Popen([*MAILBOT, "run"], env=env, cwd=tmp_path,
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: log_path.read_text(errors="replace").count("mailbot running") > started_before
                 or daemon.poll() is not None, "mailbot run started", log_path)
        assert daemon.poll() is None, log_path.read_text(errors="replace")[-3000:]
        yield daemon
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=60)
    assert code == 0, log_path.read_text(errors="replace")[-3000:]


@pytest.fixture
def office(tmp_path: Path) -> Engine:
    """The daemon's database, with the citizen's rights transaction on file (under review)."""
    url = f"sqlite:///{tmp_path / 'mailbot.db'}"
    db.upgrade(url)
    engine = db.get_engine(url)
    now = db.utcnow()
    with db.session(engine) as session:
        session.add(Transaction(number=NUMBER, department="rights", status="under_review",
                                applicant_name="سعد القحطاني", applicant_emails=CITIZEN, updated_at=now,
                                created_at=now))
    return engine


def test_citizen_asks_clerk_answers_citizen_hears_answer_and_status_change(
    tmp_path: Path, dovecot: Dovecot, smtp_sink: SmtpSink, office: Engine
) -> None:
    engine = office
    log = tmp_path / "mailbot.log"
    with mailbot_run(tmp_path, dovecot, smtp_sink):
        dovecot.append([citizen_mail("<ask-1@example.com>",
                                     "السلام عليكم\nأرجو إفادتي عن حالة المعاملة رقم 00321/1446\nوشكراً")])
        ack = wait_for(lambda: mails_to(smtp_sink, CITIZEN, "ack"), "acknowledgement to the citizen", log)[0]
        forward = wait_for(lambda: mails_to(smtp_sink, QUEUE, "fwd"), "forward to the rights queue", log)[0]
        ack_text = ack.message.get_body(("plain",)).get_content()
        assert ack.message["In-Reply-To"] == "<ask-1@example.com>"
        assert "قيد الدراسة" in ack_text  # the status label, disclosed to the applicant
        assert str(ack.message["Auto-Submitted"]) == "auto-replied"
        tag = str(forward.message["Subject"])[str(forward.message["Subject"]).index("[INQ-"):][:12]
        assert tag.startswith("[INQ-") and tag in str(ack.message["Subject"])
        assert forward.message["Reply-To"] is not None and "inquiries@emirate.example" in str(forward.message["Reply-To"])

        dovecot.append([clerk_mail("<clerk-1@emirate.example>", str(forward.message["Message-ID"]), tag,
                                   "نفيدكم بأنه تم إنجاز معاملتكم ويمكنكم استلامها.\n#status completed\n\n"
                                   "فهد الشهري\nإدارة الحقوق")])
        answer = wait_for(lambda: mails_to(smtp_sink, CITIZEN, "reply"), "the clerk's answer to the citizen", log)[0]
        changed = wait_for(lambda: mails_to(smtp_sink, CITIZEN, "status"), "status_changed to the citizen", log)[0]

    assert "inquiries@emirate.example" in str(answer.message["From"])
    assert CLERK.encode() not in answer.data  # the citizen never sees the clerk's address
    assert "تم إنجاز معاملتكم" in answer.message.get_body(("plain",)).get_content()
    assert "#status" not in answer.message.get_body(("plain",)).get_content()
    assert answer.message["In-Reply-To"] == "<ask-1@example.com>"
    assert "منجزة" in changed.message.get_body(("plain",)).get_content()
    assert str(changed.message["Auto-Submitted"]) == "auto-generated"
    with engine.connect() as connection:
        inquiry = connection.execute(select(Inquiry.__table__)).one()
        status = connection.execute(select(Transaction.__table__.c.status)).scalar_one()
        history = connection.execute(select(TransactionHistory.__table__.c.source)).scalars().all()
    assert inquiry.state == "answered"
    assert inquiry.first_response_at is not None and inquiry.first_response_at >= inquiry.created_at
    assert status == "completed" and history == ["clerk"]
    # Exactly one of each: ack, forward, answer, notification.
    assert [len(mails_to(smtp_sink, CITIZEN, label)) for label in ("ack", "reply", "status")] == [1, 1, 1]
    assert len(mails_to(smtp_sink, QUEUE, "fwd")) == 1


def test_direct_sql_update_is_notified_once_and_a_strangers_command_changes_nothing(
    tmp_path: Path, dovecot: Dovecot, smtp_sink: SmtpSink, office: Engine
) -> None:
    engine = office
    log = tmp_path / "mailbot.log"
    with mailbot_run(tmp_path, dovecot, smtp_sink):
        dovecot.append([citizen_mail("<ask-2@example.com>", "ما هي حالة معاملتي رقم 1446/00321 ؟")])
        forward = wait_for(lambda: mails_to(smtp_sink, QUEUE, "fwd"), "forward to the queue", log)[0]
        wait_for(lambda: mails_to(smtp_sink, CITIZEN, "ack"), "acknowledgement", log)
        tag = str(forward.message["Subject"])[str(forward.message["Subject"]).index("[INQ-"):][:12]
        # A stranger (not a clerk) tries a command: nothing changes.
        dovecot.append([clerk_mail("<spoof-1@example.net>", str(forward.message["Message-ID"]), tag,
                                   "#status completed", sender="someone@example.net",
                                   auth="mx.emirate.example; dmarc=pass header.from=example.net")])
        wait_for(lambda: _processed(engine) == 2, "the stranger's mail processed", log)
        with engine.connect() as connection:
            assert connection.execute(select(Transaction.__table__.c.status)).scalar_one() == "under_review"
        # Another system changes the status behind mailbot's back.
        with engine.begin() as connection:
            connection.execute(text("UPDATE \"transaction\" SET status = 'awaiting_documents'"))
        wait_for(lambda: mails_to(smtp_sink, CITIZEN, "status"), "status_changed after the SQL UPDATE", log)
        time.sleep(2)  # several more notify runs
    told = mails_to(smtp_sink, CITIZEN, "status")
    assert len(told) == 1
    assert "بانتظار استكمال المستندات" in told[0].message.get_body(("plain",)).get_content()
    assert not [m for m in smtp_sink.accepted if "someone@example.net" in m.rcpt_tos and ".status." in str(m.message["Message-ID"])]


def _processed(engine: Engine) -> int:
    with engine.connect() as connection:
        return connection.execute(
            select(func.count()).select_from(Message.__table__).where(Message.__table__.c.state == "processed")
        ).scalar_one()


def test_unanswered_past_a_short_sla_escalates_exactly_once(
    tmp_path: Path, dovecot: Dovecot, smtp_sink: SmtpSink
) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    for path in (Path(__file__).resolve().parent.parent / "rules").glob("*.yaml"):
        content = path.read_text(encoding="utf-8")
        if path.name == "departments.yaml":
            # 3.6 seconds, round the clock: the test must not wait for the office to open
            content = content.replace("sla_hours: 24", "sla_hours: 0.001\n    round_the_clock: true")
        (rules / path.name).write_text(content, encoding="utf-8")
    log = tmp_path / "mailbot.log"
    with mailbot_run(tmp_path, dovecot, smtp_sink, MAILBOT_RULES=str(rules)):
        dovecot.append([citizen_mail("<ask-3@example.com>", "أرغب في الاستفسار عن مطالبة مالية لدى إدارة الحقوق")])
        wait_for(lambda: mails_to(smtp_sink, "rights-head@emirate.example", "esc"), "escalation", log)
        time.sleep(1.5)  # past the SLA, well before twice the SLA: several more runs add nothing
    escalations = mails_to(smtp_sink, "rights-head@emirate.example", "esc")
    assert len(escalations) == 1
    assert "[INQ-" in str(escalations[0].message["Subject"])
    engine = db.get_engine(f"sqlite:///{tmp_path / 'mailbot.db'}")
    with engine.connect() as connection:
        keys = connection.execute(
            select(Outbox.__table__.c.key).where(Outbox.__table__.c.template == "escalation")
        ).scalars().all()
    assert keys == ["escalation:1:1"]  # inquiry 1, level 1, once


def test_sigterm_during_a_busy_run_loses_nothing_and_sends_nothing_twice(
    tmp_path: Path, dovecot: Dovecot, smtp_sink: SmtpSink
) -> None:
    count = 60
    mails = [citizen_mail(f"<busy-{n}@example.com>", f"استفسار رقم {n} عن معاملة", sender=f"c{n}@example.com")
             for n in range(count)]
    dovecot.append(mails)
    log = tmp_path / "mailbot.log"
    engine = db.get_engine(f"sqlite:///{tmp_path / 'mailbot.db'}")
    for _ in range(3):  # stop it in the middle, again and again, until all is done
        with mailbot_run(tmp_path, dovecot, smtp_sink):
            time.sleep(1.5)
        if len(mails_to(smtp_sink, "", "ack")) >= count:
            break
    with mailbot_run(tmp_path, dovecot, smtp_sink):
        wait_for(lambda: len([m for m in smtp_sink.accepted if ".ack." in str(m.message["Message-ID"])]) >= count,
                 f"{count} acknowledgements", log, timeout=90)
        time.sleep(1)
    acks = [m for m in smtp_sink.accepted if ".ack." in str(m.message["Message-ID"])]
    answered = sorted(str(m.message["In-Reply-To"]) for m in acks)
    assert answered == sorted(f"<busy-{n}@example.com>" for n in range(count))  # each once, none lost
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(Message.__table__)).scalar_one() == count
        assert connection.execute(select(func.count()).select_from(Inquiry.__table__)).scalar_one() == count
    assert dovecot.count("INBOX") == 0
