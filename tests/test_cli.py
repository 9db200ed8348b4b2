"""CLI: `status` and `quarantine list|show|retry`, run against real databases."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import update
from sqlalchemy.engine import Engine

from mailbot import db, health, pipeline, rules_in_force, store
from mailbot.models import Daemon, IntakeState, Message
from mailbot.cli import cli
from mailbot.rules import Rules

GOOD = (
    "From: =?utf-8?b?2YXZiNin2LfZhg==?= <citizen@example.com>\r\n"
    "To: inquiries@emirate.example\r\n"
    "Subject: =?utf-8?b?2KfYs9iq2YHYs9in2LEg2LnZhiDZhdi52KfZhdmE2Kk=?=\r\n"
    "Date: Mon, 23 Nov 2026 10:00:00 +0300\r\n"
    "Message-ID: <good@example.com>\r\n"
    "\r\n"
).encode() + "أرجو إفادتي عن المعاملة رقم 1445/00123\r\n".encode()
BOOM = GOOD.replace(b"<good@example.com>", b"<boom@example.com>")


@pytest.fixture
def invoke(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # no stray .env from the working tree

    def run(*args: str, database: str = db_url) -> Result:
        return CliRunner().invoke(cli, list(args), env={"MAILBOT_DB": database}, catch_exceptions=False)

    return run


@pytest.fixture
def serving(engine: Engine) -> None:
    """A daemon's heartbeat in the database, as `mailbot run` writes it."""
    health.beat(engine, db.utcnow())


@pytest.fixture
def quarantined(engine: Engine, rules: Rules, exploding_parse) -> int:
    """One good mail processed, one quarantined by a stage that raised."""
    store.store_raw(engine, GOOD, origin="smtp")
    boom = store.store_raw(engine, BOOM, origin="lmtp").id
    assert pipeline.process_pending(engine, rules) == 2
    exploding_parse.repair()
    return boom


