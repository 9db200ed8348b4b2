"""The daemon's wiring: intake servers and threads, the scheduler and its jobs, a clean stop."""

from __future__ import annotations

import logging
import signal
import threading
from datetime import timezone
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.engine import Engine, make_url

from mailbot import db, notify, outbox, pipeline
from mailbot.intake.smtp import IngressServer, accepted_addresses
from mailbot.rules import Rules, RulesReloader
from mailbot.settings import Settings

log = logging.getLogger(__name__)

# Mail per process_pending call: the worker checks for a stop between batches,
# so a shutdown waits for at most one batch, not for a whole backlog.
WORKER_BATCH = 50


def work(engine: Engine, reloader: RulesReloader, stop: threading.Event, templates_dir: Path) -> None:
    """The worker job: process pending mail in batches until none is left or a stop is asked."""
    while not stop.is_set() and pipeline.process_pending(
        engine, reloader.rules, limit=WORKER_BATCH, templates_dir=templates_dir
    ) == WORKER_BATCH:
        pass


def send_outbox(engine: Engine, settings: Settings, stop: threading.Event) -> None:
    """The outbox job: send what is due, batch after batch, until none is left or a stop is asked."""
    while not stop.is_set() and outbox.send_due(engine, settings, limit=WORKER_BATCH) == WORKER_BATCH:
        pass


def reload_rules(reloader: RulesReloader, servers: list[IngressServer]) -> None:
    """Swap in edited rules (a bad edit is refused inside the reloader, the rules in force stay)."""
    before = reloader.rules
    if reloader.reload_if_changed() is not before:
        for server in servers:
            server.handler.accepted = accepted_addresses(reloader.rules)


def notify_changes(engine: Engine, reloader: RulesReloader, settings: Settings) -> None:
    notify.notify_status_changes(engine, reloader.rules, settings)


def escalate(engine: Engine, reloader: RulesReloader, settings: Settings) -> None:
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


def _describe(settings: Settings, servers: list[IngressServer], imap: bool) -> str:
    bound = {server.origin: "%s:%s" % server.address for server in servers}
    listening = f"smtp={bound.get('smtp', 'off')} lmtp={bound.get('lmtp', 'off')}"
    imap_part = f"imap={settings.imap_user}@{settings.imap_host}:{settings.imap_port}/{settings.imap_folder}" if imap else "imap=off"
    database = make_url(db.normalise_url(settings.db_url)).render_as_string(hide_password=True)
    return f"{listening} {imap_part} worker_seconds={settings.worker_seconds} db={database}"


def run_daemon(settings: Settings, stop: threading.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stop`` is set), then stop intake first and let the worker finish."""
    stop = stop or threading.Event()
    db.upgrade(settings.db_url)
    engine = db.get_engine(settings.db_url)
    reloader = RulesReloader(settings.rules_dir)
    rules = reloader.rules
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())

    servers = start_ingress(settings, engine, rules)
    imap_thread: threading.Thread | None = None
    scheduler = BackgroundScheduler(timezone=timezone.utc)
    try:
        if settings.imap_host:
            imap_thread = start_imap(settings, engine, stop)
        jobs = (
            (work, settings.worker_seconds, (engine, reloader, stop, settings.templates_dir)),
            (send_outbox, settings.outbox_seconds, (engine, settings, stop)),
            (notify_changes, settings.notify_seconds, (engine, reloader, settings)),
            (escalate, settings.notify_seconds, (engine, reloader, settings)),
            (reload_rules, settings.rules_reload_seconds, (reloader, servers)),
        )
        for job, seconds, args in jobs:
            scheduler.add_job(job, "interval", seconds=seconds, args=args, id=job.__name__,
                              max_instances=1, coalesce=True)
        scheduler.start()
        log.info("mailbot running %s", _describe(settings, servers, imap_thread is not None))
        stop.wait()
        log.info("mailbot stopping")
    finally:
        # Intake first, so no new 250 is given while the worker finishes the mail in hand.
        stop.set()
        for server in servers:
            server.stop()
        if imap_thread is not None:
            imap_thread.join()
        if scheduler.running:
            scheduler.shutdown(wait=True)
    log.info("mailbot stopped")
