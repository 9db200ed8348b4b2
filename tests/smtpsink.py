"""An aiosmtpd relay sink for tests and benchmarks: a real SMTP server on a free loopback port.

It accepts every mail (or, when told, answers 4xx/5xx for the next N mails),
records each accepted one with its envelope, and can wait until a count is
reached.  Use the ``smtp_sink`` fixture, or ``SmtpSink`` directly in scripts.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Iterator

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


@dataclass(frozen=True)
class Accepted:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    at: float
    message_id: str | None  # read once from the header block, so polling stays cheap
    in_reply_to: str | None
    peer: tuple[str, int]  # the client's address and port: one per SMTP connection

    @property
    def message(self) -> EmailMessage:
        return message_from_bytes(self.data, policy=policy.default)  # type: ignore[return-value]


class _Handler:
    def __init__(self) -> None:
        self.accepted: list[Accepted] = []
        self.refused: list[str] = []
        self.failure: str | None = None
        self.failures_left = 0
        self.condition = threading.Condition()
        self.data_seconds = 0.0  # how long each DATA takes, to see clients overlap
        self.in_data = 0
        self.most_in_data = 0
        self.stalls_left = 0  # DATA commands to leave unanswered until the client goes away
        self.stalled = 0

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: ANN001 - aiosmtpd's types
        if self.data_seconds:
            self.in_data += 1  # the event loop's thread only: no lock needed
            self.most_in_data = max(self.most_in_data, self.in_data)
            await asyncio.sleep(self.data_seconds)
            self.in_data -= 1
        if self.stalls_left > 0:
            self.stalls_left -= 1
            self.stalled += 1
            # Until the sender dies mid-transaction (aiosmtpd cancels this at EOF): nothing delivered.
            while server.transport is not None and not server.transport.is_closing():
                await asyncio.sleep(0.05)
            return "451 4.4.2 sender went away"
        with self.condition:
            if self.failures_left > 0 and self.failure is not None:
                self.failures_left -= 1
                self.refused.append(self.failure)
                return self.failure
            data = bytes(envelope.original_content or envelope.content)
            ids = _ids(data.split(b"\r\n\r\n", 1)[0])
            self.accepted.append(Accepted(
                envelope.mail_from, tuple(envelope.rcpt_tos), data, time.time(),
                ids.get(b"message-id"), ids.get(b"in-reply-to"), tuple(session.peer[:2]),
            ))
            self.condition.notify_all()
        return "250 2.0.0 OK: queued"


# A Message-ID or In-Reply-To field with its continuation lines.  Read with a pattern, not
# the email package: a relay does not parse headers, and this one shares the CPU in benchmarks.
_ID_FIELD = re.compile(rb"^(Message-ID|In-Reply-To):((?:[^\r\n]|\r?\n[ \t])*)", re.IGNORECASE | re.MULTILINE)


def _ids(head: bytes) -> dict[bytes, str]:
    """{b"message-id": ..., b"in-reply-to": ...} of a header block: each field's first
    occurrence, unfolded; an empty field counts as absent."""
    found: dict[bytes, str] = {}
    for match in _ID_FIELD.finditer(head):
        value = " ".join(match.group(2).decode("ascii", "replace").split())
        if value:
            found.setdefault(match.group(1).lower(), value)
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_certificate(folder: Path) -> Path:
    """A self-signed certificate for 127.0.0.1/localhost; returns the PEM holding key and certificate."""
    key, cert = folder / "sink.key", folder / "sink.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return cert


class SmtpSink:
    """``tls``: none, starttls (required before MAIL) or ssl; ``login``: (user, password) required to send."""

    def __init__(self, tls: str = "none", certificate: Path | None = None,
                 login: tuple[str, str] | None = None) -> None:
        self.handler = _Handler()
        self.host = "127.0.0.1"
        self.port = free_port()
        self.tls = tls
        self.login = login
        self.logins: list[str] = []
        kwargs: dict[str, object] = {"data_size_limit": 50 * 1024 * 1024}
        if tls != "none":
            assert certificate is not None, "TLS needs a certificate (make_certificate)"
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(certificate, certificate.with_suffix(".key"))
            kwargs.update(ssl_context=context) if tls == "ssl" else kwargs.update(
                tls_context=context, require_starttls=True
            )
        if login is not None:
            # aiosmtpd counts only STARTTLS as TLS: over implicit TLS (ssl) it must offer AUTH
            # without "requiring TLS", and may then not require AUTH (it warns otherwise).
            kwargs.update(authenticator=self._authenticate, auth_required=tls != "ssl",
                          auth_require_tls=tls == "starttls")
        self.controller = Controller(self.handler, hostname=self.host, port=self.port, **kwargs)

    def _authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:  # noqa: ANN001
        ok = isinstance(auth_data, LoginPassword) and self.login == (
            auth_data.login.decode(), auth_data.password.decode()
        )
        if ok:
            self.logins.append(auth_data.login.decode())
        return AuthResult(success=ok, handled=False)

    def start(self) -> None:
        # Controller.start() itself waits until the server greets a test connection.
        self.controller.start()
        if self.tls == "ssl":
            client: smtplib.SMTP = smtplib.SMTP_SSL(self.host, self.port, timeout=10,
                                                    context=ssl._create_unverified_context())
        else:
            client = smtplib.SMTP(self.host, self.port, timeout=10)
        with client:
            code, _ = client.noop()
            assert code == 250, f"SMTP sink on {self.host}:{self.port} answered NOOP with {code}"

    def stop(self) -> None:
        self.controller.stop()

    @property
    def accepted(self) -> list[Accepted]:
        with self.handler.condition:
            return list(self.handler.accepted)

    @property
    def refused(self) -> list[str]:
        with self.handler.condition:
            return list(self.handler.refused)

    def fail(self, answer: str, times: int) -> None:
        """Answer the next ``times`` DATA commands with ``answer`` (e.g. ``"451 4.3.0 try later"``)."""
        with self.handler.condition:
            self.handler.failure, self.handler.failures_left = answer, times

    def stall(self, times: int) -> None:
        """Leave the next ``times`` DATA commands unanswered until their client disconnects;
        they are not delivered (``stalled`` counts them as they begin)."""
        with self.handler.condition:
            self.handler.stalls_left = times

    @property
    def stalled(self) -> int:
        return self.handler.stalled

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Accepted]:
        deadline = time.monotonic() + timeout
        with self.handler.condition:
            while len(self.handler.accepted) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.handler.condition.wait(left)
            return list(self.handler.accepted)

    def env(self) -> dict[str, str]:
        """The MAILBOT_* variables that make mailbot relay through this sink."""
        env = {"MAILBOT_SMTP_HOST": self.host, "MAILBOT_SMTP_PORT": str(self.port), "MAILBOT_SMTP_TLS": self.tls}
        if self.login:
            env.update(MAILBOT_SMTP_USER=self.login[0], MAILBOT_SMTP_PASSWORD=self.login[1])
        return env


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    sink = SmtpSink()
    sink.start()
    try:
        yield sink
    finally:
        sink.stop()
