import hashlib
import threading

import pytest
from sqlalchemy import select
from sqlmodel import Session

from mailbot import db, store
from mailbot.models import ImapSeen, Message, MessageRaw

MAIL = b"From: a@example.com\r\nMessage-ID: <m1@example.com>\r\nSubject: x\r\n\r\nhello\r\n"


def test_same_bytes_are_stored_once(engine):
    first = store.store_raw(engine, MAIL, origin="smtp", peer="127.0.0.1")
    second = store.store_raw(engine, MAIL, origin="imap")
    assert first.created and not second.created
    assert first.id == second.id
    with Session(engine) as session:
        rows = session.exec(select(Message)).scalars().all()
        raws = session.exec(select(MessageRaw)).scalars().all()
    assert len(rows) == 1
    assert [(raw.message, raw.raw) for raw in raws] == [(first.id, MAIL)]
    assert rows[0].message_id == "<m1@example.com>"
    assert rows[0].state == "received"


def test_concurrent_identical_deliveries_make_one_row(engine):
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(store.store_raw(engine, MAIL, origin="smtp")))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({r.id for r in results}) == 1
    assert sum(r.created for r in results) == 1


def test_imap_uid_recorded_with_the_mail(engine):
    stored = store.store_raw(engine, MAIL, origin="imap", mailbox="INBOX", uidvalidity=4_000_000_000, uid=7)
    again = store.store_raw(engine, MAIL, origin="imap", mailbox="INBOX", uidvalidity=4_000_000_000, uid=7)
    assert again.id == stored.id
    with Session(engine) as session:
        seen = session.exec(select(ImapSeen)).scalars().all()
    assert [(s.uidvalidity, s.uid, s.message) for s in seen] == [(4_000_000_000, 7, stored.id)]


def test_a_fetched_batch_is_stored_once_each_with_its_uid(engine):
    other = MAIL.replace(b"<m1@", b"<m2@")
    stored = store.store_fetched(engine, [(10, MAIL), (11, other), (12, MAIL)], mailbox="INBOX", uidvalidity=9)

    assert [s.created for s in stored] == [True, True, False]
    assert stored[2].id == stored[0].id != stored[1].id
    with Session(engine) as session:
        seen = session.exec(select(ImapSeen).order_by(ImapSeen.uid)).scalars().all()
        raws = {raw.message: raw.raw for raw in session.exec(select(MessageRaw)).scalars()}
    assert [(s.uid, s.message) for s in seen] == [(10, stored[0].id), (11, stored[1].id), (12, stored[0].id)]
    assert raws == {stored[0].id: MAIL, stored[1].id: other}


def test_a_fetched_batch_that_fails_midway_stores_none_of_it(engine, monkeypatch):
    """One transaction: nothing of the batch is archived, so intake moves none of it and fetches it again."""
    calls = []

    def failing_on_the_second(head: bytes) -> str:
        calls.append(head)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return "<id@example.com>"

    monkeypatch.setattr(store, "header_message_id", failing_on_the_second)
    with pytest.raises(RuntimeError):
        store.store_fetched(engine, [(1, MAIL), (2, MAIL + b"more\r\n")], mailbox="INBOX", uidvalidity=9)
    assert store.count_by_state(engine) == {"received": 0, "processed": 0, "quarantined": 0}
    with Session(engine) as session:
        assert session.exec(select(ImapSeen)).scalars().all() == []


def test_quarantine_and_release(engine):
    stored = store.store_raw(engine, b"\x00\xff garbage", origin="smtp")
    assert store.count_by_state(engine) == {"received": 1, "processed": 0, "quarantined": 0}
    store.quarantine(engine, stored.id, "ParseError: no headers")
    assert store.count_by_state(engine)["quarantined"] == 1
    assert store.release(engine, stored.id) is True
    assert store.release(engine, stored.id) is False
    assert store.count_by_state(engine)["received"] == 1


def test_state_changes_leave_the_bytes_alone(engine):
    """The bytes live in message_raw, so no UPDATE of the message row rewrites (or loses) them."""
    stored = store.store_raw(engine, MAIL, origin="smtp")
    store.quarantine(engine, stored.id, "ParseError: no headers")
    store.release(engine, stored.id)
    with db.session(engine) as session:
        store.mark_processed(session, stored.id, subject="x", kind="inquiry")
    assert "raw" not in Message.__table__.c
    with engine.connect() as connection:
        assert store.read_raw(connection, stored.id) == MAIL
        assert connection.execute(select(Message.__table__.c.state)).scalar_one() == "processed"


def test_message_id_of_headerless_bytes_is_none():
    assert store.header_message_id(b"\x00\x01\x02") is None
    assert store.header_message_id(b"Message-ID: <a@b>\n\nbody") == "<a@b>"


def test_mail_stored_from_pieces_is_byte_exact(engine):
    big = MAIL + bytes(range(256)) * 4096 + "مرفق\r\n".encode()
    pieces = [big[start : start + 100_000] for start in range(0, len(big), 100_000)]
    reads = []

    def read():
        reads.append(1)
        return iter(pieces)

    stored = store.store_pieces(engine, read, origin="imap", mailbox="INBOX", uidvalidity=1, uid=9)
    assert stored.created and len(reads) == 2
    with engine.connect() as connection:
        assert store.read_raw(connection, stored.id) == big
        row = connection.execute(select(Message.__table__).where(Message.__table__.c.id == stored.id)).one()
    assert (row.size, row.message_id, row.sha256) == (len(big), "<m1@example.com>", store_digest(big))
    again = store.store_pieces(engine, read, origin="imap")
    assert (again.id, again.created) == (stored.id, False)


def test_read_raw_across_piece_boundaries(engine):
    """PostgreSQL reads a mail in pieces; a mail of exactly N pieces, or one byte more, comes back whole."""
    for extra in (0, 1):
        raw = MAIL + bytes(range(256)) * (2 * store._READ_PIECE // 256)
        raw = raw[: 2 * store._READ_PIECE + extra]
        stored = store.store_raw(engine, raw, origin="cli")
        with engine.connect() as connection:
            assert store.read_raw(connection, stored.id) == raw


@pytest.mark.parametrize("piece", [None, 7], ids=["one piece", "many pieces"])
def test_pieces_that_change_between_reads_store_nothing(engine, piece: int | None):
    """One piece is bound as a parameter; many are written as they come (SQLite blob, PostgreSQL COPY)."""
    changed = MAIL.replace(b"hello", b"HELLO")
    reads = iter([[raw] if piece is None else [raw[i:i + piece] for i in range(0, len(raw), piece)]
                  for raw in (MAIL, changed)])
    with pytest.raises(ValueError, match="the mail's bytes differed between two reads; not stored"):
        store.store_pieces(engine, lambda: next(reads), origin="imap", mailbox="INBOX", uidvalidity=1, uid=3)
    assert store.count_by_state(engine) == {"received": 0, "processed": 0, "quarantined": 0}
    with engine.connect() as connection:
        assert connection.execute(select(MessageRaw.__table__)).all() == []
        assert connection.execute(select(ImapSeen.__table__)).all() == []


def store_digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()
