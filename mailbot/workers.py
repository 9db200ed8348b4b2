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

A worker dies with the daemon (Linux ``PR_SET_PDEATHSIG``): after a SIGKILL of
`mailbot run` no orphan keeps processing beside the restarted daemon's workers.
What it had in hand is rolled back and processed again after the restart.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.process import BaseProcess

from sqlalchemy.exc import SQLAlchemyError

from mailbot import db, pipeline
from mailbot.logs import setup_logging
from mailbot.rules import Rules, RulesReloader
from mailbot.settings import Settings

log = logging.getLogger(__name__)

# Mail per process_pending call: a worker checks for a stop between batches,
# so a shutdown waits for at most one batch, not for a whole backlog.
BATCH = 50
DATABASE_RETRY_MAX = 60.0
_PR_SET_PDEATHSIG = 1
# A fresh interpreter per worker: forking a process that already runs threads
# (SMTP ingress, IMAP, scheduler) can copy a lock held by one of them.
_context = multiprocessing.get_context("spawn")


def work_until_stopped(settings: Settings, share: tuple[int, int], stop: threading.Event,
                       rules: Rules | None = None) -> None:
    """Process pending mail (this worker's ``share``) until ``stop``; poll every worker_seconds when idle.

    While the database cannot be reached, wait and try again (doubling the wait up to
    DATABASE_RETRY_MAX): the mail is safe in the database, and one log line per try is enough.
    """
    engine = db.get_engine(settings.db_url)
    reloader = RulesReloader(settings.rules_dir, rules)
    next_reload = time.monotonic() + settings.rules_reload_seconds
    retry = settings.worker_seconds
    while not stop.is_set():
        if time.monotonic() >= next_reload:
            reloader.reload_if_changed()
            next_reload = time.monotonic() + settings.rules_reload_seconds
        try:
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
            stop.wait(settings.worker_seconds)


def _worker_main(settings: Settings, share: tuple[int, int], parent: int, rules: Rules) -> None:
    """A worker process's entry point (runs in a spawned interpreter)."""
    _die_with_parent(parent)
    setup_logging(settings.log_level)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log.info("worker %s of %s started pid=%s", share[0] + 1, share[1], os.getpid())
    try:
        work_until_stopped(settings, share, stop, rules)
    finally:
        db.dispose_engines()
    log.info("worker %s of %s stopped", share[0] + 1, share[1])


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the parent's clean stop still ends us
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def start(settings: Settings, index: int, rules: Rules) -> BaseProcess:
    """Worker ``index``, starting with ``rules``: the daemon's rules in force, not a fresh read of
    the files, which an admin may be editing right now."""
    process = _context.Process(
        target=_worker_main, args=(settings, (index, settings.workers), os.getpid(), rules),
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
