"""The daemon's wiring: intake servers and threads, the scheduler and its jobs, a clean stop."""

from __future__ import annotations

import logging
import signal
import threading
from datetime import datetime, timezone
from multiprocessing.process import BaseProcess

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError

from mailbot import db, health, leases, notify, outbox, rules_in_force, wake, workers
from mailbot.intake.smtp import IngressServer, accepted_addresses
from mailbot.rules import Rules, RulesReloader
from mailbot.settings import Settings

log = logging.getLogger(__name__)

# Outgoing mails per relay connection and send_due call: the job checks for a stop between
# batches, and each connection (a TCP, TLS and login handshake) carries up to this many.
OUTBOX_BATCH = 50
SUPERVISE_SECONDS = 1.0

# What each role of `mailbot run --role` runs; every role also beats, reloads rules and listens.
ROLES = {
    "all": frozenset({"ingress", "worker", "sender"}),
    "ingress": frozenset({"ingress"}),  # SMTP/LMTP servers and IMAP intake: mail in, stored
    "worker": frozenset({"worker"}),  # the pipeline's processes, status notifications, escalation
    "sender": frozenset({"sender"}),  # the outbox: mail out
}


class RoleError(Exception):
    """A role other than ``all`` asked of a daemon that must do everything (SQLite)."""


def send_outbox(engine: Engine, settings: Settings, stop: threading.Event) -> None:
    """The outbox job: send what is due, batch after batch, until none is left or a stop is asked."""
    limit = OUTBOX_BATCH * settings.smtp_connections
    while not stop.is_set() and outbox.send_due(engine, settings, limit=limit) == limit:
        pass


def reload_rules(engine: Engine, reloader: RulesReloader, servers: list[IngressServer],
                 in_force: list[str | None]) -> None:
    """Swap in edited rules (a bad edit is refused inside the reloader, the rules in force stay),
    or the edit another daemon saved (rules_in_force.follow).

    The rules in force are kept in the database for the commands and the other daemons, and a
    refusal is noted there for `mailbot status`.  ``in_force`` holds the fingerprint of the rules
    this daemon has (one item, updated here)."""
    before, refused = reloader.rules, reloader.refused
    if reloader.reload_if_changed() is not before:
        in_force[0] = rules_in_force.save(engine, reloader.folder)
    elif reloader.refused and reloader.refused is not refused:
        rules_in_force.record_refused(engine, reloader.refused)
    in_force[0] = rules_in_force.follow(engine, reloader, in_force[0])
    if reloader.rules is not before:
        for server in servers:
            server.handler.accepted = accepted_addresses(reloader.rules)


def heartbeat(engine: Engine, started_at: datetime) -> None:
    health.beat(engine, started_at)


def notify_changes(engine: Engine, reloader: RulesReloader, settings: Settings) -> None:
    """Tell citizens of status changes; with several daemons, one of them per period."""
    with leases.held(engine, "notify") as mine:
        if mine:
            notify.notify_status_changes(engine, reloader.rules, settings)


def escalate(engine: Engine, reloader: RulesReloader, settings: Settings) -> None:
    """Escalate overdue inquiries; with several daemons, one of them per period."""
    with leases.held(engine, "escalate") as mine:
        if mine:
            notify.escalate_overdue(engine, reloader.rules, db.utcnow(), templates_dir=settings.templates_dir)


def start_ingress(settings: Settings, engine: Engine, rules: Rules) -> list[IngressServer]:
    servers: list[IngressServer] = []
    for listen, lmtp in ((settings.smtp_listen, False), (settings.lmtp_listen, True)):
        if listen is None:
            continue
        server = IngressServer(engine, rules, listen, lmtp=lmtp, max_message_bytes=settings.max_message_bytes)
        try:
            server.start()
        except OSError:
            for started in servers:
                started.stop()
            raise
        servers.append(server)
    return servers


def start_imap(settings: Settings, engine: Engine, stop: threading.Event) -> threading.Thread:
    # Imported here: IMAP intake is optional and lives in its own module.
    from mailbot.intake.imap import run_imap_intake

    def run() -> None:
        try:
            run_imap_intake(settings, engine, stop)
        except Exception:  # noqa: BLE001 - an intake loop: log, the other intakes keep running
            log.exception("imap intake stopped with an error")

    thread = threading.Thread(target=run, name="imap-intake", daemon=True)
    thread.start()
    return thread


def _describe(settings: Settings, servers: list[IngressServer], imap: bool, worker_processes: int) -> str:
    bound = {server.origin: "%s:%s" % server.address for server in servers}
    listening = f"smtp={bound.get('smtp', 'off')} lmtp={bound.get('lmtp', 'off')}"
    imap_part = f"imap={settings.imap_user}@{settings.imap_host}:{settings.imap_port}/{settings.imap_folder}" if imap else "imap=off"
    database = make_url(db.normalise_url(settings.db_url)).render_as_string(hide_password=True)
    return (f"{listening} {imap_part} workers={worker_processes} worker_seconds={settings.worker_seconds} "
            f"db={database} outgoing={_outgoing(settings)}")


