"""Worker processes: how they share the mail, and `mailbot run` supervising them as real processes."""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import threading
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from conftest import MAILBOT
from mailbot import db, pipeline, store, workers
from mailbot.models import Inquiry, Message, Outbox
from mailbot.rules import Rules
from mailbot.settings import Settings
from test_jobs import OFFICE, answers, citizen_mail, free_port, wait_for


def worker_pids(daemon: int) -> set[int]:
    """The daemon's live worker processes: the children of its fork server (the resource tracker
    is not one; a killed worker not yet reaped is not one either)."""
    parents: dict[int, int] = {}
    servers = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if fields[0] == "Z":
            continue
        parents[int(entry.name)] = int(fields[1])
        if b"forkserver" in command and int(fields[1]) == daemon:
            servers.add(int(entry.name))
    return {pid for pid, parent in parents.items() if parent in servers}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def processed_ids(engine: Engine) -> set[int]:
    with engine.connect() as connection:
        return set(connection.execute(select(Message.id).where(Message.state == "processed")).scalars())


def test_workers_on_sqlite_split_the_mail_by_id(sqlite_url: str, rules: Rules):
    db.upgrade(sqlite_url)
    engine = db.get_engine(sqlite_url)
    ids = [store.store_raw(engine, citizen_mail(number), origin="smtp").id for number in range(10)]

    assert pipeline.process_pending(engine, rules, share=(0, 2)) == 5
    assert processed_ids(engine) == {i for i in ids if i % 2 == 0}
    assert pipeline.process_pending(engine, rules, share=(0, 2)) == 0
    assert pipeline.process_pending(engine, rules, share=(1, 2)) == 5
    assert processed_ids(engine) == set(ids)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_workers_on_postgresql_take_any_mail_whatever_their_share(engine: Engine, rules: Rules):
    ids = [store.store_raw(engine, citizen_mail(number), origin="smtp").id for number in range(6)]
    assert pipeline.process_pending(engine, rules, share=(1, 2)) == 6
    assert processed_ids(engine) == set(ids)


def test_mailbot_run_with_two_workers_answers_each_mail_once_restarts_a_dead_worker_and_takes_them_down(
    db_url: str, engine: Engine, tmp_path: Path
):
    port = free_port()
    log_path = tmp_path / "mailbot.log"
    env = {
        **os.environ, "MAILBOT_DB": db_url, "MAILBOT_SMTP_LISTEN": f"127.0.0.1:{port}",
        "MAILBOT_WORKERS": "2", "MAILBOT_WORKER_SECONDS": "0.1", "MAILBOT_OUTBOX_SECONDS": "60",
    }
    with log_path.open("wb") as log_file:
        daemon = subprocess.Popen([*MAILBOT, "run"], cwd=tmp_path, env=env, stdout=log_file, stderr=log_file)
    try:
        wait_for(lambda: answers(port) or daemon.poll() is not None, 30, "mailbot run to accept SMTP")
        assert daemon.poll() is None, log_path.read_text()
        wait_for(lambda: len(worker_pids(daemon.pid)) == 2, 30, "two worker processes")
        first_workers = worker_pids(daemon.pid)

        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            for number in range(30):
                assert client.sendmail(f"citizen{number}@example.com", [OFFICE], citizen_mail(number)) == {}
        wait_for(lambda: len(processed_ids(engine)) == 30, 60, "30 mails processed by the workers")

        # One worker is killed: the daemon starts another, and mail of its share is processed again.
        victim = min(first_workers)
        os.kill(victim, signal.SIGKILL)
        def replaced() -> bool:
            now = worker_pids(daemon.pid)
            return len(now) == 2 and victim not in now

        wait_for(replaced, 30, "the dead worker to be replaced")
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            for number in range(30, 40):
                assert client.sendmail(f"citizen{number}@example.com", [OFFICE], citizen_mail(number)) == {}
        wait_for(lambda: len(processed_ids(engine)) == 40, 60, "10 more mails processed")

        # SIGKILL of the daemon takes its workers with it: no orphan goes on beside a restarted daemon.
        last_workers = worker_pids(daemon.pid)
        daemon.kill()
        daemon.wait()
        wait_for(lambda: not any(alive(pid) for pid in last_workers), 10, "the workers to die with the daemon")
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()

    with engine.connect() as connection:
        inquiries = connection.execute(select(Inquiry.message, func.count()).group_by(Inquiry.message)).all()
        acks = connection.execute(
            select(func.count()).select_from(Outbox).where(Outbox.template.like("ack%"))
        ).scalar_one()
    assert len(inquiries) == 40 and all(count == 1 for _message, count in inquiries)
    assert acks == 40
    log_text = log_path.read_text()
    assert "workers=2" in log_text
    assert f"worker 1 of 2 exited with -{signal.SIGKILL}; starting it again" in log_text or \
        f"worker 2 of 2 exited with -{signal.SIGKILL}; starting it again" in log_text


def test_a_worker_waits_out_an_unreachable_database_and_goes_on(caplog):
    settings = Settings(db_url="postgresql://mailbot@127.0.0.1:1/mailbot", worker_seconds=0.2)
    stop = threading.Event()
    worker = threading.Thread(target=workers.work_until_stopped, args=(settings, (0, 1), stop))
    worker.start()
    wait_for(lambda: caplog.text.count("database unavailable") >= 2, 30, "two failed tries")
    stop.set()
    worker.join(timeout=30)
    assert not worker.is_alive()
    tries = [r.getMessage() for r in caplog.records if "database unavailable" in r.getMessage()]
    assert tries[0].startswith("worker 1 of 1: database unavailable, trying again in 0.2 s: OperationalError: ")
    assert "trying again in 0.4 s" in tries[1]  # the wait doubles
