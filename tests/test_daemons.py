"""Several `mailbot run` on one database: PostgreSQL lets them start together; an SQLite file
takes one daemon."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from conftest import MAILBOT, create_pg_database, drop_pg_database
from dovecot import Dovecot
from mailbot import db
from smtpsink import SmtpSink, free_port
from test_jobs import wait_for
from test_journey import citizen_mail


def start(tmp_path: Path, name: str, database: str, args: tuple[str, ...] = (), **extra: str
          ) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"{name}.log"
    env = {**os.environ, "MAILBOT_DB": database, "MAILBOT_SMTP_LISTEN": "", "MAILBOT_SENT_MAILDIR": str(tmp_path / "sent"),
           **extra}
    with log.open("wb") as out:
        process = subprocess.Popen([*MAILBOT, "run", *args], cwd=tmp_path, env=env, stdout=out, stderr=out)
    return process, log


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def test_a_second_daemon_on_the_same_sqlite_file_is_refused_and_a_crashed_one_is_not(tmp_path: Path):
    database = f"sqlite:///{tmp_path / 'mailbot.db'}"
    first, first_log = start(tmp_path, "first", database)
    try:
        wait_for(lambda: "mailbot running" in first_log.read_text() or first.poll() is not None, 60, "the first daemon")
        second, second_log = start(tmp_path, "second", database)
        assert second.wait(timeout=60) == 1
        assert (f"another mailbot run (pid {first.pid}) serves {tmp_path / 'mailbot.db'}: one daemon per SQLite file"
                in second_log.read_text())
        first.send_signal(signal.SIGKILL)  # a crash: the kernel drops the lock, a restart is not refused
        first.wait(timeout=30)
        third, third_log = start(tmp_path, "third", database)
        try:
            wait_for(lambda: "mailbot running" in third_log.read_text() or third.poll() is not None, 60, "the restart")
            assert third.poll() is None, third_log.read_text()
        finally:
            stop(third)
    finally:
        stop(first)


@pytest.fixture
def fresh_pg() -> str:
    url = create_pg_database()
    yield url
    drop_pg_database(url)


def test_three_daemons_started_together_on_an_empty_postgresql_database_all_come_up(tmp_path: Path, fresh_pg: str):
    """Before the migration lock one of two such daemons died with UniqueViolation
    (pg_type_typname_nsp_index).  The test holds the lock while they start, so all three
    must wait for it, and then find the schema to make."""
    holder = psycopg.connect(fresh_pg.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
    holder.execute("SELECT pg_advisory_lock(%s)", (db.MIGRATION_LOCK,))
    daemons = [start(tmp_path, f"d{n}", fresh_pg) for n in range(3)]
    try:
        def blocked() -> int:
            return holder.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                                  ).fetchone()[0]

        wait_for(lambda: blocked() == 3 or any(p.poll() is not None for p, _log in daemons), 60,
                 "all three daemons waiting for the migration lock")
        assert all(process.poll() is None for process, _log in daemons)
        holder.execute("SELECT pg_advisory_unlock(%s)", (db.MIGRATION_LOCK,))
        for process, log in daemons:
            wait_for(lambda: "mailbot running" in log.read_text() or process.poll() is not None, 90, log.name)
        logs = [log.read_text() for _process, log in daemons]
        assert all(process.poll() is None for process, _log in daemons), logs
        assert all("waited for another daemon's migration" in text for text in logs), logs
        assert not any("UniqueViolation" in text or "already exists" in text for text in logs), logs
    finally:
        holder.close()
        for process, _log in daemons:
            stop(process)


def unsent(url: str) -> int:
    """How many outbox rows are not yet recorded as sent."""
    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as connection:
        row = connection.execute("SELECT count(*) FROM outbox WHERE state <> 'sent'").fetchone()
    return row[0] if row else 0


def test_one_daemon_of_two_fetches_the_inbox_and_the_other_takes_over_within_10_s_when_it_dies(
        tmp_path: Path, fresh_pg: str, dovecot: Dovecot, smtp_sink: SmtpSink):
    env = {**dovecot.env(), **smtp_sink.env(), "MAILBOT_IMAP_POLL_SECONDS": "0.5", "MAILBOT_WORKER_SECONDS": "0.2",
           "MAILBOT_OUTBOX_SECONDS": "0.2"}
    db.upgrade(fresh_pg)
    daemons = [start(tmp_path, f"d{n}", fresh_pg, **env) for n in range(2)]
    try:
        for process, log in daemons:
            wait_for(lambda: "mailbot running" in log.read_text() or process.poll() is not None, 60, log.name)
        wait_for(lambda: sum("holding the inbox" in log.read_text() for _p, log in daemons) == 1
                 and sum("standing by" in log.read_text() for _p, log in daemons) == 1, 10, "one holder, one standby")
        dovecot.append([citizen_mail("<before@example.com>", "أرجو إفادتي عن المعاملة رقم 1446/00321")])
        wait_for(lambda: acknowledged(smtp_sink, "<before@example.com>"), 30, "the first mail answered")
        # A daemon killed between the relay's 250 and recording "sent" sends again (at least once, by design):
        # kill only once the acknowledgement is recorded, so a second copy can only come from a re-fetch.
        wait_for(lambda: not unsent(fresh_pg), 10, "the acknowledgement recorded as sent")
        [(holder, holder_log)] = [(p, log) for p, log in daemons if "holding the inbox" in log.read_text()]
        [(standby, standby_log)] = [(p, log) for p, log in daemons if p is not holder]
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        killed_at = time.monotonic()
        dovecot.append([citizen_mail("<after@example.com>", "أرجو إفادتي عن المعاملة رقم 1446/00322")])
        wait_for(lambda: "holding the inbox" in standby_log.read_text(), 10, "the standby to take the inbox")
        wait_for(lambda: acknowledged(smtp_sink, "<after@example.com>"), 10, "the mail after the kill answered")
        took = time.monotonic() - killed_at
        print(f"IMAP failover: the mail after the kill answered {took:.1f} s after it")
        assert took < 10, took
        assert len(acknowledged(smtp_sink, "<before@example.com>")) == 1  # resumed from the stored UIDs
    finally:
        for process, _log in daemons:
            stop(process)


def acknowledged(sink: SmtpSink, message_id: str) -> list:
    return [item for item in sink.accepted if item.message["In-Reply-To"] == message_id]


def test_three_idle_daemons_answer_a_mail_within_a_second_at_p95(
        tmp_path: Path, fresh_pg: str, dovecot: Dovecot, smtp_sink: SmtpSink):
    """IMAP IDLE brings the mail, NOTIFY wakes a worker and then the outbox: no timer is waited
    for (they are set to 30 s here, so an answer within a second can only come from a wake-up).
    Of the ~0.7 s measured, ~0.53 s is Dovecot's own delay before it announces a new mail in IDLE."""
    env = {**dovecot.env(), **smtp_sink.env(), "MAILBOT_NOTIFY_SECONDS": "30", "MAILBOT_WORKER_SECONDS": "30",
           "MAILBOT_OUTBOX_SECONDS": "30"}
    db.upgrade(fresh_pg)
    daemons = [start(tmp_path, f"d{n}", fresh_pg, **env) for n in range(3)]
    try:
        for process, log in daemons:
            wait_for(lambda: "mailbot running" in log.read_text() or process.poll() is not None, 60, log.name)
        wait_for(lambda: any("holding the inbox" in log.read_text() for _p, log in daemons), 10, "the inbox held")
        time.sleep(2)  # idle: the holder in IDLE, the workers and jobs waiting
        latencies = []
        for n in range(20):
            message_id = f"<latency-{n}@example.com>"
            appended = time.monotonic()
            dovecot.append([citizen_mail(message_id, f"أرجو إفادتي عن المعاملة رقم 1446/{n + 500:05d}",
                                         sender=f"c{n}@example.com")])
            wait_for(lambda: acknowledged(smtp_sink, message_id), 30, message_id)
            latencies.append(time.monotonic() - appended)
            time.sleep(0.3)
        latencies.sort()
        p95 = latencies[int(0.95 * len(latencies)) - 1]
        print(f"APPEND -> relay with 3 idle daemons: median {latencies[10]:.2f} s, p95 {p95:.2f} s, max {latencies[-1]:.2f} s")
        assert p95 < 1.0, latencies
    finally:
        for process, _log in daemons:
            stop(process)


