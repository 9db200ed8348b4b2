"""outbox.py: send once, retry 4xx with backoff, fail on 5xx, survive a crash, Maildir without a relay."""

from __future__ import annotations

import mailbox
import os
import socket
import subprocess
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta
from email import message_from_bytes, policy
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from mailbot import db, health, jobs, outbox, reply, store, verp
from mailbot.cli import cli
from mailbot.models import Outbox
from mailbot.settings import SHIPPED_TEMPLATES, Settings
from smtpsink import SmtpSink, free_port, make_certificate

_table = Outbox.__table__


def make_mail(rules, inquiry: int = 7, recipient: str = "citizen@example.com", template: str = "ack_no_number"):
    context = reply.sample_context()
    return reply.compose(template, "ar", context, rules, SHIPPED_TEMPLATES, inquiry=inquiry, recipient=recipient,
                         in_reply_to="<q1@example.com>")


def queue(engine: Engine, rules, key: str = "ack:1", **kwargs: object) -> reply.OutgoingMail:
    mail = make_mail(rules, **kwargs)
    with db.session(engine) as session:
        assert outbox.enqueue(session, mail, key=key, inquiry=None)
    return mail


def queue_many(engine: Engine, rules, count: int) -> None:
    """``count`` acknowledgements ack:0 ... in one transaction, for inquiries 1 ..."""
    with db.session(engine) as session:
        for number in range(count):
            outbox.enqueue(session, make_mail(rules, inquiry=number + 1), key=f"ack:{number}", inquiry=None)


def relay_settings(sink: SmtpSink, tmp_path: Path) -> Settings:
    return Settings(smtp_host=sink.host, smtp_port=sink.port, smtp_tls="none", sent_maildir=tmp_path / "sent")


def row(engine: Engine, key: str = "ack:1"):
    with engine.connect() as connection:
        return connection.execute(select(_table).where(_table.c.key == key)).one()


def stored_id(engine: Engine, key: str = "ack:1") -> int:
    return row(engine, key).id


def make_due(engine: Engine) -> None:
    """Fake the clock: every pending row is due now (backoff itself is tested on its own)."""
    with engine.begin() as connection:
        connection.execute(update(_table).where(_table.c.state == "pending").values(next_attempt_at=db.utcnow()))


def test_enqueue_is_once_per_key(engine: Engine, rules) -> None:
    mail = make_mail(rules)
    with db.session(engine) as session:
        first = outbox.enqueue(session, mail, key="ack:1", inquiry=None)
        second = outbox.enqueue(session, make_mail(rules), key="ack:1", inquiry=None)
    with engine.connect() as connection:
        rows = connection.execute(select(_table)).all()

    assert (first, second) == (True, False)
    assert len(rows) == 1
    assert rows[0].state == "pending" and rows[0].attempts == 0
    assert rows[0].message_id == mail.message_id
    assert message_from_bytes(rows[0].raw, policy=policy.default)["Message-ID"] == mail.message_id


def test_enqueue_rolls_back_with_the_callers_transaction(engine: Engine, rules) -> None:
    with pytest.raises(RuntimeError, match="decision failed"):
        with db.session(engine) as session:
            outbox.enqueue(session, make_mail(rules), key="ack:1", inquiry=None)
            raise RuntimeError("decision failed")
    assert outbox.list_outbox(engine) == []


def test_relay_accepts_and_row_is_sent(engine: Engine, rules, smtp_sink: SmtpSink, tmp_path: Path) -> None:
    mail = queue(engine, rules)
    sent = outbox.send_due(engine, relay_settings(smtp_sink, tmp_path))
    [accepted] = smtp_sink.accepted

    assert sent == 1
    # The envelope sender is this mail's signed return path, so a bounce names it.
    assert verp.outbox_id(accepted.mail_from, verp.secret_key(engine)) == stored_id(engine)
    assert accepted.mail_from.endswith("@emirate.example")
    assert accepted.rcpt_tos == ("citizen@example.com",)
    assert accepted.message["Message-ID"] == mail.message_id
    stored = row(engine)
    assert (stored.state, stored.attempts, stored.last_error) == ("sent", 1, None)
    assert stored.sent_at is not None
    assert outbox.send_due(engine, relay_settings(smtp_sink, tmp_path)) == 0
    assert len(smtp_sink.accepted) == 1
    [relay] = health_of(engine)  # for `mailbot status`: the relay's last success
    assert relay.last_ok_at is not None and relay.last_error_at is None


def health_of(engine: Engine) -> list:
    return [row for row in store.intake_health(engine) if row.name == health.RELAY]