def test_status_json_counts_messages_by_state(invoke, engine: Engine, quarantined: int, serving: None):
    store.store_raw(engine, b"From: late@example.com\r\n\r\nlate\r\n", origin="smtp")
    result = invoke("status", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["database"] == "ok"
    assert report["messages"] == {"received": 1, "processed": 1, "quarantined": 1}


def test_status_fails_while_stored_mail_waits_unprocessed(invoke, engine: Engine, serving: None):
    late = store.store_raw(engine, b"From: late@example.com\r\n\r\nlate\r\n", origin="smtp").id
    fresh = invoke("status", "--json")
    assert fresh.exit_code == 0, fresh.output
    assert json.loads(fresh.stdout)["processing"]["waiting"] == 1
    # Ten minutes without a worker taking it: the workers are down or stuck; the operator is paged.
    with engine.begin() as connection:
        connection.execute(update(Message.__table__).where(Message.__table__.c.id == late)
                           .values(received_at=db.utcnow() - timedelta(minutes=11)))
    stuck = invoke("status", "--json")
    assert stuck.exit_code == 1
    assert json.loads(stuck.stdout)["processing"]["stuck"] == 1
    text = invoke("status")
    assert "processing: 1 waiting, oldest received" in text.stdout
    assert "processing stuck: 1 mail(s) stored over 10 minutes ago and not processed" in text.stderr


def test_status_text(invoke, quarantined: int, serving: None):
    result = invoke("status")
    assert result.exit_code == 0
    assert "database: ok" in result.stdout
    assert "  quarantined  1" in result.stdout


def test_status_exits_non_zero_when_the_database_is_unreachable(invoke):
    result = invoke("status", "--json", database="postgresql://mailbot@127.0.0.1:1/x")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["database"] == "unreachable"
    assert report["error"].startswith("OperationalError: (psycopg.OperationalError) connection failed")


def test_status_reports_imap_health_and_fails_while_imap_keeps_failing(invoke, engine: Engine, serving: None):
    from mailbot.intake.imap import record_health

    record_health(engine)
    healthy = invoke("status", "--json")
    assert healthy.exit_code == 0, healthy.output
    assert json.loads(healthy.stdout)["intake"]["imap"]["failing"] is False
    # A reconnect that has not succeeded for longer than the grace period pages the operator.
    with engine.begin() as connection:
        connection.execute(
            update(IntakeState.__table__).values(last_ok_at=db.utcnow() - timedelta(minutes=11))
        )
    record_health(engine, "LoginError: authentication failed")
    failing = invoke("status")
    assert failing.exit_code == 1
    assert "intake imap failing: LoginError: authentication failed" in failing.stderr
    record_health(engine)
    assert invoke("status").exit_code == 0


def test_quarantine_list_shows_id_received_message_id_and_reason(invoke, engine: Engine, quarantined: int):
    result = invoke("quarantine", "list")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    number, day, time, message_id, reason = lines[0].split(maxsplit=4)
    assert int(number) == quarantined
    assert len(day) == 10 and len(time) == 8
    assert message_id == "<boom@example.com>"
    assert reason == "RuntimeError: stage exploded on purpose"


def test_quarantine_show_gives_headers_and_the_full_reason(invoke, quarantined: int):
    result = invoke("quarantine", "show", str(quarantined))
    assert result.exit_code == 0
    out = result.stdout
    assert f"mail:     {quarantined}\n" in out
    assert " UTC via lmtp\n" in out
    assert f"size:     {len(BOOM)} bytes\n" in out
    assert "From:       مواطن <citizen@example.com>\n" in out
    assert "Subject:    استفسار عن معاملة\n" in out
    assert "Message-ID: <boom@example.com>\n" in out
    assert "reason:\nRuntimeError: stage exploded on purpose\n" in out
    assert "Traceback (most recent call last):" in out
    assert 'raise RuntimeError("stage exploded on purpose")' in out


def test_quarantine_retry_puts_the_mail_back_and_the_worker_processes_it(
    invoke, engine: Engine, rules: Rules, quarantined: int
):
    result = invoke("quarantine", "retry", str(quarantined))
    assert (result.exit_code, result.stdout) == (0, "1 mail(s) queued again\n")
    assert store.count_by_state(engine)["received"] == 1
    assert pipeline.process_pending(engine, rules) == 1
    assert store.count_by_state(engine) == {"received": 0, "processed": 2, "quarantined": 0}
    assert invoke("quarantine", "list").stdout == ""


def test_quarantine_retry_all(invoke, engine: Engine, quarantined: int):
    store.quarantine(engine, store.store_raw(engine, b"\x00junk", origin="smtp").id, "ParseError: no headers")
    result = invoke("quarantine", "retry", "--all")
    assert (result.exit_code, result.stdout) == (0, "2 mail(s) queued again\n")
    assert store.count_by_state(engine)["quarantined"] == 0


def test_unknown_or_not_quarantined_id_is_a_clear_error(invoke, engine: Engine, quarantined: int):
    processed = quarantined - 1
    for args in (("show", "999"), ("retry", "999"), ("show", str(processed)), ("retry", str(processed))):
        result = invoke("quarantine", *args)
        assert result.exit_code == 1
        assert result.stderr == f"Error: mail {args[1]} is not in quarantine\n"


def test_quarantine_bad_arguments_are_usage_errors(invoke):
    both = invoke("quarantine", "retry", "3", "--all")
    assert both.exit_code == 2
    assert "Error: give a mail ID or --all (not both)" in both.stderr
    neither = invoke("quarantine", "retry")
    assert neither.exit_code == 2
    assert "Error: give a mail ID or --all (not both)" in neither.stderr
    not_a_number = invoke("quarantine", "show", "abc")
    assert not_a_number.exit_code == 2
    assert "Error: Invalid value for 'ID': 'abc' is not a valid integer." in not_a_number.stderr


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("command", [("status",), ("queue", "list"), ("quarantine", "list"), ("outbox", "list"),
                                     ("transactions", "show", "1446/00321")])
def test_a_command_on_a_database_file_that_does_not_exist_says_so_and_creates_nothing(
        invoke, tmp_path: Path, command: tuple[str, ...]):
    missing = tmp_path / "typo.db"
    result = CliRunner().invoke(cli, list(command), env={"MAILBOT_DB": f"sqlite:///{missing}"})
    assert result.exit_code == 1
    assert f"database file {missing} does not exist" in result.output
    assert "mailbot db upgrade" in result.output
    assert not missing.exists()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_db_upgrade_and_the_first_import_create_the_database(invoke, tmp_path: Path):
    created = tmp_path / "new.db"
    assert invoke("db", "upgrade", database=f"sqlite:///{created}").exit_code == 0
    assert created.exists()
    fresh = invoke("status", database=f"sqlite:///{created}")
    assert fresh.exit_code == 1 and "database: ok" in fresh.stdout  # no daemon yet, which it says
    assert "no daemon: no `mailbot run` is serving this database" in fresh.stderr
    export = tmp_path / "export.csv"
    export.write_text("number,department,status,applicant_email,applicant_name,updated_at\n"
                      "1446/00321,prisons,received,a@x.example,أحمد,2025-01-20T10:00:00+03:00\n", encoding="utf-8")
    imported = invoke("transactions", "import", str(export), database=f"sqlite:///{tmp_path / 'first.db'}")
    assert imported.exit_code == 0, imported.output


def test_a_command_never_migrates_a_database_it_finds_older(invoke, db_url: str):
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    command.downgrade(db.alembic_config(db_url), "0003")
    result = invoke("queue", "list")
    assert result.exit_code == 1
    assert "the database schema is at revision 0003 and this mailbot needs" in result.output
    status = invoke("status", "--json")
    assert status.exit_code == 1 and json.loads(status.stdout)["database"] == "not ready"
    with db.get_engine(db_url).connect() as connection:
        assert MigrationContext.configure(connection).get_current_revision() == "0003"  # left to the daemon


def test_status_names_the_daemon_serving_the_database_and_fails_without_one(invoke, engine: Engine):
    silent = invoke("status", "--json")
    assert silent.exit_code == 1
    assert json.loads(silent.stdout)["daemons"] == []
    health.beat(engine, db.utcnow() - timedelta(hours=2))
    serving = invoke("status")
    assert serving.exit_code == 0, serving.output
    assert f"daemon {health.daemon_id()}: mailbot " in serving.stdout
    assert "running since" in serving.stdout
    # The daemon was killed: its heartbeat goes stale, and status says which one was last seen.
    with engine.begin() as connection:
        connection.execute(update(Daemon.__table__).values(heartbeat_at=db.utcnow() - timedelta(minutes=5)))
    dead = invoke("status")
    assert dead.exit_code == 1
    assert f"no daemon: no `mailbot run` is serving this database (the last heartbeat, from {health.daemon_id()}" \
        in dead.stderr
    health.forget(engine)  # a clean stop removes the heartbeat
    assert "(the last heartbeat" not in invoke("status").stderr


def test_status_shows_the_relays_last_success_and_failure(invoke, engine: Engine, serving: None):
    health.record_outcome(engine, health.RELAY)
    health.record_outcome(engine, health.RELAY, "ConnectionRefusedError: [Errno 111] Connection refused")
    report = json.loads(invoke("status", "--json").stdout)
    assert report["relay"]["last_ok_at"] is not None
    assert report["relay"]["last_error"] == "ConnectionRefusedError: [Errno 111] Connection refused"
    assert "relay" not in report["intake"]
    text = invoke("status").stdout
    assert "relay: last ok " in text and ", last error " in text
    with engine.begin() as connection:  # failing for longer than the grace period: page the operator
        connection.execute(update(IntakeState.__table__).values(last_ok_at=db.utcnow() - timedelta(minutes=11)))
    failing = invoke("status")
    assert failing.exit_code == 1
    assert "relay failing: ConnectionRefusedError" in failing.stderr


def broken_copy(rules_dir: Path, into: Path) -> Path:
    """The rules folder as an admin leaves it mid-edit: one file does not parse."""
    into.mkdir()
    for path in rules_dir.glob("*.yaml"):
        (into / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    (into / "routing.yaml").write_text("rules:\n  - id: half\n    when: [\n", encoding="utf-8")
    return into


def test_commands_keep_the_rules_in_force_while_the_files_are_refused(db_url: str, engine: Engine, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch):
    from mailbot.settings import SHIPPED_RULES

    monkeypatch.chdir(tmp_path)
    broken = broken_copy(Path(SHIPPED_RULES), tmp_path / "rules")
    env = {"MAILBOT_DB": db_url, "MAILBOT_RULES": str(broken)}
    refused = CliRunner().invoke(cli, ["queue", "list"], env=env)
    assert refused.exit_code == 1 and "routing.yaml" in refused.stderr  # no daemon kept any rules: nothing to fall back on
    rules_in_force.save(engine, Path(SHIPPED_RULES))  # what a daemon does when it loads good rules
    rules_in_force.record_refused(engine, ["routing.yaml:4:1: did not parse"])
    listed = CliRunner().invoke(cli, ["queue", "list"], env=env)
    assert listed.exit_code == 0, listed.output
    assert "routing.yaml" in listed.stderr
    assert "warning: using the rules in force, as the daemon loaded them at " in listed.stderr
    shown = CliRunner().invoke(cli, ["transactions", "show", "1446/99999"], env=env)
    assert "no transaction 1446/99999 on file" in shown.stderr  # it got past the rules
    health.beat(engine, db.utcnow())
    status = CliRunner().invoke(cli, ["status"], env=env)
    assert "; last reload refused " in status.stdout and "routing.yaml:4:1: did not parse" in status.stdout
