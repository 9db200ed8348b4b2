"""IMAP intake: fetch new mail from the official inbox, archive it, then move the inbox copy.

The order is the point: a mail is committed to the database (with its
UIDVALIDITY/UID in ImapSeen, same transaction) before the server copy is
touched, so a crash anywhere loses nothing and a restart fetches nothing twice.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from typing import Iterator

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError
from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from mailbot import health, leases, store
from mailbot.models import ImapSeen
from mailbot.settings import Settings

log = logging.getLogger(__name__)

HEALTH_NAME = "imap"
SOCKET_TIMEOUT = 60.0
# A FETCH answer is held in memory whole; past this many bytes a batch is
# split, so fifty 25 MB attachments never arrive in one response.
MAX_FETCH_BYTES = 8 * 1024 * 1024
# A mail larger than that comes in partial fetches of this size.  imaplib holds
# a piece several times while reading it, and glibc keeps freed buffers this
# large: 1 MB pieces took the peak for a 25 MB mail from 127 to 114 MB, no slower.
PIECE_BYTES = 1024 * 1024
IDLE_CHECK_SECONDS = 1.0  # how quickly the IDLE wait notices `stop`


class Backoff:
    """Exponential reconnect delay, capped, with jitter so many daemons don't retry in step."""

    def __init__(self, base: float = 1.0, cap: float = 60.0) -> None:
        self.base = base
        self.cap = cap
        self.failures = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * 2 ** min(self.failures, 16))
        self.failures += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0


def connect(settings: Settings) -> IMAPClient:
    """A logged-in client in the TLS mode the settings ask for."""
    context = ssl.create_default_context()
    client = IMAPClient(
        settings.imap_host,
        port=settings.imap_port,
        ssl=settings.imap_tls == "ssl",
        ssl_context=context,
        timeout=SOCKET_TIMEOUT,
    )
    try:
        if settings.imap_tls == "starttls":
            client.starttls(context)
        client.login(settings.imap_user, settings.imap_password or "")
    except BaseException:
        _shutdown(client)
        raise
    return client


def ensure_folder(client: IMAPClient, folder: str) -> None:
    if client.folder_exists(folder):
        return
    try:
        client.create_folder(folder)
    except IMAPClientError:
        # Another client may have created it between the two commands.
        if not client.folder_exists(folder):
            raise


def intake_pass(client: IMAPClient, engine: Engine, settings: Settings) -> int:
    """One full pass over the inbox: fetch new → store → move. Returns how many were newly stored.

    UIDs already in ImapSeen (stored before a crash, not yet moved) are moved
    without being fetched again; only archived UIDs are ever moved.
    """
    folder = settings.imap_folder
    uidvalidity = int(client.select_folder(folder)[b"UIDVALIDITY"])
    uids = sorted(client.search(["ALL"]))
    stored = 0
    for chunk in _chunks(uids, settings.imap_batch):
        archived = _known_uids(engine, folder, uidvalidity, chunk)
        new = [uid for uid in chunk if uid not in archived]
        for batch in _batches_by_size(client, new, settings.imap_batch):
            fetched, created = _fetch_and_store(client, engine, batch, folder, uidvalidity)
            archived.update(fetched)
            stored += created
        if archived:
            _move(client, sorted(archived), settings.imap_processed_folder)
            _mark_moved(engine, folder, uidvalidity, sorted(archived))
    return stored


def _chunks(uids: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(uids), size):
        yield uids[start : start + size]


def _known_uids(engine: Engine, folder: str, uidvalidity: int, uids: list[int]) -> set[int]:
    seen = ImapSeen.__table__.c
    with engine.connect() as connection:
        rows = connection.execute(
            select(seen.uid).where(seen.mailbox == folder, seen.uidvalidity == uidvalidity, seen.uid.in_(uids))
        )
        return {uid for (uid,) in rows}


def _batches_by_size(client: IMAPClient, uids: list[int], limit: int) -> Iterator[dict[int, int]]:
    """Batches of at most ``limit`` UIDs and MAX_FETCH_BYTES, as {uid: RFC822.SIZE}."""
    if not uids:
        return
    sizes = client.fetch(uids, ["RFC822.SIZE"])
    batch: dict[int, int] = {}
    total = 0
    for uid in uids:
        size = int(sizes.get(uid, {}).get(b"RFC822.SIZE", 0))
        if batch and (len(batch) >= limit or total + size > MAX_FETCH_BYTES):
            yield batch
            batch, total = {}, 0
        batch[uid] = size
        total += size
    yield batch