def test_temporary_failures_are_retried_until_accepted_once(
    engine: Engine, rules, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    for number in range(3):
        queue(engine, rules, key=f"ack:{number}", inquiry=number + 1)
    smtp_sink.fail("451 4.3.0 Try again later", times=4)
    settings = relay_settings(smtp_sink, tmp_path)

    assert outbox.send_due(engine, settings) == 0  # 3 refusals
    pending = row(engine, "ack:0")
    assert pending.state == "pending"
    assert pending.last_error == "451 4.3.0 Try again later"
    assert pending.next_attempt_at > db.utcnow() + timedelta(seconds=10)
    assert outbox.send_due(engine, settings) == 0  # backoff: nothing is due yet
    make_due(engine)
    assert outbox.send_due(engine, settings) == 2  # the 4th refusal, then two accepted
    make_due(engine)
    assert outbox.send_due(engine, settings) == 1

    ids = sorted(accepted.message["Message-ID"] for accepted in smtp_sink.accepted)
    assert len(ids) == len(set(ids)) == 3
    assert len(smtp_sink.refused) == 4
    assert outbox.count_by_state(engine) == {"pending": 0, "sending": 0, "sent": 3, "failed": 0}


def test_concurrent_senders_send_each_mail_once(engine: Engine, rules, smtp_sink: SmtpSink, tmp_path: Path) -> None:
    queue_many(engine, rules, 40)
    settings = relay_settings(smtp_sink, tmp_path)
    start = threading.Barrier(4)

    def sender() -> int:
        start.wait()
        return sum(outbox.send_due(engine, settings, limit=7) for _ in range(10))

    with ThreadPoolExecutor(4) as pool:
        sent = sum(pool.map(lambda _: sender(), range(4)))

    ids = [accepted.message["Message-ID"] for accepted in smtp_sink.accepted]
    assert sent == 40
    assert len(ids) == len(set(ids)) == 40
    assert outbox.count_by_state(engine)["sent"] == 40


def test_a_batch_goes_over_several_connections_at_once(engine: Engine, rules, smtp_sink: SmtpSink,
                                                      tmp_path: Path) -> None:
    queue_many(engine, rules, 12)
    smtp_sink.handler.data_seconds = 0.05
    settings = replace(relay_settings(smtp_sink, tmp_path), smtp_connections=3)

    assert outbox.send_due(engine, settings) == 12
    accepted = smtp_sink.accepted
    assert len({item.message_id for item in accepted}) == 12
    by_connection = Counter(item.peer for item in accepted)
    assert sorted(by_connection.values()) == [4, 4, 4]
    assert smtp_sink.handler.most_in_data >= 2  # the connections overlapped: not one after another


def test_the_outbox_job_carries_fifty_mails_per_connection(engine: Engine, rules, smtp_sink: SmtpSink,
                                                          tmp_path: Path) -> None:
    queue_many(engine, rules, 150)
    settings = replace(relay_settings(smtp_sink, tmp_path), smtp_connections=3)

    jobs.send_outbox(engine, settings, threading.Event())
    by_connection = Counter(item.peer for item in smtp_sink.accepted)
    assert sorted(by_connection.values()) == [jobs.OUTBOX_BATCH] * 3  # not a new connection every 50 mails
    assert outbox.count_by_state(engine)["sent"] == 150


def test_one_connection_when_told(engine: Engine, rules, smtp_sink: SmtpSink, tmp_path: Path) -> None:
    queue_many(engine, rules, 5)
    settings = replace(relay_settings(smtp_sink, tmp_path), smtp_connections=1)

    assert outbox.send_due(engine, settings) == 5
    assert len({item.peer for item in smtp_sink.accepted}) == 1


def test_the_oldest_due_mail_goes_first_whatever_its_id(engine: Engine, rules, smtp_sink: SmtpSink,
                                                        tmp_path: Path) -> None:
    for number in range(5):
        queue(engine, rules, key=f"ack:{number}", inquiry=number + 1)
    now = db.utcnow()
    with engine.begin() as connection:
        for number in range(5):  # ack:4 has waited longest, ack:0 is not due yet
            connection.execute(update(_table).where(_table.c.key == f"ack:{number}")
                               .values(next_attempt_at=now - timedelta(minutes=number - 0.5)))
    settings = replace(relay_settings(smtp_sink, tmp_path), smtp_connections=1)

    assert outbox.send_due(engine, settings, limit=2) == 2
    assert {row(engine, f"ack:{n}").state for n in (4, 3)} == {"sent"}
    assert outbox.send_due(engine, settings, limit=10) == 2
    assert row(engine, "ack:0").state == "pending"


def test_the_claim_reads_the_due_index_not_the_mails(sqlite_url: str) -> None:
    db.upgrade(sqlite_url)
    engine = db.get_engine(sqlite_url)
    statement = outbox._DUE.compile(engine)
    values = statement.construct_params({"now": db.utcnow(), "limit": 50})
    with engine.connect() as connection:
        plan = " ".join(str(step[-1]) for step in connection.exec_driver_sql(
            f"EXPLAIN QUERY PLAN {statement}", tuple(values[name] for name in statement.positiontup)))
    assert "USING COVERING INDEX ix_outbox_due" in plan
    assert "TEMP B-TREE" not in plan  # no sort of every waiting mail


def test_permanent_failure_is_not_retried_until_an_operator_says_so(
    engine: Engine, rules, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    queue(engine, rules)
    smtp_sink.fail("550 5.1.1 <citizen@example.com>: Recipient address rejected", times=1)
    settings = relay_settings(smtp_sink, tmp_path)

    assert outbox.send_due(engine, settings) == 0
    failed = row(engine)
    assert failed.state == "failed"
    assert failed.last_error == "550 5.1.1 <citizen@example.com>: Recipient address rejected"
    make_due(engine)
    assert outbox.send_due(engine, settings) == 0
    assert smtp_sink.accepted == []

    result = CliRunner().invoke(cli, ["outbox", "list", "--state", "failed"], env={"MAILBOT_DB": str(engine.url.render_as_string(hide_password=False))})
    assert result.exit_code == 0, result.output
    assert "failed" in result.output and "550 5.1.1" in result.output
    retried = CliRunner().invoke(cli, ["outbox", "retry", "--all"], env={"MAILBOT_DB": engine.url.render_as_string(hide_password=False)})
    assert retried.exit_code == 0, retried.output
    assert retried.output.strip() == "1 mail(s) queued again"
    assert outbox.send_due(engine, settings) == 1
    assert row(engine).state == "sent"


def test_unreachable_relay_is_a_temporary_failure(engine: Engine, rules, tmp_path: Path) -> None:
    queue(engine, rules)
    settings = Settings(smtp_host="127.0.0.1", smtp_port=free_port(), smtp_tls="none")

    assert outbox.send_due(engine, settings) == 0
    pending = row(engine)
    assert pending.state == "pending" and pending.attempts == 1
    assert pending.last_error.startswith("ConnectionRefusedError: ")
    [relay] = health_of(engine)  # for `mailbot status`: the relay's last failure, and no success yet
    assert relay.last_ok_at is None and relay.last_error.startswith("ConnectionRefusedError: ")


def test_row_left_sending_by_a_crash_is_sent_again_with_the_same_message_id(
    engine: Engine, rules, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    mail = queue(engine, rules)
    # A crash after the attempt was committed and before the relay answered.
    with engine.begin() as connection:
        connection.execute(update(_table).values(state="sending", attempts=1,
                                                 next_attempt_at=db.utcnow() + outbox.LEASE))
    settings = relay_settings(smtp_sink, tmp_path)

    assert outbox.send_due(engine, settings) == 0  # still leased: maybe another worker is sending it
    with engine.begin() as connection:
        connection.execute(update(_table).values(next_attempt_at=db.utcnow() - timedelta(seconds=1)))
    assert outbox.send_due(engine, settings) == 1

    [accepted] = smtp_sink.accepted
    assert accepted.message["Message-ID"] == mail.message_id
    assert (row(engine).state, row(engine).attempts) == ("sent", 2)


def test_crashed_sender_on_this_host_is_taken_over_at_once(
    engine: Engine, rules, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    mail = queue(engine, rules)
    dead = subprocess.Popen(["true"])  # a pid that ran and is gone
    dead.wait()
    settings = relay_settings(smtp_sink, tmp_path)
    leased = dict(state="sending", attempts=1, next_attempt_at=db.utcnow() + outbox.LEASE)
    for owner, taken in (
        (f"{socket.gethostname()}:{os.getppid()}", 0),  # alive: maybe still talking to the relay
        (f"other-host.example:{dead.pid}", 0),  # another machine: only the lease tells
        (f"{socket.gethostname()}:{dead.pid}", 1),  # crashed here: no need to wait for the lease
    ):
        with engine.begin() as connection:
            connection.execute(update(_table).values(lease_owner=owner, **leased))
        assert outbox.send_due(engine, settings) == taken, owner

    [accepted] = smtp_sink.accepted
    assert accepted.message["Message-ID"] == mail.message_id
    assert row(engine).lease_owner == f"{socket.gethostname()}:{os.getpid()}"


@pytest.mark.parametrize("tls", ["starttls", "ssl"])
def test_relay_over_tls_with_login(sqlite_url: str, rules, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   tls: str) -> None:
    certificate = make_certificate(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate))  # trust the test relay's self-signed certificate
    sink = SmtpSink(tls=tls, certificate=certificate, login=("mailbot", "relay-sekret"))
    sink.start()
    try:
        engine = db.get_engine(sqlite_url)
        mail = queue(engine, rules)
        wrong = Settings(smtp_host=sink.host, smtp_port=sink.port, smtp_tls=tls, smtp_user="mailbot",
                         smtp_password="guess")
        assert outbox.send_due(engine, wrong) == 0
        refused = row(engine)
        # A login refused is the settings' fault, not the mail's: retried once they are fixed.
        assert (refused.state, refused.last_error) == ("pending", "535 5.7.8 Authentication credentials invalid")
        make_due(engine)
        right = Settings(smtp_host=sink.host, smtp_port=sink.port, smtp_tls=tls, smtp_user="mailbot",
                         smtp_password="relay-sekret")
        assert outbox.send_due(engine, right) == 1
        [accepted] = sink.accepted
    finally:
        sink.stop()
    assert accepted.message["Message-ID"] == mail.message_id
    assert sink.logins == ["mailbot"]


def test_without_a_relay_mail_goes_into_the_sent_maildir(sqlite_url: str, rules, tmp_path: Path) -> None:
    engine = db.get_engine(sqlite_url)
    mail = queue(engine, rules)
    settings = Settings(smtp_host=None, sent_maildir=tmp_path / "sent")

    assert outbox.send_due(engine, settings) == 1
    [(_, stored)] = list(mailbox.Maildir(tmp_path / "sent", create=False).items())
    assert stored["Message-ID"] == mail.message_id
    assert row(engine).state == "sent"
    assert (tmp_path / "sent" / "new").is_dir()


def test_retry_one_id_and_its_errors(sqlite_url: str, rules) -> None:
    engine = db.get_engine(sqlite_url)
    queue(engine, rules)
    env = {"MAILBOT_DB": sqlite_url}
    runner = CliRunner()

    not_failed = runner.invoke(cli, ["outbox", "retry", "1"], env=env)
    neither = runner.invoke(cli, ["outbox", "retry"], env=env)
    with engine.begin() as connection:
        connection.execute(update(_table).values(state="failed", last_error="550 no"))
    ok = runner.invoke(cli, ["outbox", "retry", "1"], env=env)

    assert not_failed.exit_code == 1 and "outbox 1 is not a failed mail" in not_failed.output
    assert neither.exit_code == 2 and "give an outbox ID or --all" in neither.output
    assert ok.exit_code == 0 and ok.output.strip() == "1 mail(s) queued again"
    assert row(engine).state == "pending"


def test_daily_limit_blocks_automatic_mail_an_undeliverable_mark_does_not(engine: Engine, rules) -> None:
    limit = rules.policy.max_auto_replies_per_day
    now = db.utcnow()
    with db.session(engine) as session:
        for number in range(limit):
            outbox.enqueue(session, make_mail(rules, recipient="Busy@Example.com"), key=f"ack:{number}", inquiry=None)
        outbox.enqueue(session, make_mail(rules, recipient="clerkish@example.com", template="department_reply"),
                       key="reply:1", inquiry=None)
    with db.session(engine) as session:
        busy = outbox.auto_reply_blocked(session, "busy@example.com", rules, now)
        other = outbox.auto_reply_blocked(session, "clerkish@example.com", rules, now)
        tomorrow = outbox.auto_reply_blocked(session, "busy@example.com", rules, now + timedelta(days=1, seconds=1))
        outbox.mark_undeliverable(session, "Gone@Example.com", "bounce mail=9", now)
    with db.session(engine) as session:
        gone = outbox.auto_reply_blocked(session, "gone@example.com", rules, now)
        cleared = outbox.clear_undeliverable(session, "GONE@example.com")
        again = outbox.clear_undeliverable(session, "gone@example.com")

    assert busy == f"daily limit of {limit} automatic replies reached"
    assert other is None  # a clerk's answer is not automatic
    assert tomorrow is None
    assert gone is None  # the citizen who writes is acknowledged; writing clears the mark
    assert (cleared, again) == (True, False)


def test_backoff_grows_and_is_capped() -> None:
    first = [outbox.backoff(1) for _ in range(50)]
    fifth = [outbox.backoff(5) for _ in range(50)]
    late = [outbox.backoff(40) for _ in range(50)]

    assert all(15 <= value <= 30 for value in first)
    assert all(240 <= value <= 480 for value in fifth)
    assert all(1800 <= value <= 3600 for value in late)
    assert len(set(first)) > 1  # jitter
