"""The worker: stored mail in, processed or quarantined (with a reason) out, never dropped."""

from __future__ import annotations

import hashlib
import os
import random
import smtplib
import threading
from collections import Counter
from email.message import EmailMessage
from typing import Iterator

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.engine import Engine

from mailbot import db, inquiries, pipeline, store
from mailbot.intake.smtp import IngressServer
from mailbot.models import Message, MessageRaw
from mailbot.rules import Rules

OFFICE = "inquiries@emirate.example"

ARABIC = (
    "From: =?utf-8?b?2YXZiNin2LfZhg==?= <citizen@example.com>\r\n"
    f"To: {OFFICE}\r\n"
    "Subject: =?utf-8?b?2KfYs9iq2YHYs9in2LEg2LnZhiDZhdi52KfZhdmE2Kk=?=\r\n"
    "Date: Mon, 23 Nov 2026 10:00:00 +0300\r\n"
    "Message-ID: <ok@example.com>\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "\r\n"
).encode() + "أرجو إفادتي عن المعاملة رقم 1445/00123\r\n".encode()
TRUNCATED_MIME = (
    b"From: citizen@example.com\r\nMessage-ID: <truncated@example.com>\r\nSubject: cut\r\n"
    b"Content-Type: multipart/mixed; boundary=XYZ\r\n\r\n--XYZ\r\nContent-Type: text/plain\r\n\r\nhello\r\n--XY"
)
NUL_BYTES = b"From: citizen@example.com\r\nSubject: nul\x00here\r\nMessage-ID: <nul@example.com>\r\n\r\nbody\x00\x00\r\n"
RAW_8BIT_HEADERS = (
    "From: مواطن <citizen@example.com>\r\nSubject: استفسار عن معاملة\r\nMessage-ID: <8bit@example.com>\r\n\r\nنص\r\n"
).encode("cp1256")
RANDOM_BYTES = bytes(random.Random(7).randrange(256) for _ in range(4096))
EMPTY = b"\r\n\r\n"


def with_attachment(size: int) -> bytes:
    mail = EmailMessage()
    mail["From"] = "citizen@example.com"
    mail["To"] = OFFICE
    mail["Subject"] = "صورة الهوية"
    mail["Message-ID"] = "<big@example.com>"
    mail.set_content("مرفق صورة الهوية\n")
    mail.add_attachment(os.urandom(size), maintype="application", subtype="pdf", filename="هوية.pdf")
    return mail.as_bytes().replace(b"\n", b"\r\n")


def as_received(raw: bytes) -> bytes:
    # SMTP DATA ends in CRLF; smtplib adds one to mail that lacks it.
    return raw if raw.endswith(b"\r\n") else raw + b"\r\n"


@pytest.fixture
def smtp(engine: Engine, rules: Rules) -> Iterator[IngressServer]:
    ingress = IngressServer(engine, rules, ("127.0.0.1", 0), lmtp=False, max_message_bytes=40 * 1024 * 1024)
    ingress.start()
    yield ingress
    ingress.stop()


def send(ingress: IngressServer, raw: bytes) -> int:
    with smtplib.SMTP(*ingress.address, timeout=60) as client:
        client.ehlo("client.example")
        client.mail("citizen@example.com")
        client.rcpt(OFFICE)
        code, reply = client.data(raw)
    assert code == 250, reply
    return int(reply.decode().rsplit("=", 1)[1])


def row(engine: Engine, message: int):  # noqa: ANN201 - SQLAlchemy Row
    with engine.connect() as connection:
        return connection.execute(
            select(Message.__table__, MessageRaw.__table__.c.raw).join(MessageRaw.__table__)
            .where(Message.__table__.c.id == message)
        ).one()


def test_malformed_input_is_archived_and_quarantined_with_a_reason(engine: Engine, rules: Rules, smtp: IngressServer):
    sent = {
        name: send(smtp, raw)
        for name, raw in [
            ("random", RANDOM_BYTES),
            ("empty", EMPTY),
            ("truncated", TRUNCATED_MIME),
            ("nul", NUL_BYTES),
            ("8bit", RAW_8BIT_HEADERS),
            ("arabic", ARABIC),
        ]
    }
    for name, raw in [("random", RANDOM_BYTES), ("nul", NUL_BYTES), ("truncated", TRUNCATED_MIME)]:
        assert bytes(row(engine, sent[name]).raw) == as_received(raw)

    assert pipeline.process_pending(engine, rules) == 6

    random_row = row(engine, sent["random"])
    assert random_row.state == "quarantined"
    assert random_row.reason.splitlines()[0] == "ParseError: no headers"
    assert "Traceback (most recent call last):" in random_row.reason
    assert row(engine, sent["empty"]).reason.splitlines()[0] == "ParseError: empty message"
    truncated = row(engine, sent["truncated"])
    assert (truncated.state, truncated.subject, truncated.sender) == ("processed", "cut", "citizen@example.com")
    nul = row(engine, sent["nul"])
    assert (nul.state, nul.subject) == ("processed", "nulhere")
    eight_bit = row(engine, sent["8bit"])
    assert (eight_bit.state, eight_bit.subject) == ("processed", "استفسار عن معاملة")
    arabic = row(engine, sent["arabic"])
    assert (arabic.state, arabic.subject, arabic.sender) == ("processed", "استفسار عن معاملة", "citizen@example.com")
    assert arabic.sent_date.isoformat() == "2026-11-23T07:00:00+00:00"
    assert store.count_by_state(engine) == {"received": 0, "processed": 4, "quarantined": 2}


