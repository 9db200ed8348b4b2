"""SMTP and LMTP ingress: reject early, store the raw bytes, answer 250 only after the commit.

The MTA in front of mailbot (or a test client) hands over mail here.  Nothing is
parsed: the bytes go to the archive exactly as they arrived, and the worker
takes them from there.  A 250 is a promise that the mail is on disk; when the
database cannot keep that promise the answer is 451, so the sender retries.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy.engine import Engine

from mailbot import store, verp
from mailbot.rules import Rules

log = logging.getLogger(__name__)

# Citizens' webmail often sends a whole HTML body as one line; RFC 5321's 1000
# octets would bounce it with "500 Line too long".  Accept long lines instead
# (max_message_bytes still bounds the whole mail).
LINE_LIMIT = 1024 * 1024
# Store writes run in these threads, never in the event loop; sized under the
# PostgreSQL pool (10 + 10 overflow) so commits do not queue for a connection.
STORE_THREADS = 8
SHUTDOWN = "421 4.3.2 Service shutting down, try again later"


def accepted_addresses(rules: Rules) -> frozenset[str]:
    """The office address and every department alias, lower-cased."""
    aliases = [alias for department in rules.departments for alias in department.aliases]
    return frozenset(address.lower() for address in [rules.office.address, *aliases])


class _SMTP(SMTP):
    line_length_limit = LINE_LIMIT


class _LMTP(LMTP):
    line_length_limit = LINE_LIMIT


class IngressHandler:
    """aiosmtpd hooks: 550 at RCPT for strangers, 250 after the raw bytes are committed.

    Accepted recipients: the office's addresses and the signed return paths of our mails."""

    def __init__(self, engine: Engine, accepted: frozenset[str], origin: str, executor: ThreadPoolExecutor):
        self.engine = engine
        self.accepted = accepted
        self.origin = origin
        self.executor = executor
        self.stopping = False
        self.in_flight = 0

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        if self.stopping:
            return SHUTDOWN
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if address.lower() not in self.accepted and not await self._is_our_return_path(address):
            log.info("origin=%s peer=%s rcpt=%s rejected: not our address", self.origin, _peer(session), address)
            return f"550 5.1.1 <{address}>: recipient not accepted here"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def _is_our_return_path(self, address: str) -> bool:
        """A bounce to the VERP return path of a mail we sent (verp.py), at one of our domains."""
        domain = address.rpartition("@")[2].lower()
        if not verp.is_return_path(address) or domain not in {a.rpartition("@")[2] for a in self.accepted}:
            return False
        loop = asyncio.get_running_loop()
        key = await loop.run_in_executor(self.executor, verp.secret_key, self.engine)  # reads the database once
        return verp.outbox_id(address, key) is not None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.stopping:
            return self._reply(envelope, SHUTDOWN)
        raw = envelope.original_content or envelope.content
        assert isinstance(raw, bytes)  # decode_data=False
        self.in_flight += 1
        try:
            loop = asyncio.get_running_loop()
            stored = await loop.run_in_executor(
                self.executor, partial(store.store_raw, self.engine, raw, origin=self.origin, peer=_peer(session))
            )
        except Exception as error:  # noqa: BLE001 - whatever failed, the sender must retry, not bounce
            log.exception("origin=%s peer=%s size=%s not stored: %r", self.origin, _peer(session), len(raw), error)
            return self._reply(envelope, "451 4.3.0 Mail not stored, try again later")
        finally:
            self.in_flight -= 1
        return self._reply(envelope, f"250 2.0.0 OK stored as mail={stored.id}")

    def _reply(self, envelope: Envelope, reply: str) -> str:
        # LMTP (RFC 2033 4.2) answers DATA once per accepted recipient.
        if self.origin == "lmtp":
            return "\r\n".join(reply for _ in envelope.rcpt_tos)
        return reply


def _peer(session: Session) -> str | None:
    peer: Any = session.peer
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"[:255]
    return str(peer)[:255] if peer else None


class IngressServer:
    """One SMTP or LMTP listener on its own event-loop thread."""

    def __init__(self, engine: Engine, rules: Rules, listen: tuple[str, int], *, lmtp: bool, max_message_bytes: int):
        self.origin = "lmtp" if lmtp else "smtp"
        self.listen = listen
        self.max_message_bytes = max_message_bytes
        self._executor = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix=f"{self.origin}-store")
        self.handler = IngressHandler(engine, accepted_addresses(rules), self.origin, self._executor)
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port (the real port when listen asked for port 0)."""
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    def _protocol(self) -> SMTP:
        server_class = _LMTP if self.origin == "lmtp" else _SMTP
        return server_class(
            self.handler,
            data_size_limit=self.max_message_bytes,
            decode_data=False,
            enable_SMTPUTF8=True,
            loop=self._loop,
        )

    def start(self) -> None:
        """Bind and serve; raises OSError when the address cannot be bound."""
        host, port = self.listen
        try:
            self._server = self._loop.run_until_complete(self._loop.create_server(self._protocol, host, port))
        except OSError:
            self._loop.close()
            self._executor.shutdown()
            raise
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"{self.origin}-ingress", daemon=True)
        self._thread.start()
        log.info("%s listening on %s:%s", self.origin, *self.address)

    def stop(self, grace_seconds: float = 30.0) -> None:
        """Refuse new mail, let commits in flight answer, then close every session."""
        if self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(grace_seconds), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = None
        self._loop.close()
        self._executor.shutdown(wait=True)
        log.info("%s stopped", self.origin)

    async def _shutdown(self, grace_seconds: float) -> None:
        assert self._server is not None
        self.handler.stopping = True
        self._server.close()
        deadline = self._loop.time() + grace_seconds
        while self.handler.in_flight and self._loop.time() < deadline:
            await asyncio.sleep(0.02)
        # Sessions still open get no answer to a mail they have not finished:
        # the sender keeps it and retries, nothing is lost.
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()
