"""Worker processes: the pipeline runs beside intake and the outbox, not in their interpreter.

One Python process runs one thing at a time (the GIL): with intake, the
pipeline and the outbox sender in one process, each mail's parse and replies
waited for the next mail's fetch.  `mailbot run` therefore starts
``MAILBOT_WORKERS`` worker processes (one by default) and keeps intake, the
outbox and the scheduler in the main process.

Which worker takes which mail: on PostgreSQL each mail is claimed with an
advisory lock (pipeline._claim), so any number of workers, on any number of
machines, share the queue.  SQLite has no such lock: there worker ``k`` of
``n`` takes the mails whose id is ``k`` modulo ``n``, so no two workers ever
parse the same mail.

Workers are forked by a fork server (multiprocessing's "forkserver"): a process
`mailbot run` starts before its own imports, which imports the pipeline once
and forks each worker from itself.  A worker is then ready in milliseconds, not
after a fresh interpreter's 0.7 s of imports, and no worker is forked from the
daemon, whose threads (SMTP ingress, IMAP, scheduler) could leave a copied lock
held in the child.

A worker dies with the daemon, however the daemon ended (SIGKILL included): it
watches its parent sentinel, a pipe the daemon holds open, and kills itself at
EOF.  So no orphan keeps processing beside a restarted daemon's workers; what it
had in hand is rolled back and processed again after the restart.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import signal
import threading
import time
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

from mailbot.logs import setup_logging
from mailbot.settings import Settings

if TYPE_CHECKING:
    from mailbot.rules import Rules

log = logging.getLogger(__name__)

# Mail per process_pending call: a worker checks for a stop between batches,
# so a shutdown waits for at most one batch, not for a whole backlog.
BATCH = 50
DATABASE_RETRY_MAX = 60.0
IDLE_SLICE = 0.2
_context = multiprocessing.get_context("forkserver")
# What the fork server imports once, so that no worker imports it again.
_PRELOAD = ["mailbot.workers", "mailbot.pipeline"]


def start_fork_server() -> None:
    """Start the fork server now (idempotent).  `mailbot run` calls this before its own
    imports, so the fork server's imports run beside them, on the other core."""
    _context.set_forkserver_preload(_PRELOAD)
    multiprocessing.forkserver.ensure_running()


def work_until_stopped(settings: Settings, share: tuple[int, int], stop: threading.Event,
                       rules: Rules | None = None) -> None:
    """Process pending mail (this worker's ``share``) until ``stop``; when idle, wait for a stored
    mail's notification (PostgreSQL, wake.py) or worker_seconds, whichever comes first.

    While the database cannot be reached, wait and try again (doubling the wait up to
    DATABASE_RETRY_MAX): the mail is safe in the database, and one log line per try is enough.
    """
    # Imported here, not above: `mailbot run` imports this module to start the fork
    # server, before these heavy imports (which the fork server has done for its workers).
    from sqlalchemy.exc import SQLAlchemyError

    from mailbot import db, pipeline, rules_in_force, wake
    from mailbot.rules import RulesReloader

    engine = db.get_engine(settings.db_url)
    work = threading.Event()  # set by a stored mail's notification (PostgreSQL): no wait for the timer
    wake.listen(settings.db_url, lambda payload: work.set() if payload == "mail" else None, stop,
                f"worker-{share[0] + 1}-wake")
    reloader = RulesReloader(settings.rules_dir, rules)
    next_reload = time.monotonic() + settings.rules_reload_seconds
    retry = settings.worker_seconds
    in_force: str | None = None  # the saved rules' fingerprint once followed: the daemon's own at first
    while not stop.is_set():
        try:
            if time.monotonic() >= next_reload:
                next_reload = time.monotonic() + settings.rules_reload_seconds
                reloader.reload_if_changed()
                in_force = rules_in_force.follow(engine, reloader, in_force)
            done = pipeline.process_pending(engine, reloader.rules, limit=BATCH,
                                            templates_dir=settings.templates_dir, share=share)
        except SQLAlchemyError as error:
            log.error("worker %s of %s: database unavailable, trying again in %.1f s: %s: %s", share[0] + 1,
                      share[1], retry, error.__class__.__name__, str(error).splitlines()[0])
            stop.wait(retry)
            retry = min(retry * 2, DATABASE_RETRY_MAX)
            continue
        retry = settings.worker_seconds
        if done < BATCH:
            _idle(stop, work, settings.worker_seconds)


def _idle(stop: threading.Event, work: threading.Event, seconds: float) -> None:
    """Wait until ``work`` is notified, ``stop`` is asked or ``seconds`` pass (stop is looked at
    every IDLE_SLICE, so a long timer never delays a shutdown)."""
    deadline = time.monotonic() + seconds
    while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
        if work.wait(min(IDLE_SLICE, left)):
            break
    work.clear()


def _worker_main(settings: Settings, share: tuple[int, int], rules: Rules) -> None:
    """A worker process's entry point (runs in a process forked by the fork server)."""
    _die_with_daemon()
    setup_logging(settings.log_level, settings.log_format)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    # What the worker starts with (every imported module, the rules) lives as long as it
    # does: frozen, the garbage collector no longer walks those 100,000 objects each time.
    gc.freeze()
    log.info("worker %s of %s started pid=%s", share[0] + 1, share[1], os.getpid())
    try:
        work_until_stopped(settings, share, stop, rules)
    finally:
        from mailbot import db

        db.dispose_engines()
    log.info("worker %s of %s stopped", share[0] + 1, share[1])


def _die_with_daemon() -> None:
    """SIGKILL this worker as soon as the daemon that started it is gone.

    The parent sentinel is the read end of a pipe whose write end only the daemon holds,
    so it reads EOF when the daemon's process ends, by a clean exit or a SIGKILL, and at
    once when that happened before this call.
    """
    sentinel = multiprocessing.parent_process().sentinel

    def watch() -> None:
        multiprocessing.connection.wait([sentinel])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="daemon-watch", daemon=True).start()


def start(settings: Settings, index: int, rules: Rules) -> BaseProcess:
    """Worker ``index``, starting with ``rules``: the daemon's rules in force, not a fresh read of
    the files, which an admin may be editing right now."""
    start_fork_server()
    process = _context.Process(
        target=_worker_main, args=(settings, (index, settings.workers), rules),
        name=f"mailbot-worker-{index + 1}",
    )
    process.start()
    return process


def start_all(settings: Settings, rules: Rules) -> list[BaseProcess]:
    return [start(settings, index, rules) for index in range(settings.workers)]


def restart_exited(settings: Settings, processes: list[BaseProcess], rules: Rules) -> None:
    """Start again every worker that died (the daemon supervises; an operator is not woken for it).

    Call from the thread that started them: a worker dies with that thread.
    """
    for index, process in enumerate(processes):
        if not process.is_alive():
            log.error("worker %s of %s exited with %s; starting it again", index + 1, len(processes),
                      process.exitcode)
            processes[index] = start(settings, index, rules)


def stop_all(processes: list[BaseProcess], timeout: float = 60.0) -> None:
    """SIGTERM each worker, wait for the batch in hand to finish; SIGKILL what does not stop in time."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            log.error("%s did not stop in %.0f s; killed (its mail is processed again at the next start)",
                      process.name, timeout)
            process.kill()
            process.join()