def test_a_25_mb_attachment_is_archived_and_processed(sqlite_url: str, rules: Rules):
    engine = db.get_engine(sqlite_url)
    raw = with_attachment(25 * 1024 * 1024)
    ingress = IngressServer(engine, rules, ("127.0.0.1", 0), lmtp=False, max_message_bytes=40 * 1024 * 1024)
    ingress.start()
    try:
        message = send(ingress, raw)
    finally:
        ingress.stop()
    assert row(engine, message).sha256 == hashlib.sha256(raw).hexdigest()
    assert pipeline.process_pending(engine, rules) == 1
    done = row(engine, message)
    assert (done.state, done.subject, done.size) == ("processed", "صورة الهوية", len(raw))


def test_an_exception_in_a_stage_quarantines_and_the_worker_goes_on(engine: Engine, rules: Rules, exploding_parse):
    boom = store.store_raw(engine, ARABIC.replace(b"<ok@example.com>", b"<boom@example.com>"), origin="smtp").id
    fine = store.store_raw(engine, ARABIC, origin="smtp").id

    assert pipeline.process_pending(engine, rules) == 2
    failed = row(engine, boom)
    assert failed.state == "quarantined"
    assert failed.reason.splitlines()[0] == "RuntimeError: stage exploded on purpose"
    assert "in exploding" in failed.reason
    assert failed.attempts == 1
    assert row(engine, fine).state == "processed"

    assert pipeline.retry_quarantined(engine, [boom]) == [boom]
    exploding_parse.repair()
    assert pipeline.process_pending(engine, rules) == 1
    assert row(engine, boom).state == "processed"
    assert row(engine, boom).reason is None


def test_pending_mail_is_taken_in_id_order_up_to_the_limit(engine: Engine, rules: Rules, monkeypatch):
    seen: list[int] = []
    real = store.mark_processed
    monkeypatch.setattr(store, "mark_processed", lambda session, message, **values: (
        seen.append(message), real(session, message, **values))[1])
    ids = [store.store_raw(engine, ARABIC.replace(b"ok@", f"n{n}@".encode()), origin="smtp").id for n in range(5)]
    assert pipeline.process_pending(engine, rules, limit=3) == 3
    assert seen == ids[:3]
    assert pipeline.process_pending(engine, rules) == 2
    assert seen == ids
    assert pipeline.process_pending(engine, rules) == 0


