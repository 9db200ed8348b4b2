"""Chaos on PostgreSQL: three daemons share one database, one IMAP inbox and one relay while a
random one is SIGKILLed every few seconds and restarted.

5,000 mails arrive, half by IMAP and half by SMTP to whichever daemon answers; a back-office
UPDATE changes 100 statuses behind the daemons' back.  Every mail must be archived once,
every inquiry acknowledged (and forwarded) at least once, and every status change told.
What a kill may repeat is bounded: the outbox commits each mail's outcome right after the
relay's answer, so only a mail between the relay's 250 and that commit — at most one per
relay connection, MAILBOT_SMTP_CONNECTIONS (4) per daemon — can be sent twice.
"""

from __future__ import annotations

import os
import random
import signal
import smtplib
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import text

from conftest import MAILBOT, create_pg_database, drop_pg_database
from dovecot import Dovecot
from mailbot import db
from smtpsink import SmtpSink, free_port
from test_jobs import wait_for
from test_journey import citizen_mail

MAILS = 5000
ON_RECORD = 100  # the first mails come from applicants of transactions on record
SMTP_CONNECTIONS = 4


def mail(n: int) -> bytes:
    return citizen_mail(f"<chaos-{n}@example.com>", f"أرجو إفادتي عن المعاملة رقم 1446/{n:05d}",
                        sender=f"c{n}@example.com")


class Daemon:
    def __init__(self, tmp_path: Path, index: int, env: dict[str, str]) -> None:
        self.port = free_port()
        self.log = tmp_path / f"daemon-{index}.log"
        self.env = {**os.environ, **env, "MAILBOT_SMTP_LISTEN": f"127.0.0.1:{self.port}",
                    "MAILBOT_SENT_MAILDIR": str(tmp_path / "sent")}
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen([*MAILBOT, "run"], env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=90)


def feed_smtp(daemons: list[Daemon], numbers: list[int], failures: Counter) -> None:
    """Offer each mail to the daemons in turn until one says 250 (a dead one refuses the connection)."""
    position = 0
    for start in range(0, len(numbers), 50):
        batch = numbers[start:start + 50]
        while batch:
            daemon = daemons[position % len(daemons)]
            position += 1
            try:
                with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
                    while batch:
                        client.sendmail(f"c{batch[0]}@example.com", ["inquiries@emirate.example"], mail(batch[0]))
                        batch.pop(0)
            except (OSError, smtplib.SMTPException):
                failures["smtp"] += 1  # that daemon died (or was starting): the next one takes the rest
                time.sleep(0.05)


def count(engine, sql: str) -> int:  # noqa: ANN001 - Engine
    with engine.connect() as connection:
        return connection.execute(text(sql)).scalar_one()


@pytest.fixture
def fresh_pg() -> str:
    url = create_pg_database()
    yield url
    drop_pg_database(url)


def test_three_daemons_killed_at_random_lose_nothing_and_repeat_within_the_bound(
        tmp_path: Path, fresh_pg: str, dovecot: Dovecot, smtp_sink: SmtpSink):
    db.upgrade(fresh_pg)
    engine = db.get_engine(fresh_pg)
    now = db.utcnow()
    with engine.begin() as connection:
        for n in range(1, ON_RECORD + 1):
            connection.execute(text(
                'INSERT INTO "transaction" (number, department, status, applicant_emails, applicant_name, '
                "updated_at, created_at) VALUES (:number, 'rights', 'under_review', :email, NULL, :now, :now)"),
                {"number": f"1446/{n:05d}", "email": f"c{n}@example.com", "now": now})
    env = {**dovecot.env(), **smtp_sink.env(), "MAILBOT_DB": fresh_pg, "MAILBOT_WORKER_SECONDS": "0.5",
           "MAILBOT_OUTBOX_SECONDS": "0.5", "MAILBOT_NOTIFY_SECONDS": "1", "MAILBOT_IMAP_POLL_SECONDS": "1",
           "MAILBOT_SMTP_CONNECTIONS": str(SMTP_CONNECTIONS)}
    daemons = [Daemon(tmp_path, index, env) for index in range(3)]
    for daemon in daemons:
        daemon.start()
    kills, failures = 0, Counter()
    stop_killing = threading.Event()

    def killer() -> None:
        nonlocal kills
        chance = random.Random(13)
        while not stop_killing.wait(chance.uniform(2.0, 4.0)):
            victim = chance.choice(daemons)
            victim.kill()
            kills += 1
            victim.start()

    try:
        for daemon in daemons:
            wait_for(lambda: "mailbot running" in daemon.log.read_text(errors="replace"), 60, daemon.log.name)
        chaos = threading.Thread(target=killer, daemon=True)
        chaos.start()
        numbers = list(range(1, MAILS + 1))
        by_imap, by_smtp = numbers[0::2], numbers[1::2]
        # The applicants' mails first, so their subscriptions exist before the back-office UPDATE.
        dovecot.append([mail(n) for n in by_imap[:ON_RECORD // 2]])
        feed_smtp(daemons, by_smtp[:ON_RECORD // 2], failures)
        wait_for(lambda: count(engine, "SELECT count(*) FROM subscription") >= ON_RECORD, 120,
                 "the applicants' subscriptions")
        smtp_feeder = threading.Thread(target=feed_smtp, args=(daemons, by_smtp[ON_RECORD // 2:], failures))
        smtp_feeder.start()
        for start in range(ON_RECORD // 2, len(by_imap), 500):
            dovecot.append([mail(n) for n in by_imap[start:start + 500]])
        with engine.begin() as connection:  # the back-office's own system, not mailbot
            connection.execute(text('UPDATE "transaction" SET status = \'completed\' WHERE number LIKE \'1446/%\''))
        smtp_feeder.join(timeout=600)
        wait_for(lambda: count(engine, "SELECT count(*) FROM message") >= MAILS, 300, "every mail archived")
        stop_killing.set()
        chaos.join(timeout=60)
        wait_for(lambda: count(engine, "SELECT count(*) FROM message WHERE state <> 'processed'") == 0
                 and count(engine, "SELECT count(*) FROM outbox WHERE state <> 'sent'") == 0
                 and count(engine, "SELECT count(*) FROM outbox WHERE template = 'status_changed'") >= ON_RECORD,
                 300, "every mail processed and every outgoing mail sent")
    finally:
        stop_killing.set()
        for daemon in daemons:
            daemon.stop()

    assert kills >= 5, kills
    assert count(engine, "SELECT count(*) FROM message") == MAILS  # archived once each
    assert count(engine, "SELECT count(DISTINCT message_id) FROM message") == MAILS
    assert count(engine, "SELECT count(*) FROM inquiry") == MAILS
    assert count(engine, "SELECT count(*) FROM message WHERE state = 'quarantined'") == 0
    accepted = smtp_sink.accepted
    acks = Counter(item.message["In-Reply-To"] for item in accepted
                   if item.message["Auto-Submitted"] == "auto-replied")
    deliveries = Counter(item.message["Message-ID"] for item in accepted)
    repeated = sum(times - 1 for times in deliveries.values())
    bound = kills * SMTP_CONNECTIONS
    print(f"chaos: {MAILS} mails, {kills} kills, {failures['smtp']} SMTP sessions cut, "
          f"{len(accepted)} deliveries, {repeated} repeated (bound {bound})")
    assert set(acks) == {f"<chaos-{n}@example.com>" for n in range(1, MAILS + 1)}  # every inquiry answered
    assert count(engine, "SELECT count(*) FROM outbox WHERE template = 'status_changed'") == ON_RECORD
    assert repeated <= bound