class _Vanished(Exception):
    """The UID was expunged while it was being fetched."""


def _fetch_and_store(
    client: IMAPClient, engine: Engine, batch: dict[int, int], folder: str, uidvalidity: int
) -> tuple[list[int], int]:
    """Archive each UID of ``batch``; returns the UIDs now archived and how many were new bytes."""
    if len(batch) == 1 and max(batch.values()) > MAX_FETCH_BYTES:
        (uid,) = batch
        try:
            result = store.store_pieces(engine, lambda: _fetch_in_pieces(client, uid), origin="imap",
                                        mailbox=folder, uidvalidity=uidvalidity, uid=uid)
        except _Vanished:
            log.warning("folder=%s uid=%s vanished before it was fetched", folder, uid)
            return [], 0
        return [uid], int(result.created)
    # BODY.PEEK leaves \Seen alone: the inbox copy looks untouched until it is moved.
    bodies = {uid: item.get(b"BODY[]") for uid, item in client.fetch(list(batch), ["BODY.PEEK[]"]).items()}
    fetched = []
    for uid in batch:
        raw = bodies.pop(uid, None)
        if raw is None:
            log.warning("folder=%s uid=%s vanished before it was fetched", folder, uid)
            continue
        fetched.append((uid, raw))
    stored = store.store_fetched(engine, fetched, mailbox=folder, uidvalidity=uidvalidity)
    return [uid for uid, _raw in fetched], sum(result.created for result in stored)


def _fetch_in_pieces(client: IMAPClient, uid: int) -> Iterator[bytes]:
    """One large mail in PIECE_BYTES partial fetches (RFC 3501 BODY[]<origin.octets>).

    imaplib and imapclient hold several copies of one literal while parsing it;
    in pieces, and with store.store_pieces writing each piece into the archive
    as it comes, the whole mail is never in memory at once.
    """
    offset = 0
    while True:
        item = client.fetch([uid], [f"BODY.PEEK[]<{offset}.{PIECE_BYTES}>"]).get(uid)
        if item is None:
            raise _Vanished(uid)  # expunged meanwhile: never store a truncated mail
        piece = item.get(f"BODY[]<{offset}>".encode()) or b""
        del item
        offset += len(piece)
        yield piece
        if len(piece) < PIECE_BYTES:
            return


def _move(client: IMAPClient, uids: list[int], target: str) -> None:
    """Move after commit: MOVE when offered, else COPY + \\Deleted + (UID) EXPUNGE."""
    if client.has_capability("MOVE"):
        client.move(uids, target)
        return
    client.copy(uids, target)
    client.delete_messages(uids)
    if client.has_capability("UIDPLUS"):
        client.uid_expunge(uids)
    else:
        # Without UIDPLUS, EXPUNGE also removes mails someone else flagged \Deleted;
        # RFC 3501 offers nothing narrower.
        client.expunge()


def _mark_moved(engine: Engine, folder: str, uidvalidity: int, uids: list[int]) -> None:
    seen = ImapSeen.__table__.c
    with engine.begin() as connection:
        connection.execute(
            update(ImapSeen.__table__)
            .where(seen.mailbox == folder, seen.uidvalidity == uidvalidity, seen.uid.in_(uids))
            .values(moved=True)
        )


def record_health(engine: Engine, error: str | None = None) -> None:
    """Note for `mailbot status` that the intake works, or fails with ``error``."""
    health.record_outcome(engine, HEALTH_NAME, error)


def wait_for_mail(client: IMAPClient, settings: Settings, stop: threading.Event) -> None:
    """Return when new mail may be there: IDLE news, the re-IDLE interval, a poll tick, or `stop`."""
    if not client.has_capability("IDLE"):
        stop.wait(settings.imap_poll_seconds)
        return
    # Servers drop idle clients after ~30 min (RFC 2177), so IDLE is renewed. And a
    # mail delivered between our last command and the server arming its watch is not
    # announced (Dovecot 2.3 waits for its own 30 s recheck): IDLE also ends after
    # imap_poll_seconds, so the next pass finds such a mail at worst that late.
    deadline = time.monotonic() + min(settings.imap_idle_seconds, settings.imap_poll_seconds)
    quick_empty = 0
    client.idle()
    while not stop.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        wait = min(IDLE_CHECK_SECONDS, remaining)
        started = time.monotonic()
        responses = client.idle_check(timeout=wait)
        if any(response[0] == b"BYE" for response in responses):
            raise ConnectionError(f"IMAP server said BYE during IDLE: {responses}")
        # idle_check swallows EOF and returns [] at once, again and again; a
        # readable socket with nothing to parse, three times running, is a closed one.
        quick_empty = quick_empty + 1 if not responses and time.monotonic() - started < wait / 2 else 0
        if quick_empty >= 3:
            raise ConnectionError("IMAP server closed the connection during IDLE")
        if any(len(response) > 1 and response[1] == b"EXISTS" for response in responses):
            break
    client.idle_done()