def _outgoing(settings: Settings) -> str:
    """Where outgoing mail goes: the relay, or the Maildir used when there is none."""
    if settings.smtp_host:
        return f"smtp://{settings.smtp_host}:{settings.smtp_port}(tls={settings.smtp_tls})"
    return f"maildir:{settings.sent_maildir.resolve()}"


def run_daemon(settings: Settings, stop: threading.Event | None = None, role: str = "all") -> None:
    """Run until SIGTERM/SIGINT (or ``stop`` is set), then stop intake first and let the workers finish.

    Intake, the outbox and the scheduler run here; the pipeline runs in worker
    processes (workers.py), which this thread starts, restarts when one dies,
    and stops last.  ``role`` (a key of ROLES) leaves out the parts another daemon
    runs; an SQLite file takes one daemon, so there it must be ``all``.
    """
    if role != "all" and make_url(db.normalise_url(settings.db_url)).get_backend_name() == "sqlite":
        raise RoleError(f"--role {role} needs PostgreSQL: an SQLite file takes one daemon, "
                        "which must do everything (--role all)")
    stop = stop or threading.Event()
    for warning in settings.warnings:
        log.warning("%s", warning)
    lock = db.sqlite_lock(settings.db_url)  # raises DatabaseInUse while another daemon has the file
    try:
        _serve(settings, stop, ROLES[role])
    finally:
        if lock is not None:
            lock.close()


def _serve(settings: Settings, stop: threading.Event, parts: frozenset[str]) -> None:
    if db.upgrade(settings.db_url):
        log.info("database schema: waited for another daemon's migration, now up to date")
    engine = db.get_engine(settings.db_url)
    reloader = RulesReloader(settings.rules_dir)
    rules = reloader.rules
    in_force = [rules_in_force.save(engine, reloader.folder)]
    started_at = db.utcnow()
    health.beat(engine, started_at)
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())

    servers = start_ingress(settings, engine, rules) if "ingress" in parts else []
    imap_thread: threading.Thread | None = None
    scheduler = BackgroundScheduler(timezone=timezone.utc)
    processes: list[BaseProcess] = []
    try:
        if "worker" in parts:
            processes = workers.start_all(settings, reloader.rules)
        if settings.imap_host and "ingress" in parts:
            imap_thread = start_imap(settings, engine, stop)
        jobs = (
            ("sender", send_outbox, settings.outbox_seconds, (engine, settings, stop)),
            ("worker", notify_changes, settings.notify_seconds, (engine, reloader, settings)),
            ("worker", escalate, settings.notify_seconds, (engine, reloader, settings)),
            (None, reload_rules, settings.rules_reload_seconds, (engine, reloader, servers, in_force)),
            (None, heartbeat, health.HEARTBEAT_SECONDS, (engine, started_at)),
        )
        for _part, job, seconds, args in (job for job in jobs if job[0] is None or job[0] in parts):
            scheduler.add_job(job, "interval", seconds=seconds, args=args, id=job.__name__,
                              max_instances=1, coalesce=True)
        scheduler.start()
        wake.listen(settings.db_url, lambda payload: _run_now(scheduler, payload), stop, "daemon-wake")
        log.info("mailbot running role=%s %s", "+".join(sorted(parts)), _describe(settings, servers, imap_thread is not None,
                                                                       len(processes)))
        while not stop.wait(SUPERVISE_SECONDS):
            workers.restart_exited(settings, processes, reloader.rules)
        log.info("mailbot stopping")
    finally:
        # Intake first, so no new 250 is given while the worker finishes the mail in hand.
        stop.set()
        for server in servers:
            server.stop()
        if imap_thread is not None:
            imap_thread.join()
        workers.stop_all(processes)
        if scheduler.running:
            scheduler.shutdown(wait=True)
        _forget(engine)
    log.info("mailbot stopped")


# Which job a notification (wake.py) runs at once instead of at its next tick.
_WOKEN = {"outbox": "send_outbox", "status": "notify_changes", "rules": "reload_rules"}


def _run_now(scheduler: BackgroundScheduler, payload: str) -> None:
    job = _WOKEN.get(payload)
    if job is not None and scheduler.running and scheduler.get_job(job) is not None:
        scheduler.modify_job(job, next_run_time=datetime.now(timezone.utc))


def _forget(engine: Engine) -> None:
    """Remove this daemon's heartbeat; a database gone at the stop leaves it to go stale."""
    try:
        health.forget(engine)
    except SQLAlchemyError as error:
        log.warning("heartbeat not removed (it goes stale): %s", error.__class__.__name__)