def test_a_dead_daemons_claimed_mail_is_sent_by_another_after_its_lease_and_never_by_two(
        tmp_path: Path, fresh_pg: str, smtp_sink: SmtpSink):
    """Two daemons on two "machines" (each in its own UTS namespace, so each has its own host
    name and neither can see whether the other's process lives): the one that claimed the
    acknowledgement dies while the relay holds its DATA.  The other leaves the mail alone while
    the lease runs, then sends it once.  The lease's end is written by the test (an UPDATE of
    the row's deadline) rather than waited for: outbox.LEASE is 90 s."""
    env = {**smtp_sink.env(), "MAILBOT_WORKER_SECONDS": "0.2", "MAILBOT_OUTBOX_SECONDS": "0.2"}
    db.upgrade(fresh_pg)
    smtp_sink.stall(1)
    daemons = {}
    for host in ("machine-a", "machine-b"):
        port = free_port()
        log = tmp_path / f"{host}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *MAILBOT, "run"],
                cwd=tmp_path, stdout=out, stderr=out,
                env={**os.environ, **env, "MAILBOT_DB": fresh_pg, "MAILBOT_SMTP_LISTEN": f"127.0.0.1:{port}",
                     "MAILBOT_SENT_MAILDIR": str(tmp_path / "sent")})
        daemons[host] = (process, log, port)
    try:
        for process, log, _port in daemons.values():
            wait_for(lambda: "mailbot running" in log.read_text() or process.poll() is not None, 60, log.name)
            assert process.poll() is None, log.read_text()
        message_id = "<lease@example.com>"
        with smtplib.SMTP("127.0.0.1", daemons["machine-a"][2]) as client:
            client.sendmail("citizen@example.com", ["inquiries@emirate.example"],
                            citizen_mail(message_id, "أرجو إفادتي عن المعاملة رقم 1446/00777"))
        wait_for(lambda: smtp_sink.stalled == 1 and acknowledged(smtp_sink, message_id), 30,
                 "the acknowledgement sent and the next mail held at DATA")
        [(row_id, recipient, holder, attempts)] = outbox_rows(fresh_pg)  # the forward to the queue
        assert attempts == 1
        [survivor] = [host for host in daemons if not holder.startswith(f"{host}:")]
        daemons[holder.partition(":")[0]][0].send_signal(signal.SIGKILL)
        daemons[holder.partition(":")[0]][0].wait(timeout=30)

        def delivered() -> list:
            return [item for item in smtp_sink.accepted if recipient in item.rcpt_tos]

        time.sleep(3)  # the survivor polls every 0.2 s: the lease keeps it off the mail
        assert delivered() == []
        assert outbox_rows(fresh_pg) == [(row_id, recipient, holder, 1)]

        with psycopg.connect(fresh_pg.replace("postgresql+psycopg", "postgresql")) as connection:
            connection.execute("UPDATE outbox SET next_attempt_at = now() - interval '1 second' WHERE id = %s",
                               (row_id,))
        wait_for(delivered, 30, "the survivor to send the held mail")
        time.sleep(2)
        assert len(delivered()) == 1 and len(acknowledged(smtp_sink, message_id)) == 1
        [(_id, _recipient, owner, attempts)] = outbox_rows(fresh_pg, state="sent", row_id=row_id)
        assert owner.startswith(f"{survivor}:") and attempts == 2
    finally:
        for process, _log, _port in daemons.values():
            stop(process)