def test_a_mail_whose_quarantine_fails_is_not_retried_in_the_same_run(engine: Engine, rules: Rules, monkeypatch):
    store.store_raw(engine, RANDOM_BYTES, origin="smtp")

    def database_down(*args: object) -> None:
        raise RuntimeError("database down")

    monkeypatch.setattr(store, "quarantine", database_down)
    with pytest.raises(RuntimeError, match="database down"):
        pipeline.process_pending(engine, rules)
    assert store.count_by_state(engine)["received"] == 1


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_concurrent_workers_on_postgresql_take_each_mail_once(engine: Engine, rules: Rules, monkeypatch):
    ids = [store.store_raw(engine, ARABIC.replace(b"ok@", f"w{n}@".encode()), origin="smtp").id for n in range(200)]
    taken: Counter[int] = Counter()
    lock = threading.Lock()
    real = pipeline.run_stages

    def counting(session, rules: Rules, mail: pipeline.Pending, now, templates_dir) -> pipeline.Outcome:  # noqa: ANN001
        with lock:
            taken[mail.id] += 1
        return real(session, rules, mail, now, templates_dir)

    monkeypatch.setattr(pipeline, "run_stages", counting)
    counts: list[int] = []
    threads = [threading.Thread(target=lambda: counts.append(pipeline.process_pending(engine, rules))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(counts) == 200
    assert set(taken) == set(ids) and set(taken.values()) == {1}
    assert store.count_by_state(engine)["processed"] == 200


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_claim_held_by_another_worker_is_skipped_and_freed_when_it_dies(engine: Engine, rules: Rules):
    first = store.store_raw(engine, ARABIC, origin="smtp").id
    second = store.store_raw(engine, NUL_BYTES, origin="smtp").id
    other_worker = engine.connect()
    other_worker.execute(text("SELECT pg_advisory_xact_lock(:space, :id)"), {"space": 0x6D61696C, "id": first})
    assert pipeline.process_pending(engine, rules) == 1
    assert (row(engine, first).state, row(engine, second).state) == ("received", "processed")
    other_worker.close()  # a crashed worker: its transaction and claim end with the connection
    assert pipeline.process_pending(engine, rules) == 1
    assert row(engine, first).state == "processed"


def test_header_summary_decodes_arabic_and_survives_garbage():
    assert pipeline.summarise_headers(ARABIC) == [
        ("From", "مواطن <citizen@example.com>"),
        ("To", OFFICE),
        ("Subject", "استفسار عن معاملة"),
        ("Date", "Mon, 23 Nov 2026 10:00:00 +0300"),
        ("Message-ID", "<ok@example.com>"),
    ]
    assert pipeline.summarise_headers(RAW_8BIT_HEADERS)[1] == ("Subject", "استفسار عن معاملة")
    assert pipeline.summarise_headers(RANDOM_BYTES) == []


def citizen(sender: str, number: int, subject: str | None = None) -> bytes:
    """A mail from ``sender`` with its own Message-ID (a new inquiry unless ``subject`` says otherwise)."""
    raw = ARABIC.replace(b"citizen@example.com", sender.encode()).replace(b"<ok@", f"<m{number}@".encode())
    if subject is not None:
        raw = raw.replace(b"=?utf-8?b?2KfYs9iq2YHYs9in2LEg2LnZhiDZhdi52KfZhdmE2Kk=?=", subject.encode())
    return raw


def acks(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.execute(text("SELECT recipient FROM outbox WHERE key LIKE 'ack:%' ORDER BY id")).scalars())


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_new_inquiries_of_different_senders_are_committed_together(engine: Engine, rules: Rules) -> None:
    """SQLite's group commit: one transaction for the batch of new inquiries, each still complete."""
    for number in range(6):
        store.store_raw(engine, citizen(f"c{number}@example.com", number), origin="smtp")
    commits: list[int] = []
    event.listen(engine, "commit", lambda connection: commits.append(1))

    assert pipeline.process_pending(engine, rules) == 6
    assert len(commits) == 1
    assert store.count_by_state(engine)["processed"] == 6
    assert sorted(acks(engine)) == [f"c{number}@example.com" for number in range(6)]
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM outbox WHERE template = 'queue_forward'")).scalar() == 6


def test_one_sender_writing_many_times_at_once_still_meets_the_daily_limit(engine: Engine, rules: Rules) -> None:
    """A group never holds two mails of one sender: the limit counts the acknowledgement before."""
    def asking(sender: str, number: int) -> bytes:  # each about its own transaction: each a new question
        return citizen(sender, number).replace(b"1445/00123", f"1445/{200 + number:05d}".encode())

    for number in range(8):
        store.store_raw(engine, asking("flood@example.com" if number % 2 else f"c{number}@example.com", number),
                        origin="smtp")
    for number in range(8, 12):
        store.store_raw(engine, asking("flood@example.com", number), origin="smtp")

    assert pipeline.process_pending(engine, rules) == 12
    sent = acks(engine)
    assert sent.count("flood@example.com") == rules.policy.max_auto_replies_per_day == 5
    assert sorted(set(sent) - {"flood@example.com"}) == ["c0@example.com", "c2@example.com", "c4@example.com",
                                                         "c6@example.com"]
    assert store.count_by_state(engine)["processed"] == 12


def test_a_follow_up_between_new_inquiries_joins_its_inquiry_in_order(engine: Engine, rules: Rules) -> None:
    first = store.store_raw(engine, citizen("a@example.com", 1), origin="smtp").id
    assert pipeline.process_pending(engine, rules) == 1
    store.store_raw(engine, citizen("b@example.com", 2), origin="smtp")
    store.store_raw(engine, citizen("a@example.com", 3, subject=f"Re: [INQ-{first:06d}]"), origin="smtp")
    store.store_raw(engine, citizen("c@example.com", 4), origin="smtp")

    assert pipeline.process_pending(engine, rules) == 3
    with engine.connect() as connection:
        inquiries = connection.execute(text("SELECT sender FROM inquiry ORDER BY id")).scalars().all()
        events = connection.execute(text("SELECT inquiry, kind FROM inquiry_event ORDER BY id")).all()
    assert inquiries == ["a@example.com", "b@example.com", "c@example.com"]
    assert (first, "followup") in [tuple(event) for event in events]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_when_a_group_cannot_be_written_each_mail_is_processed_alone(engine: Engine, rules: Rules,
                                                                     monkeypatch) -> None:
    ids = [store.store_raw(engine, citizen(f"c{number}@example.com", number), origin="smtp").id
           for number in range(4)]
    real = inquiries.write_opening

    def failing_for_the_third(session, opening, now):  # noqa: ANN001
        if opening.message == ids[2]:
            raise RuntimeError("constraint broken on purpose")
        return real(session, opening, now)

    monkeypatch.setattr(inquiries, "write_opening", failing_for_the_third)
    assert pipeline.process_pending(engine, rules) == 4
    states = {mail: row(engine, mail).state for mail in ids}
    assert states == {ids[0]: "processed", ids[1]: "processed", ids[2]: "quarantined", ids[3]: "processed"}
    assert row(engine, ids[2]).reason.startswith("RuntimeError: constraint broken on purpose")
    assert sorted(acks(engine)) == ["c0@example.com", "c1@example.com", "c3@example.com"]
