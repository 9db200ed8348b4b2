"""The daemon: `mailbot run` as a real process, and run_daemon wiring IMAP, SMTP and the worker."""

from __future__ import annotations

import hashlib
import os
import signal
import smtplib
import socket
import subprocess
import threading
import time
from dataclasses import replace
from email.message import EmailMessage
from pathlib import Path
from typing import Callable

import pytest
from imapclient import IMAPClient
from sqlalchemy import select
from sqlalchemy.engine import Engine

from conftest import MAILBOT
from dovecot import Dovecot
from mailbot import db, health, jobs, rules_in_force
from mailbot.models import Message
from mailbot.settings import Settings

OFFICE = "inquiries@emirate.example"


def citizen_mail(number: int) -> bytes:
    mail = EmailMessage()
    mail["From"] = f"citizen{number}@example.com"
    mail["To"] = OFFICE
    mail["Subject"] = f"استفسار عن المعاملة رقم 1446/{number:05d}"
    mail["Message-ID"] = f"<run-{number}@example.com>"
    mail.set_content(f"أرغب في معرفة حالة معاملتي رقم 1446/{number:05d}.\n")
    return mail.as_bytes().replace(b"\n", b"\r\n")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
            return probe.recv(100).startswith(b"220")
    except OSError:
        return False


def states(engine: Engine) -> dict[str, str]:
    """sha256 -> state of every archived mail."""
    with engine.connect() as connection:
        rows = connection.execute(select(Message.__table__.c.sha256, Message.__table__.c.state))
        return dict(rows.all())


