import threading

from sqlalchemy import select
from sqlmodel import Session

from mailbot import store
from mailbot.models import ImapSeen, Message

MAIL = b"From: a@example.com\r\nMessage-ID: <m1@example.com>\r\nSubject: x\r\n\r\nhello\r\n"


def test_same_bytes_are_stored_once(engine):
    first = store.store_raw(engine, MAIL, origin="smtp", peer="127.0.0.1")
    second = store.store_raw(engine, MAIL, origin="imap")
    assert first.created and not second.created
    assert first.id == second.id
    with Session(engine) as session:
        rows = session.exec(select(Message)).scalars().all()
    assert len(rows) == 1
    assert rows[0].raw == MAIL
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


def test_quarantine_and_release(engine):
    stored = store.store_raw(engine, b"\x00\xff garbage", origin="smtp")
    assert store.count_by_state(engine) == {"received": 1, "processed": 0, "quarantined": 0}
    store.quarantine(engine, stored.id, "ParseError: no headers")
    assert store.count_by_state(engine)["quarantined"] == 1
    assert store.release(engine, stored.id) is True
    assert store.release(engine, stored.id) is False
    assert store.count_by_state(engine)["received"] == 1


def test_message_id_of_headerless_bytes_is_none():
    assert store.header_message_id(b"\x00\x01\x02") is None
    assert store.header_message_id(b"Message-ID: <a@b>\n\nbody") == "<a@b>"