def outbox_rows(url: str, state: str = "sending", row_id: int | None = None) -> list[tuple[int, str, str, int]]:
    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as connection:
        return [tuple(row) for row in connection.execute(
            "SELECT id, recipient, lease_owner, attempts FROM outbox WHERE state = %s AND id = coalesce(%s, id)",
            (state, row_id))]


def test_three_daemons_of_three_roles_answer_a_mail_together_and_sqlite_refuses_a_role(
        tmp_path: Path, fresh_pg: str, smtp_sink: SmtpSink):
    """Intake near the mail server, workers and the sender elsewhere: none of them alone
    answers a mail, the three together do."""
    env = {**smtp_sink.env(), "MAILBOT_WORKER_SECONDS": "0.2", "MAILBOT_OUTBOX_SECONDS": "0.2"}
    db.upgrade(fresh_pg)
    port = free_port()
    daemons = {role: start(tmp_path, role, fresh_pg, **env, **({"MAILBOT_SMTP_LISTEN": f"127.0.0.1:{port}"}
                                                                if role == "ingress" else {}), args=("--role", role))
               for role in ("ingress", "worker", "sender")}
    try:
        for process, log in daemons.values():
            wait_for(lambda: "mailbot running" in log.read_text() or process.poll() is not None, 60, log.name)
            assert process.poll() is None, log.read_text()
        assert f"mailbot running role=ingress smtp=127.0.0.1:{port}" in daemons["ingress"][1].read_text()
        assert "workers=0" in daemons["ingress"][1].read_text()
        assert "mailbot running role=worker smtp=off lmtp=off imap=off workers=1" in daemons["worker"][1].read_text()
        assert "mailbot running role=sender smtp=off" in daemons["sender"][1].read_text()
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.sendmail("citizen@example.com", ["inquiries@emirate.example"],
                            citizen_mail("<roles@example.com>", "أرجو إفادتي عن المعاملة رقم 1446/00778"))
        wait_for(lambda: acknowledged(smtp_sink, "<roles@example.com>"), 30, "the acknowledgement")
        stop(daemons["sender"][0])  # no sender: the next answer waits in the outbox, not lost
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.sendmail("citizen@example.com", ["inquiries@emirate.example"],
                            citizen_mail("<roles-2@example.com>", "أرجو إفادتي عن المعاملة رقم 1446/00779",
                                         sender="other@example.com"))
        time.sleep(3)
        assert acknowledged(smtp_sink, "<roles-2@example.com>") == []
    finally:
        for process, _log in daemons.values():
            stop(process)

    refused, refused_log = start(tmp_path, "sqlite", f"sqlite:///{tmp_path / 'one.db'}", args=("--role", "worker"))
    assert refused.wait(timeout=60) == 1
    assert "--role worker needs PostgreSQL: an SQLite file takes one daemon" in refused_log.read_text()