def serve(client: IMAPClient, engine: Engine, settings: Settings, stop: threading.Event, backoff: Backoff) -> None:
    """Passes and waits on one connection until `stop` or a connection error."""
    ensure_folder(client, settings.imap_processed_folder)
    while not stop.is_set():
        uidnext = _uidnext(client, settings.imap_folder)
        stored = intake_pass(client, engine, settings)
        record_health(engine)
        backoff.reset()
        if stored:
            log.info("intake=imap stored=%s", stored)
        if stop.is_set():
            return
        # Mail that arrived during the pass was announced (EXISTS) in answers to
        # FETCH or MOVE and is not announced again when IDLE starts: look before idling.
        if not _arrived_since(client, uidnext):
            wait_for_mail(client, settings, stop)


def _uidnext(client: IMAPClient, folder: str) -> int:
    # Without UIDNEXT (RFC 3501 requires it) every mail in the folder counts as new.
    return int(client.select_folder(folder).get(b"UIDNEXT", 1))


def _arrived_since(client: IMAPClient, uidnext: int) -> bool:
    # "n:*" also matches the last mail when its UID is below n (RFC 3501 6.4.8).
    return any(uid >= uidnext for uid in client.search(["UID", f"{uidnext}:*"]))


# How often a standing-by daemon tries to take the inbox over from the one holding it.
STANDBY_SECONDS = 2.0


def run_imap_intake(settings: Settings, engine: Engine, stop: threading.Event) -> None:
    """The intake thread: hold the inbox (one daemon of several on PostgreSQL fetches it), then
    serve, and on any error reconnect with backoff until `stop` is set.

    A daemon that does not hold the inbox stands by and tries again every STANDBY_SECONDS:
    when the holder dies, its lock goes with its connection and a standby takes over,
    resuming from the UIDs already stored."""
    inbox = f"imap:{settings.imap_user}@{settings.imap_host}:{settings.imap_port}/{settings.imap_folder}"
    standing_by = False
    while not stop.is_set():
        try:
            with leases.held(engine, inbox) as mine:
                if mine:
                    log.info("intake=imap holding the inbox %s", inbox)
                    standing_by = False
                    _serve_held(settings, engine, stop)
                    continue
        except Exception as error:  # noqa: BLE001 - a database down: try again, as a reconnect would
            log.warning("intake=imap lease not taken error=%r", f"{error.__class__.__name__}: {error}")
        if not standing_by:
            log.info("intake=imap standing by: another daemon holds the inbox %s", inbox)
            standing_by = True
        stop.wait(STANDBY_SECONDS)


def _serve_held(settings: Settings, engine: Engine, stop: threading.Event) -> None:
    backoff = Backoff()
    while not stop.is_set():
        client: IMAPClient | None = None
        connected_at = time.monotonic()
        try:
            client = connect(settings)
            serve(client, engine, settings, stop, backoff)
        except Exception as error:  # noqa: BLE001 - the intake loop must outlive any failure
            if time.monotonic() - connected_at > backoff.cap:
                backoff.reset()  # a connection that worked this long was healthy: retry soon
            reason = f"{error.__class__.__name__}: {error}"
            delay = backoff.next_delay()
            log.warning(
                "intake=imap reconnect attempt=%s delay=%.1fs host=%s error=%r",
                backoff.failures, delay, settings.imap_host, reason,
            )
            _record_error(engine, reason)
            stop.wait(delay)
        finally:
            if client is not None:
                _close(client)


def _record_error(engine: Engine, reason: str) -> None:
    try:
        record_health(engine, reason)
    except Exception:  # noqa: BLE001 - a down database must not end the intake thread
        log.warning("intake=imap health not recorded error=%r", reason)


def _close(client: IMAPClient) -> None:
    try:
        client.logout()
    except (IMAPClientError, OSError):
        _shutdown(client)  # the connection is already broken; just release the socket


def _shutdown(client: IMAPClient) -> None:
    try:
        client.shutdown()
    except OSError:
        pass  # a failed TLS handshake has closed the socket already
