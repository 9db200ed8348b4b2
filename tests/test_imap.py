"""IMAP intake against a real private Dovecot (tests/dovecot.py): archive once, then move."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import ssl
import subprocess
import threading
import time
from dataclasses import replace
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Callable, Iterator

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import CapabilityError, LoginError
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from conftest import MAILBOT
from dovecot import Dovecot
from mailbot import db, store
from mailbot.intake import imap
from mailbot.models import ImapSeen, IntakeState, Message, MessageRaw
from mailbot.settings import Settings

NO_IDLE = {"idle": False}
NO_MOVE = {"move": False}
BARE = {"idle": False, "move": False, "uidplus": False}


def make_mail(number: int) -> bytes:
    """A unique citizen mail, Arabic or English, as the bytes a delivery would append."""
    mail = EmailMessage(policy=policy.SMTP)
    mail["From"] = f"citizen{number}@example.com"
    mail["To"] = "inquiries@emirate.example"
    mail["Message-ID"] = f"<intake-{number}@example.com>"
    if number % 2:
        mail["Subject"] = f"استفسار عن المعاملة رقم 1446/{number:05d}"
        mail.set_content(f"السلام عليكم،\nأرغب في معرفة حالة معاملتي رقم 1446/{number:05d}.\nشكراً")
    else:
        mail["Subject"] = f"Transaction No. 1446/{number:05d}"
        mail.set_content(f"Dear office,\nwhat is the status of transaction 1446/{number:05d}?\n")
    return mail.as_bytes()


def make_mails(count: int, start: int = 0) -> list[bytes]:
    return [make_mail(number) for number in range(start, start + count)]


def settings_for(server: Dovecot, engine: Engine, **overrides: object) -> Settings:
    base = Settings(
        db_url=engine.url.render_as_string(hide_password=False),
        imap_host=server.host,
        imap_port=server.port,
        imap_user=server.user,
        imap_password=server.password,
        imap_tls="none",
        imap_poll_seconds=0.2,
    )
    return replace(base, **overrides)


def archived_digests(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.execute(select(Message.__table__.c.sha256)).scalars())


def archived_count(engine: Engine) -> int:
    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(Message.__table__)).scalar_one()


def digests(mails: list[bytes]) -> list[str]:
    return sorted(hashlib.sha256(raw).hexdigest() for raw in mails)


def health(engine: Engine) -> dict[str, object] | None:
    with engine.connect() as connection:
        row = connection.execute(
            select(IntakeState.__table__).where(IntakeState.__table__.c.name == "imap")
        ).mappings().first()
    return dict(row) if row else None


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until ``condition()`` held; fails the test naming ``what`` after ``timeout``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture
def intake_thread() -> Iterator[Callable[[Settings, Engine], threading.Event]]:
    """Starts run_imap_intake in a thread; teardown stops it and checks it ends promptly."""
    running: list[tuple[threading.Thread, threading.Event]] = []

    def start(settings: Settings, engine: Engine) -> threading.Event:
        stop = threading.Event()
        thread = threading.Thread(target=imap.run_imap_intake, args=(settings, engine, stop), daemon=True)
        thread.start()
        running.append((thread, stop))
        return stop

    yield start
    for thread, stop in running:
        stop.set()
        thread.join(timeout=10)
        assert not thread.is_alive(), "run_imap_intake did not return after stop was set"


class RecordingClient(IMAPClient):
    """The real client, remembering which UIDs it fetched bodies of."""

    fetched_bodies: list[int]

    def fetch(self, messages, data, modifiers=None):  # noqa: ANN001, ANN201 - IMAPClient's signature
        if any(b"BODY" in (item.encode() if isinstance(item, str) else item) for item in data):
            self.fetched_bodies.extend(messages)
        return super().fetch(messages, data, modifiers)


def recording_client(server: Dovecot) -> RecordingClient:
    client = RecordingClient(server.host, port=server.port, ssl=False, timeout=30)
    client.fetched_bodies = []
    client.login(server.user, server.password)
    imap.ensure_folder(client, "Processed")
    return client


def test_500_mails_archived_once_and_moved(engine: Engine, dovecot: Dovecot) -> None:
    mails = make_mails(500)
    dovecot.append(mails)
    settings = settings_for(dovecot, engine, imap_batch=50)
    client = imap.connect(settings)
    try:
        imap.ensure_folder(client, settings.imap_processed_folder)
        assert imap.intake_pass(client, engine, settings) == 500
        assert imap.intake_pass(client, engine, settings) == 0
    finally:
        client.logout()
    stored = archived_digests(engine)
    assert sorted(stored) == digests(mails)
    with engine.connect() as connection:
        seen = connection.execute(
            select(func.count(), func.count(func.distinct(ImapSeen.__table__.c.uid))).where(
                ImapSeen.__table__.c.moved.is_(True), ImapSeen.__table__.c.mailbox == "INBOX"
            )
        ).one()
        origins = set(connection.execute(select(Message.__table__.c.origin)).scalars())
    assert tuple(seen) == (500, 500)
    assert origins == {"imap"}
    assert dovecot.count("INBOX") == 0
    assert dovecot.count("Processed") == 500


def test_fetched_bytes_are_the_appended_bytes_and_unread(sqlite_url: str, dovecot: Dovecot) -> None:
    engine = db.get_engine(sqlite_url)
    raw = make_mail(7)
    dovecot.append([raw])
    client = recording_client(dovecot)
    try:
        assert imap.intake_pass(client, engine, settings_for(dovecot, engine)) == 1
    finally:
        client.logout()
    with engine.connect() as connection:
        row = connection.execute(
            select(Message.__table__, MessageRaw.__table__.c.raw).join(MessageRaw.__table__)
        ).mappings().one()
    assert bytes(row["raw"]) == raw
    assert row["message_id"] == "<intake-7@example.com>"
    with dovecot.client("Processed") as check:
        flags = check.get_flags(check.search(["ALL"]))
    assert [b"\\Seen" not in value for value in flags.values()] == [True]


def test_large_mails_fetched_in_pieces(sqlite_url: str, dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = db.get_engine(sqlite_url)
    piece = 64 * 1024
    monkeypatch.setattr(imap, "MAX_FETCH_BYTES", piece)
    monkeypatch.setattr(imap, "PIECE_BYTES", piece)
    head = "From: citizen@example.com\r\nSubject: مستندات\r\nMessage-ID: <big-{}@example.com>\r\n\r\n"
    exact = head.format("exact").encode()
    exact += b"x" * (2 * piece - len(exact) - 2) + b"\r\n"  # ends exactly on a piece boundary
    mails = [make_mail(1), exact, make_mail(2), head.format("odd").encode() + b"y" * (3 * piece + 17), make_mail(3)]
    assert len(exact) == 2 * piece
    dovecot.append(mails)
    client = recording_client(dovecot)
    try:
        assert imap.intake_pass(client, engine, settings_for(dovecot, engine)) == 5
    finally:
        client.logout()
    # UIDs 1..5 in append order: the big ones in pieces (plus one empty piece on the boundary),
    # read twice (hashed, then written into the archive) so no whole copy is ever held.
    assert [client.fetched_bodies.count(uid) for uid in range(1, 6)] == [1, 6, 1, 8, 1]
    assert sorted(archived_digests(engine)) == digests(mails)
    with engine.connect() as connection:
        rows = connection.execute(
            select(MessageRaw.__table__.c.raw, Message.__table__.c.message_id).join(MessageRaw.__table__)
        ).all()
    assert sorted(bytes(row.raw) for row in rows) == sorted(mails)
    assert {"<big-exact@example.com>", "<big-odd@example.com>"} <= {row.message_id for row in rows}
    assert dovecot.count("INBOX") == 0


def test_idle_mail_archived_within_two_seconds(sqlite_url: str, dovecot: Dovecot, intake_thread) -> None:
    engine = db.get_engine(sqlite_url)
    # A poll interval far beyond 2 s: only IDLE can be this quick.
    settings = settings_for(dovecot, engine, imap_poll_seconds=600)
    intake_thread(settings, engine)
    wait_for(lambda: (health(engine) or {}).get("last_ok_at") is not None, 10, "the first pass")
    time.sleep(0.3)  # let the loop enter IDLE
    for number in range(3):
        raw = make_mail(100 + number)
        dovecot.append([raw])
        digest = hashlib.sha256(raw).hexdigest()
        took = wait_for(lambda: digest in archived_digests(engine), 5, f"mail {number} to be archived")
        assert took < 2.0, f"IDLE intake took {took:.2f}s"
    wait_for(lambda: dovecot.count("INBOX") == 0, 5, "the inbox to be emptied")
    assert dovecot.count("Processed") == 3


class ArrivingDuringMoveClient(IMAPClient):
    """The real client; one more mail is delivered while its first MOVE runs (its EXISTS lands there)."""

    server: Dovecot
    late_mail: bytes | None

    def move(self, messages, folder):  # noqa: ANN001, ANN201 - IMAPClient's signature
        if self.late_mail is not None:
            self.server.append([self.late_mail])
            self.late_mail = None
        return super().move(messages, folder)


def test_mail_arriving_during_a_pass_is_not_left_for_the_next_idle(sqlite_url: str, dovecot: Dovecot) -> None:
    engine = db.get_engine(sqlite_url)
    first, late = make_mail(1), make_mail(2)
    dovecot.append([first])
    client = ArrivingDuringMoveClient(dovecot.host, port=dovecot.port, ssl=False, timeout=30)
    client.server, client.late_mail = dovecot, late
    client.login(dovecot.user, dovecot.password)
    stop = threading.Event()
    settings = settings_for(dovecot, engine, imap_idle_seconds=600, imap_poll_seconds=600)
    thread = threading.Thread(target=imap.serve, args=(client, engine, settings, stop, imap.Backoff()))
    thread.start()
    try:
        wait_for(lambda: len(archived_digests(engine)) == 2, 2, "the mail delivered during the pass")
    finally:
        stop.set()
        thread.join(timeout=10)
        client.logout()
    assert not thread.is_alive()
    assert sorted(archived_digests(engine)) == digests([first, late])


class ArrivingBeforeIdleClient(IMAPClient):
    """The real client; one mail is delivered just before its first IDLE, which the server does not announce."""

    server: Dovecot
    late_mail: bytes | None

    def idle(self):  # noqa: ANN201 - IMAPClient's signature
        if self.late_mail is not None:
            self.server.append([self.late_mail])
            self.late_mail = None
        return super().idle()


def test_mail_arriving_just_before_idle_is_found_within_the_poll_interval(sqlite_url: str, dovecot: Dovecot) -> None:
    engine = db.get_engine(sqlite_url)
    late = make_mail(3)
    client = ArrivingBeforeIdleClient(dovecot.host, port=dovecot.port, ssl=False, timeout=30)
    client.server, client.late_mail = dovecot, late
    client.login(dovecot.user, dovecot.password)
    stop = threading.Event()
    settings = settings_for(dovecot, engine, imap_idle_seconds=600, imap_poll_seconds=0.5)
    thread = threading.Thread(target=imap.serve, args=(client, engine, settings, stop, imap.Backoff()))
    thread.start()
    try:
        wait_for(lambda: len(archived_digests(engine)) == 1, 3, "the mail delivered before IDLE")
    finally:
        stop.set()
        thread.join(timeout=10)
        client.logout()
    assert not thread.is_alive()
    assert archived_digests(engine) == digests([late])


def test_idle_is_renewed_after_imap_idle_seconds(sqlite_url: str, dovecot: Dovecot) -> None:
    engine = db.get_engine(sqlite_url)
    settings = settings_for(dovecot, engine, imap_idle_seconds=0.5, imap_poll_seconds=600)
    client = imap.connect(settings)
    try:
        client.select_folder("INBOX")
        started = time.monotonic()
        imap.wait_for_mail(client, settings, threading.Event())
        took = time.monotonic() - started
        assert client.noop()[0].startswith(b"NOOP completed")  # IDLE ended cleanly: the connection takes commands
    finally:
        client.logout()
    assert 0.5 <= took < 2.5


@pytest.mark.parametrize("dovecot", [NO_IDLE], indirect=True)
def test_polling_when_idle_is_not_offered(sqlite_url: str, dovecot: Dovecot, intake_thread) -> None:
    engine = db.get_engine(sqlite_url)
    with dovecot.client() as probe:
        assert not probe.has_capability("IDLE")
        assert probe.has_capability("MOVE")
    intake_thread(settings_for(dovecot, engine, imap_poll_seconds=0.2), engine)
    first, second = make_mails(20), make_mails(20, start=20)
    dovecot.append(first)
    wait_for(lambda: archived_count(engine) == 20, 10, "the first 20 mails")
    dovecot.append(second)
    wait_for(lambda: archived_count(engine) == 40, 10, "the next 20 mails")
    wait_for(lambda: dovecot.count("INBOX") == 0, 5, "the inbox to be emptied")
    assert sorted(archived_digests(engine)) == digests(first + second)
    assert dovecot.count("Processed") == 40


@pytest.mark.parametrize("dovecot", [NO_MOVE, BARE], indirect=True, ids=["copy-uidplus", "copy-expunge"])
def test_copy_store_expunge_when_move_is_not_offered(engine: Engine, dovecot: Dovecot) -> None:
    mails = make_mails(120)
    dovecot.append(mails)
    settings = settings_for(dovecot, engine, imap_batch=25, imap_processed_folder="Archive/Done")
    client = imap.connect(settings)
    try:
        assert not client.has_capability("MOVE")
        assert client.has_capability("UIDPLUS") == (dovecot.uidplus)
        imap.ensure_folder(client, settings.imap_processed_folder)
        assert imap.intake_pass(client, engine, settings) == 120
    finally:
        client.logout()
    assert sorted(archived_digests(engine)) == digests(mails)
    assert dovecot.count("INBOX") == 0
    assert dovecot.count("Archive/Done") == 120


def test_processed_folder_is_created_once(sqlite_url: str, dovecot: Dovecot) -> None:
    with dovecot.client() as client:
        assert not client.folder_exists("Processed")
        imap.ensure_folder(client, "Processed")
        imap.ensure_folder(client, "Processed")
        assert [name for _, _, name in client.list_folders()].count("Processed") == 1


def test_crash_between_commit_and_move_moves_without_refetching(sqlite_url: str, dovecot: Dovecot) -> None:
    engine = db.get_engine(sqlite_url)
    mails = make_mails(30)
    dovecot.append(mails)
    settings = settings_for(dovecot, engine, imap_batch=8)
    # The "crash": the first 10 UIDs were committed (with ImapSeen) but never moved.
    with dovecot.client("INBOX") as before:
        uidvalidity = int(before.folder_status("INBOX", [b"UIDVALIDITY"])[b"UIDVALIDITY"])
        first_uids = sorted(before.search(["ALL"]))[:10]
        for uid, item in before.fetch(first_uids, ["BODY.PEEK[]"]).items():
            store.store_raw(engine, item[b"BODY[]"], origin="imap", mailbox="INBOX", uidvalidity=uidvalidity, uid=uid)
    assert dovecot.count("INBOX") == 30

    client = recording_client(dovecot)
    try:
        assert imap.intake_pass(client, engine, settings) == 20
        assert not set(client.fetched_bodies) & set(first_uids)
        assert len(client.fetched_bodies) == 20
    finally:
        client.logout()
    stored = archived_digests(engine)
    assert len(stored) == len(set(stored)) == 30
    assert sorted(stored) == digests(mails)
    assert dovecot.count("INBOX") == 0
    assert dovecot.count("Processed") == 30
    with engine.connect() as connection:
        unmoved = connection.execute(
            select(func.count()).select_from(ImapSeen.__table__).where(ImapSeen.__table__.c.moved.is_(False))
        ).scalar_one()
    assert unmoved == 0


def test_new_uidvalidity_never_archives_twice(sqlite_url: str, dovecot: Dovecot) -> None:
    """A recreated mailbox gets a new UIDVALIDITY: its UIDs are fetched again, the bytes stay one row."""
    engine = db.get_engine(sqlite_url)
    mails = make_mails(5)
    settings = settings_for(dovecot, engine, imap_folder="Intake")
    validities = []
    for _ in range(2):
        with dovecot.client() as setup:
            if setup.folder_exists("Intake"):
                setup.delete_folder("Intake")
            setup.create_folder("Intake")
            validities.append(int(setup.folder_status("Intake", [b"UIDVALIDITY"])[b"UIDVALIDITY"]))
        dovecot.append(mails, folder="Intake")
        with imap.connect(settings) as client:
            imap.ensure_folder(client, "Processed")
            imap.intake_pass(client, engine, settings)
        assert dovecot.count("Intake") == 0
    assert validities[0] != validities[1]
    assert sorted(archived_digests(engine)) == digests(mails)
    with engine.connect() as connection:
        seen = connection.execute(
            select(ImapSeen.__table__.c.uidvalidity, func.count()).group_by(ImapSeen.__table__.c.uidvalidity)
        ).all()
    assert sorted(seen) == [(validities[0], 5), (validities[1], 5)]
    assert dovecot.count("Processed") == 10


def test_dovecot_restart_mid_run_reconnects_and_finishes(sqlite_url: str, dovecot: Dovecot, intake_thread) -> None:
    engine = db.get_engine(sqlite_url)
    mails = make_mails(600)
    dovecot.append(mails)
    intake_thread(settings_for(dovecot, engine, imap_batch=5), engine)
    wait_for(lambda: archived_count(engine) >= 50, 20, "the intake to start")
    dovecot.stop()
    at_restart = archived_count(engine)
    dovecot.start()
    assert at_restart < 600, "the restart came after the run had finished"
    wait_for(lambda: archived_count(engine) == 600, 30, "all 600 mails after the restart")
    wait_for(lambda: dovecot.count("INBOX") == 0, 10, "the inbox to be emptied")
    stored = archived_digests(engine)
    assert sorted(stored) == digests(mails)
    state = health(engine)
    assert state is not None and state["last_error_at"] is not None and state["last_ok_at"] > state["last_error_at"]
    # An interrupted MOVE may leave a copy behind in the target: never fewer, rarely more.
    assert dovecot.count("Processed") >= 600


def test_restart_while_idling_reconnects(sqlite_url: str, dovecot: Dovecot, intake_thread) -> None:
    engine = db.get_engine(sqlite_url)
    intake_thread(settings_for(dovecot, engine, imap_poll_seconds=600), engine)
    wait_for(lambda: (health(engine) or {}).get("last_ok_at") is not None, 10, "the first pass")
    time.sleep(0.3)
    dovecot.restart()
    wait_for(lambda: (health(engine) or {}).get("last_error_at") is not None, 10, "the dropped IDLE to be noticed")
    raw = make_mail(9)
    dovecot.append([raw])
    wait_for(lambda: archived_digests(engine) == [hashlib.sha256(raw).hexdigest()], 15, "mail after reconnect")


def test_bad_password_is_recorded_and_retried(sqlite_url: str, dovecot: Dovecot, intake_thread, caplog) -> None:
    engine = db.get_engine(sqlite_url)
    settings = settings_for(dovecot, engine, imap_password="not-the-password-x7")
    with pytest.raises(LoginError, match="AUTHENTICATIONFAILED"):
        imap.connect(settings)
    intake_thread(settings, engine)
    wait_for(lambda: (health(engine) or {}).get("last_error") is not None, 10, "the login failure to be recorded")
    state = health(engine)
    assert "LoginError" in state["last_error"] and "AUTHENTICATIONFAILED" in state["last_error"]
    assert state["last_ok_at"] is None
    assert "intake=imap reconnect attempt=1" in caplog.text
    assert "not-the-password-x7" not in caplog.text + state["last_error"]


def test_starttls_refused_by_a_server_without_tls(sqlite_url: str, dovecot: Dovecot) -> None:
    engine = db.get_engine(sqlite_url)
    with pytest.raises(CapabilityError, match="Server does not support STARTTLS capability"):
        imap.connect(settings_for(dovecot, engine, imap_tls="starttls"))


@pytest.mark.parametrize("dovecot", [{"tls": True}], indirect=True)
@pytest.mark.parametrize("mode", ["ssl", "starttls"])
def test_tls_modes_against_a_tls_server(
    sqlite_url: str, dovecot: Dovecot, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = db.get_engine(sqlite_url)
    port = dovecot.tls_port if mode == "ssl" else dovecot.port
    settings = settings_for(dovecot, engine, imap_tls=mode, imap_port=port)
    # Verification stays on: the system store does not know the self-signed server...
    with pytest.raises(ssl.SSLCertVerificationError, match="CERTIFICATE_VERIFY_FAILED.*self-signed certificate"):
        imap.connect(settings)
    # ...and trusts it once the operator's CA file (here, the certificate itself) is named.
    monkeypatch.setenv("SSL_CERT_FILE", str(dovecot.certificate))
    mails = make_mails(3)
    dovecot.append(mails)
    with imap.connect(settings) as client:
        assert client.socket().version() is not None  # the session is encrypted
        imap.ensure_folder(client, "Processed")
        assert imap.intake_pass(client, engine, settings) == 3
    assert sorted(archived_digests(engine)) == digests(mails)


def test_backoff_grows_capped_with_jitter() -> None:
    backoff = imap.Backoff(base=1.0, cap=8.0)
    delays = [backoff.next_delay() for _ in range(8)]
    ceilings = [1, 2, 4, 8, 8, 8, 8, 8]
    assert all(ceiling / 2 <= delay <= ceiling for delay, ceiling in zip(delays, ceilings))
    assert len(set(delays)) == len(delays)  # jittered, not in step
    backoff.reset()
    assert backoff.next_delay() <= 1.0


def start_mailbot_run(env: dict[str, str], cwd: Path, log_path: Path) -> subprocess.Popen:
    with log_path.open("ab") as log_file:
        return subprocess.Popen([*MAILBOT, "run"], env=env, cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT)


def test_mailbot_run_killed_at_random_moments_archives_every_mail_once(tmp_path: Path, dovecot: Dovecot) -> None:
    mails = make_mails(1000)
    dovecot.append(mails)
    database = tmp_path / "mailbot.db"
    env = {
        **os.environ,
        **dovecot.env(),
        "MAILBOT_DB": f"sqlite:///{database}",
        "MAILBOT_SMTP_LISTEN": "",
        "MAILBOT_IMAP_BATCH": "20",
        "MAILBOT_IMAP_POLL_SECONDS": "0.5",
        "MAILBOT_SENT_MAILDIR": str(tmp_path / "sent"),
        "MAILBOT_LOG_LEVEL": "INFO",
    }
    db.upgrade(env["MAILBOT_DB"])
    engine = db.get_engine(env["MAILBOT_DB"])
    log_path = tmp_path / "mailbot-run.log"
    rng = random.Random(1446)
    # Each kill waits for a random amount of progress (or a random time), so kills
    # land before, during and after the intake of a batch.
    kills_mid_intake = 0
    for target in sorted(rng.sample(range(1, 1000), 5)):
        process = start_mailbot_run(env, tmp_path, log_path)
        try:
            deadline = time.monotonic() + 20
            while archived_count(engine) < target and time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 0.2))
            assert process.poll() is None, f"mailbot run exited early:\n{log_path.read_text()[-3000:]}"
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
        count = archived_count(engine)
        kills_mid_intake += 0 < count < 1000
    assert kills_mid_intake >= 3, "the kills did not land during the intake"

    process = start_mailbot_run(env, tmp_path, log_path)
    deadline = time.monotonic() + 60
    while (archived_count(engine) < 1000 or dovecot.count("INBOX")) and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    exit_code = process.wait(timeout=30)
    output = log_path.read_text()
    assert archived_count(engine) == 1000, f"not all mails archived after the last restart:\n{output[-3000:]}"
    assert exit_code == 0, output[-3000:]
    with engine.connect() as connection:
        rows, distinct = connection.execute(
            select(func.count(), func.count(func.distinct(Message.__table__.c.sha256)))
        ).one()
    assert (rows, distinct) == (1000, 1000)
    assert sorted(archived_digests(engine)) == digests(mails)
    assert dovecot.count("INBOX") == 0
    assert dovecot.count("Processed") == 1000
    assert "Traceback" not in log_path.read_text()
