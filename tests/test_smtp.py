"""SMTP/LMTP ingress against the real aiosmtpd server, driven by smtplib clients."""

from __future__ import annotations

import hashlib
import smtplib
import threading
from email.message import EmailMessage
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from mailbot import db, outbox, pipeline, store
from mailbot.intake.smtp import IngressServer, accepted_addresses
from mailbot.models import Message, MessageRaw, Undeliverable
from mailbot.rules import Rules
from mailbot.settings import Settings
from smtpsink import SmtpSink

OFFICE = "inquiries@emirate.example"
MAX_BYTES = 64 * 1024


def arabic_mail(number: int, sender: str = "citizen@example.com") -> bytes:
    mail = EmailMessage()
    mail["From"] = sender
    mail["To"] = OFFICE
    mail["Subject"] = f"استفسار عن المعاملة رقم {number}"
    mail["Message-ID"] = f"<m{number}.{sender}>"
    mail.set_content(f"السلام عليكم، أرجو إفادتي عن حالة المعاملة 1445/{number:05d}.\n")
    return mail.as_bytes().replace(b"\n", b"\r\n")


@contextmanager
def server(engine: Engine, rules: Rules, *, lmtp: bool = False, max_bytes: int = MAX_BYTES) -> Iterator[IngressServer]:
    ingress = IngressServer(engine, rules, ("127.0.0.1", 0), lmtp=lmtp, max_message_bytes=max_bytes)
    ingress.start()
    try:
        yield ingress
    finally:
        ingress.stop()


@pytest.fixture
def smtp(engine: Engine, rules: Rules) -> Iterator[IngressServer]:
    with server(engine, rules) as ingress:
        yield ingress


@pytest.fixture
def lmtp(engine: Engine, rules: Rules) -> Iterator[IngressServer]:
    with server(engine, rules, lmtp=True) as ingress:
        yield ingress


def archived(engine: Engine) -> list[Message]:
    with engine.connect() as connection:
        return list(connection.execute(
            select(Message.__table__, MessageRaw.__table__.c.raw).join(MessageRaw.__table__)
            .order_by(Message.__table__.c.id)
        ).all())


def test_accepted_addresses_are_office_and_aliases_lower_cased(rules: Rules):
    accepted = accepted_addresses(rules)
    assert OFFICE in accepted
    assert "prisons@emirate.example" in accepted
    assert len(accepted) == 1 + sum(len(d.aliases) for d in rules.departments)


def test_mail_is_stored_byte_for_byte_before_250(engine: Engine, smtp: IngressServer):
    raw = arabic_mail(1)
    with smtplib.SMTP(*smtp.address, timeout=10) as client:
        client.ehlo("client.example")
        assert client.mail("citizen@example.com") == (250, b"2.1.0 OK")
        assert client.rcpt("INQUIRIES@Emirate.Example") == (250, b"2.1.5 OK")
        code, reply = client.data(raw)
    rows = archived(engine)
    assert code == 250
    assert reply == f"2.0.0 OK stored as mail={rows[0].id}".encode()
    assert len(rows) == 1
    assert bytes(rows[0].raw) == raw
    assert rows[0].sha256 == hashlib.sha256(raw).hexdigest()
    assert rows[0].origin == "smtp"
    assert rows[0].peer.startswith("127.0.0.1:")
    assert rows[0].state == "received"


def test_department_alias_is_accepted(engine: Engine, smtp: IngressServer):
    with smtplib.SMTP(*smtp.address, timeout=10) as client:
        refused = client.sendmail("citizen@example.com", ["prisons@emirate.example"], arabic_mail(2))
    assert refused == {}
    assert len(archived(engine)) == 1


def test_unknown_recipient_gets_550_at_rcpt_and_nothing_is_stored(engine: Engine, smtp: IngressServer):
    with smtplib.SMTP(*smtp.address, timeout=10) as client:
        client.ehlo("client.example")
        client.mail("citizen@example.com")
        code, reply = client.rcpt("someone@elsewhere.example")
        assert (code, reply) == (550, b"5.1.1 <someone@elsewhere.example>: recipient not accepted here")
        client.rset()
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail("citizen@example.com", ["stranger@emirate.example"], arabic_mail(3))
    assert refused.value.recipients == {
        "stranger@emirate.example": (550, b"5.1.1 <stranger@emirate.example>: recipient not accepted here")
    }
    assert archived(engine) == []