def test_mailbot_run_processes_mail_and_stops_on_sigterm_without_losing_any(
    db_url: str, engine: Engine, tmp_path: Path
):
    port = free_port()
    log_path = tmp_path / "mailbot.log"
    env = {
        **os.environ,
        "MAILBOT_DB": db_url,
        "MAILBOT_SMTP_LISTEN": f"127.0.0.1:{port}",
        "MAILBOT_WORKER_SECONDS": "0.2",
        "MAILBOT_SMTP_PASSWORD": "relay-sekret",
    }
    with log_path.open("wb") as log_file:
        daemon = subprocess.Popen([*MAILBOT, "run"], cwd=tmp_path, env=env, stdout=log_file, stderr=log_file)
    try:
        wait_for(lambda: answers(port) or daemon.poll() is not None, 30, "mailbot run to accept SMTP")
        assert daemon.poll() is None, log_path.read_text()

        first = citizen_mail(0)
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            assert client.sendmail("citizen0@example.com", [OFFICE], first) == {}
        digest = hashlib.sha256(first).hexdigest()
        wait_for(lambda: states(engine).get(digest) == "processed", 30, "the worker to process the mail")

        acknowledged: set[str] = set()
        lock = threading.Lock()
        burst_started = threading.Event()
        ended: list[object] = []

        def sender(index: int) -> None:
            number = 1 + index * 10_000
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                    client.ehlo("client.example")
                    while True:
                        raw = citizen_mail(number)
                        number += 1
                        code, reply = client.mail(f"citizen{number}@example.com")
                        if code == 250:
                            client.rcpt(OFFICE)
                            code, reply = client.data(raw)
                        if code != 250:
                            ended.append((code, reply))
                            return
                        with lock:
                            acknowledged.add(hashlib.sha256(raw).hexdigest())
                            if len(acknowledged) >= 20:
                                burst_started.set()
            except (smtplib.SMTPServerDisconnected, ConnectionError) as error:
                ended.append(error)  # the daemon went away mid-session: that mail was never acknowledged

        threads = [threading.Thread(target=sender, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        assert burst_started.wait(30)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0, log_path.read_text()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()

    archived = states(engine)
    assert len(ended) == 4
    for reason in ended:
        assert isinstance(reason, (smtplib.SMTPServerDisconnected, ConnectionError)) or reason == (
            421, b"4.3.2 Service shutting down, try again later"
        ), reason
    assert acknowledged <= set(archived)
    assert len(acknowledged) >= 20
    log_text = log_path.read_text()
    assert f"mailbot running role=ingress+sender+worker smtp=127.0.0.1:{port} lmtp=off imap=off workers=1 worker_seconds=0.2" in log_text
    assert "relay-sekret" not in log_text
    assert "mailbot stopped" in log_text


def test_mailbot_run_reports_a_port_in_use(sqlite_url: str, tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "MAILBOT_DB": sqlite_url, "MAILBOT_SMTP_LISTEN": f"127.0.0.1:{port}"}
        result = subprocess.run([*MAILBOT, "run"], cwd=tmp_path, env=env, capture_output=True, timeout=60)
    assert result.returncode == 1
    assert b"Error: cannot listen: [Errno 98] error while attempting to bind on address" in result.stderr


def test_mailbot_run_reports_an_unreachable_database(tmp_path: Path):
    env = {**os.environ, "MAILBOT_DB": "postgresql://mailbot@127.0.0.1:1/x"}
    result = subprocess.run([*MAILBOT, "run"], cwd=tmp_path, env=env, capture_output=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.decode().startswith(
        "Error: database cannot be used: OperationalError: (psycopg.OperationalError) connection failed"
    )


def test_mailbot_run_reports_a_bad_setting(tmp_path: Path):
    env = {**os.environ, "MAILBOT_WORKER_SECONDS": "often"}
    result = subprocess.run([*MAILBOT, "run"], cwd=tmp_path, env=env, capture_output=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.decode() == "Error: MAILBOT_WORKER_SECONDS has value 'often'. Not a valid number.\n"


def test_run_daemon_runs_imap_smtp_and_lmtp_intake_and_the_worker(engine: Engine, dovecot: Dovecot):
    by_imap, by_smtp, by_lmtp = citizen_mail(1), citizen_mail(2), citizen_mail(3)
    with IMAPClient(dovecot.host, port=dovecot.port, ssl=False) as client:
        client.login(dovecot.user, dovecot.password)
        client.append("INBOX", by_imap)
    smtp_port, lmtp_port = free_port(), free_port()
    settings = Settings(
        db_url=engine.url.render_as_string(hide_password=False),
        imap_host=dovecot.host,
        imap_port=dovecot.port,
        imap_user=dovecot.user,
        imap_password=dovecot.password,
        imap_tls="none",
        imap_poll_seconds=0.2,
        smtp_listen=("127.0.0.1", smtp_port),
        lmtp_listen=("127.0.0.1", lmtp_port),
        worker_seconds=0.1,
    )
    stop = threading.Event()
    daemon = threading.Thread(target=jobs.run_daemon, args=(settings, stop))
    daemon.start()
    try:
        wait_for(lambda: answers(smtp_port) or not daemon.is_alive(), 30, "SMTP")
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as client:
            assert client.sendmail("citizen2@example.com", [OFFICE], by_smtp) == {}
        with smtplib.LMTP("127.0.0.1", lmtp_port) as client:
            assert client.sendmail("citizen3@example.com", [OFFICE], by_lmtp) == {}
        wanted = {hashlib.sha256(raw).hexdigest(): "processed" for raw in (by_imap, by_smtp, by_lmtp)}
        wait_for(lambda: states(engine) == wanted, 30, "all three intakes to deliver and the worker to process")
    finally:
        stop.set()
        daemon.join(timeout=60)
    assert not daemon.is_alive()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", smtp_port), timeout=5)


def test_run_daemon_with_smtp_off_and_lmtp_off(sqlite_url: str, caplog: pytest.LogCaptureFixture):
    settings = replace(Settings(db_url=sqlite_url), smtp_listen=None, lmtp_listen=None)
    stop = threading.Event()
    stop.set()
    with caplog.at_level("INFO", logger="mailbot.jobs"):
        jobs.run_daemon(settings, stop)
    assert "mailbot running role=ingress+sender+worker smtp=off lmtp=off imap=off workers=1 worker_seconds=1.0" in caplog.text
    assert "mailbot stopped" in caplog.text


def rcpt_answer(port: int, address: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo()
        client.mail("someone@example.com")
        return client.rcpt(address)[0]


def test_edited_rules_are_picked_up_within_5_seconds_and_a_bad_edit_keeps_the_rules_in_force(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    shipped = Path(__file__).resolve().parent.parent / "rules"
    for path in shipped.glob("*.yaml"):
        (rules_dir / path.name).write_bytes(path.read_bytes())
    departments = rules_dir / "departments.yaml"
    port = free_port()
    settings = replace(Settings(db_url=sqlite_url), rules_dir=rules_dir, smtp_listen=("127.0.0.1", port),
                       rules_reload_seconds=0.5)
    stop = threading.Event()
    daemon = threading.Thread(target=jobs.run_daemon, args=(settings, stop))
    with caplog.at_level("INFO", logger="mailbot.rules"):
        daemon.start()
        try:
            wait_for(lambda: answers(port) or not daemon.is_alive(), 30, "SMTP")
            assert rcpt_answer(port, "visits@emirate.example") == 550
            # An admin adds an alias to the prisons department.
            departments.write_text(departments.read_text(encoding="utf-8").replace(
                "aliases: [prisons@emirate.example]", "aliases: [prisons@emirate.example, visits@emirate.example]"),
                encoding="utf-8")
            wait_for(lambda: rcpt_answer(port, "visits@emirate.example") == 250, 5, "the new alias to be accepted")
            engine = db.get_engine(sqlite_url)
            wait_for(lambda: "visits@" in rules_in_force.saved(engine).files["departments.yaml"], 5,
                     "the new rules kept in the database for the commands")
            assert [daemon.id for daemon in health.daemons(engine)] == [health.daemon_id()]
            # A typo on Thursday evening: refused, the rules in force stay.
            departments.write_text(departments.read_text(encoding="utf-8").replace(
                "sla_hours: 24", "sla_hourz: 24", 1), encoding="utf-8")
            wait_for(lambda: "reload refused" in caplog.text, 5, "the bad edit to be refused")
            assert rcpt_answer(port, "visits@emirate.example") == 250
            wait_for(lambda: "sla_hourz" in (rules_in_force.saved(engine).refused or ""), 5,
                     "the refusal noted for `mailbot status`")
            assert "visits@" in rules_in_force.saved(engine).files["departments.yaml"]  # the good ones stay kept
        finally:
            stop.set()
            daemon.join(timeout=60)
    assert "departments.yaml:" in caplog.text and "sla_hourz" in caplog.text
    assert health.daemons(engine) == []  # a clean stop removes the heartbeat


def test_the_start_line_says_where_outgoing_mail_goes_and_unknown_variables_are_warned(
        sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    stop = threading.Event()
    stop.set()
    maildir = replace(Settings(db_url=sqlite_url), smtp_listen=None, sent_maildir=tmp_path / "sent",
                      warnings=("MAILBOT_SMPT_HOST: unknown; did you mean MAILBOT_SMTP_HOST?",))
    relay = replace(Settings(db_url=sqlite_url), smtp_listen=None, smtp_host="relay.example", smtp_port=2587)
    with caplog.at_level("INFO", logger="mailbot.jobs"):
        jobs.run_daemon(maildir, stop)
        jobs.run_daemon(relay, stop)
    assert f"outgoing=maildir:{tmp_path / 'sent'}" in caplog.text
    assert "outgoing=smtp://relay.example:2587(tls=starttls)" in caplog.text
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "MAILBOT_SMPT_HOST" in r.getMessage()]
    assert len(warned) == 1 and "did you mean MAILBOT_SMTP_HOST?" in warned[0].getMessage()


def test_status_run_while_a_fresh_daemon_creates_the_schema_does_not_break_it(tmp_path: Path):
    """`mailbot status` used to migrate too, and two migrations at once made the daemon exit
    with 'table "transaction" already exists'."""
    database = tmp_path / "fresh.db"
    env = {**os.environ, "MAILBOT_DB": f"sqlite:///{database}", "MAILBOT_SMTP_LISTEN": ""}
    log_path = tmp_path / "mailbot.log"
    with log_path.open("wb") as log_file:
        daemon = subprocess.Popen([*MAILBOT, "run"], cwd=tmp_path, env=env, stdout=log_file, stderr=log_file)
    answers = []
    try:
        deadline = time.monotonic() + 60
        while "mailbot running" not in log_path.read_text() and daemon.poll() is None:
            assert time.monotonic() < deadline, log_path.read_text()
            status = subprocess.run([*MAILBOT, "status"], cwd=tmp_path, env=env, capture_output=True, timeout=60)
            answers.append((status.returncode, status.stderr.decode()))
        assert daemon.poll() is None, log_path.read_text()
        running = subprocess.run([*MAILBOT, "status"], cwd=tmp_path, env=env, capture_output=True, timeout=60)
        assert running.returncode == 0, running.stderr.decode()
        assert f"daemon {socket.gethostname()}:{daemon.pid}: mailbot " in running.stdout.decode()
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0, log_path.read_text()
    stopped = subprocess.run([*MAILBOT, "status"], cwd=tmp_path, env=env, capture_output=True, timeout=60)
    assert stopped.returncode == 1 and "no daemon: no `mailbot run` is serving this database" in stopped.stderr.decode()
    assert answers, "status never ran while the daemon started"
    for code, stderr in answers:
        # Before the schema is whole, status says so and changes nothing; after, it reports.
        assert (code == 0 or "database file" in stderr or "database: not ready" in stderr
                or "no daemon" in stderr), stderr
    assert "already exists" not in log_path.read_text()