def test_a_rules_edit_on_one_machine_reaches_the_other_daemons_ingress_and_workers(
        tmp_path: Path, fresh_pg: str, smtp_sink: SmtpSink):
    """Each daemon has its own rules folder (two machines).  An alias added on machine A's disk
    is accepted at B's SMTP ingress and routed by B's worker, with B's folder unchanged."""
    env = {**smtp_sink.env(), "MAILBOT_WORKER_SECONDS": "0.2", "MAILBOT_OUTBOX_SECONDS": "0.2",
           "MAILBOT_RULES_RELOAD_SECONDS": "0.5"}
    db.upgrade(fresh_pg)
    folders = {name: tmp_path / f"rules-{name}" for name in ("a", "b")}
    for folder in folders.values():
        shutil.copytree(Path(__file__).parent.parent / "rules", folder)
    port = free_port()
    a = start(tmp_path, "a", fresh_pg, args=("--role", "sender"), **env, MAILBOT_RULES=str(folders["a"]))
    b = start(tmp_path, "b", fresh_pg, **env, MAILBOT_RULES=str(folders["b"]),
              MAILBOT_SMTP_LISTEN=f"127.0.0.1:{port}")
    try:
        for process, log in (a, b):
            wait_for(lambda: "mailbot running" in log.read_text() or process.poll() is not None, 60, log.name)
            assert process.poll() is None, log.read_text()

        def rcpt() -> int:
            with smtplib.SMTP("127.0.0.1", port) as client:
                client.ehlo()
                client.mail("citizen@example.com")
                return client.rcpt("visits@emirate.example")[0]

        assert rcpt() == 550
        departments = folders["a"] / "departments.yaml"
        departments.write_text(departments.read_text(encoding="utf-8").replace(
            "aliases: [prisons@emirate.example]", "aliases: [prisons@emirate.example, visits@emirate.example]"),
            encoding="utf-8")
        wait_for(lambda: rcpt() == 250, 10, "B's ingress to accept the alias added on A")
        assert "adopted the edit another daemon saved" in b[1].read_text()
        mail = citizen_mail("<visits@example.com>", "أرجو إفادتي عن المعاملة رقم 1446/00780")
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.sendmail("citizen@example.com", ["visits@emirate.example"],
                            mail.replace(b"To: inquiries@emirate.example", b"To: visits@emirate.example"))
        prisons_queue = next(line.split(":", 1)[1].strip() for line in departments.read_text().splitlines()
                             if "queue" in line and "prisons" in line)
        wait_for(lambda: any(prisons_queue in item.rcpt_tos for item in smtp_sink.accepted), 30,
                 "the forward to the prisons queue, routed by B's worker")
    finally:
        for process, _log in (a, b):
            stop(process)