def test_oversize_gets_552_for_size_parameter_and_for_data(engine: Engine, smtp: IngressServer):
    big = arabic_mail(4) + b"x" * 76 + (b"\r\n" + b"y" * 76) * (MAX_BYTES // 78 + 10)
    with smtplib.SMTP(*smtp.address, timeout=10) as client:
        client.ehlo("client.example")
        assert client.has_extn("size") and int(client.esmtp_features["size"]) == MAX_BYTES
        code, reply = client.mail("citizen@example.com", [f"SIZE={len(big)}"])
        assert (code, reply) == (552, b"Error: message size exceeds fixed maximum message size")
        client.rset()
        # A client that does not announce the size is stopped at the data itself.
        client.mail("citizen@example.com")
        client.rcpt(OFFICE)
        assert client.data(big) == (552, b"Error: Too much mail data")
    assert archived(engine) == []


def test_long_lines_are_accepted_as_they_are(engine: Engine, smtp: IngressServer):
    # Webmail sends whole HTML bodies as one line; RFC 5321's 1000 octets would bounce it.
    raw = arabic_mail(5).replace(b"\r\n\r\n", b"\r\n\r\n<p>" + "نص طويل ".encode() * 1000 + b"</p>\r\n", 1)
    with smtplib.SMTP(*smtp.address, timeout=10) as client:
        assert client.sendmail("citizen@example.com", [OFFICE], raw) == {}
    assert [bytes(row.raw) for row in archived(engine)] == [raw]


def test_database_failure_answers_451_so_the_sender_retries(engine: Engine, rules: Rules, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(store, "store_raw", broken)
    with server(engine, rules) as ingress:
        with smtplib.SMTP(*ingress.address, timeout=10) as client:
            client.ehlo("client.example")
            client.mail("citizen@example.com")
            client.rcpt(OFFICE)
            assert client.data(arabic_mail(6)) == (451, b"4.3.0 Mail not stored, try again later")
    assert archived(engine) == []


def test_database_unreachable_answers_451(rules: Rules):
    unreachable = db.get_engine("postgresql://mailbot@127.0.0.1:1/nothing")
    with server(unreachable, rules) as ingress:
        with smtplib.SMTP(*ingress.address, timeout=30) as client:
            with pytest.raises(smtplib.SMTPDataError) as error:
                client.sendmail("citizen@example.com", [OFFICE], arabic_mail(7))
    assert (error.value.smtp_code, error.value.smtp_error) == (451, b"4.3.0 Mail not stored, try again later")


def test_lmtp_answers_once_per_recipient(engine: Engine, lmtp: IngressServer):
    raw = arabic_mail(8)
    client = smtplib.LMTP(*lmtp.address)
    try:
        code, _ = client.ehlo("client.example")  # smtplib.LMTP sends LHLO
        assert code == 250
        client.mail("citizen@example.com")
        assert client.rcpt(OFFICE)[0] == 250
        assert client.rcpt("nobody@emirate.example") == (
            550, b"5.1.1 <nobody@emirate.example>: recipient not accepted here"
        )
        assert client.rcpt("rights@emirate.example")[0] == 250
        first = client.data(raw)
        second = client.getreply()  # RFC 2033: one reply per accepted recipient
        client.quit()
    finally:
        client.close()
    rows = archived(engine)
    assert len(rows) == 1
    expected = (250, f"2.0.0 OK stored as mail={rows[0].id}".encode())
    assert first == expected and second == expected
    assert bytes(rows[0].raw) == raw
    assert rows[0].origin == "lmtp"


def test_lmtp_refuses_helo(lmtp: IngressServer):
    with smtplib.SMTP(*lmtp.address, timeout=10) as client:
        assert client.helo("client.example") == (500, b'Error: command "HELO" not recognized')


def send_concurrently(address: tuple[str, int], clients: int, per_client: int) -> dict[str, bytes]:
    """Send from ``clients`` threads; returns sha256 -> raw of every mail answered 250."""
    acknowledged: dict[str, bytes] = {}
    failures: list[BaseException] = []
    lock = threading.Lock()

    def client_thread(index: int) -> None:
        try:
            with smtplib.SMTP(*address, timeout=60) as client:
                for n in range(per_client):
                    raw = arabic_mail(index * per_client + n, sender=f"c{index}@example.com")
                    client.ehlo_or_helo_if_needed()
                    client.mail(f"c{index}@example.com")
                    client.rcpt(OFFICE)
                    code, _ = client.data(raw)
                    if code == 250:
                        with lock:
                            acknowledged[hashlib.sha256(raw).hexdigest()] = raw
        except BaseException as error:  # noqa: BLE001 - reported by the test below
            failures.append(error)

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    return acknowledged


def assert_all_archived(engine: Engine, acknowledged: dict[str, bytes]) -> None:
    rows = archived(engine)
    by_hash = {row.sha256: bytes(row.raw) for row in rows}
    assert len(rows) == len(acknowledged)
    assert by_hash == acknowledged


def test_twenty_clients_thousand_mails_all_archived(engine: Engine, rules: Rules):
    with server(engine, rules) as ingress:
        acknowledged = send_concurrently(ingress.address, clients=20, per_client=50)
    assert len(acknowledged) == 1000
    assert_all_archived(engine, acknowledged)


def test_stop_refuses_new_mail_and_closes_sessions(engine: Engine, rules: Rules):
    ingress = IngressServer(engine, rules, ("127.0.0.1", 0), lmtp=False, max_message_bytes=MAX_BYTES)
    ingress.start()
    address = ingress.address
    client = smtplib.SMTP(*address, timeout=10)
    client.ehlo("client.example")
    ingress.handler.stopping = True
    assert client.mail("citizen@example.com") == (421, b"4.3.2 Service shutting down, try again later")
    ingress.stop()
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.noop()
    client.close()
    with pytest.raises(ConnectionRefusedError):
        smtplib.SMTP(*address, timeout=5)
    assert archived(engine) == []


def test_lmtp_database_failure_answers_451_per_recipient(engine: Engine, rules: Rules, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(store, "store_raw", broken)
    with server(engine, rules, lmtp=True) as ingress:
        client = smtplib.LMTP(*ingress.address)
        try:
            client.ehlo("client.example")
            client.mail("citizen@example.com")
            client.rcpt(OFFICE)
            client.rcpt("criminal@emirate.example")
            replies = [client.data(arabic_mail(9)), client.getreply()]
            client.quit()
        finally:
            client.close()
    assert replies == [(451, b"4.3.0 Mail not stored, try again later")] * 2
    assert archived(engine) == []


def test_a_busy_port_raises_and_leaves_nothing_running(engine: Engine, rules: Rules):
    with server(engine, rules) as running:
        busy = IngressServer(engine, rules, running.address, lmtp=False, max_message_bytes=MAX_BYTES)
        with pytest.raises(OSError, match="address already in use"):
            busy.start()
        busy.stop()  # never started: nothing to stop


def text_bounce(return_path: str, failed: str) -> bytes:
    """A pre-RFC 3464 bounce (qmail) sent to the envelope sender, with no Message-ID of the original."""
    return (
        "From: MAILER-DAEMON@mx.citizen.example\r\n"
        f"To: {return_path}\r\n"
        "Subject: failure notice\r\n"
        "Message-ID: <bounce-1@mx.citizen.example>\r\n"
        "Date: Mon, 23 Nov 2026 12:00:00 +0300\r\n"
        "\r\n"
        "Hi. This is the qmail-send program at mx.citizen.example.\r\n"
        "I'm afraid I wasn't able to deliver your message to the following addresses.\r\n"
        "\r\n"
        f"<{failed}>:\r\n"
        "550 5.2.2 mailbox full\r\n"
    ).encode()


def test_a_bounce_to_a_mails_return_path_comes_through_the_ingress_and_marks_its_recipient(
    engine: Engine, rules: Rules, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    """VERP round trip: our mail leaves with its signed return path; the report sent back to it
    is accepted at RCPT and marks that mail's recipient, though it names no Message-ID of ours."""
    citizen = "full.mailbox@citizen.example"
    store.store_raw(engine, arabic_mail(1, sender=citizen), origin="smtp")
    pipeline.process_pending(engine, rules)
    assert outbox.send_due(engine, Settings(smtp_host=smtp_sink.host, smtp_port=smtp_sink.port, smtp_tls="none",
                                            sent_maildir=tmp_path / "sent")) == 2  # the ack and the forward
    [ack] = [mail for mail in smtp_sink.accepted if mail.rcpt_tos == (citizen,)]
    return_path = ack.mail_from
    outbox_id, mac = return_path.partition("@")[0].removeprefix("bounces+").split("-")
    forged = f"bounces+{outbox_id}-{'0' * 16 if mac != '0' * 16 else '1' * 16}@emirate.example"

    with server(engine, rules) as ingress, smtplib.SMTP(*ingress.address, timeout=10) as client:
        # The same report to the office address instead: it names no mail of ours.
        client.sendmail("", [OFFICE], text_bounce(OFFICE, citizen).replace(b"bounce-1@", b"bounce-0@"))
        pipeline.process_pending(engine, rules)
        with db.session(engine) as session:
            assert session.get(Undeliverable, citizen) is None
        client.ehlo("mx.citizen.example")
        client.mail("")
        assert client.rcpt(forged)[0] == 550  # a guessed id without our mac
        assert client.rcpt(f"bounces+{outbox_id}-{mac}@elsewhere.example")[0] == 550  # not our domain
        assert client.rcpt(return_path)[0] == 250
        assert client.data(text_bounce(return_path, citizen))[0] == 250
    pipeline.process_pending(engine, rules)

    with db.session(engine) as session:
        mark = session.get(Undeliverable, citizen)
        kinds = session.execute(select(Message.kind).order_by(Message.id)).scalars().all()
    assert kinds == ["inquiry", "bounce", "bounce"]
    assert mark is not None and f"outbox={outbox_id}" in (mark.reason or "")
