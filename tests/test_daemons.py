"""Several `mailbot run` on one database: PostgreSQL lets them start together; an SQLite file
takes one daemon."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from conftest import MAILBOT, create_pg_database, drop_pg_database
from mailbot import db
from test_jobs import wait_for


def start(tmp_path: Path, name: str, database: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"{name}.log"
    env = {**os.environ, "MAILBOT_DB": database, "MAILBOT_SMTP_LISTEN": "", "MAILBOT_SENT_MAILDIR": str(tmp_path / "sent")}
    with log.open("wb") as out:
        process = subprocess.Popen([*MAILBOT, "run"], cwd=tmp_path, env=env, stdout=out, stderr=out)
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
        time.sleep(3)  # all three started and blocked on the lock
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
