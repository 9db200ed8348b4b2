"""End to end: mails APPENDed into a private Dovecot -> a real `mailbot run` -> acks at an aiosmtpd relay.

    .venv/bin/python scripts/bench_e2e.py [--mails 2000] [--latency-mails 200] [--rate 10] [--workers 1]

(a) baseline, as in bench_intake.py: imapclient fetches the mails and the
    stdlib ``email`` parser parses each; no database, no replies.
(b) throughput: the same mails are in INBOX when `mailbot run` starts (SQLite,
    IMAP intake, relay = aiosmtpd sink); time from the daemon's start until the
    relay accepted one acknowledgement per mail.  Ratio (b)/(a), target >= 0.3.
(c) latency: with the daemon idle in IMAP IDLE, mails are APPENDed one by one
    at --rate per second; for each, APPEND -> relay accepted its ack
    (In-Reply-To).  p50/p95, target p95 < 2 s.
Every ack must arrive exactly once (one per Message-ID answered); each new
inquiry's queue_forward to the clerks goes through the same relay (not timed).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from bench_intake import baseline, make_mail, refill  # noqa: E402
from dovecot import Dovecot  # noqa: E402
from smtpsink import SmtpSink  # noqa: E402

RATIO_TARGET = 0.3
P95_TARGET = 2.0
MAILBOT = str(ROOT / ".venv" / "bin" / "mailbot")


def start_daemon(workdir: Path, env: dict[str, str]) -> subprocess.Popen:
    log = (workdir / "mailbot.log").open("ab")
    return subprocess.Popen([MAILBOT, "run"], env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)


def stop_daemon(daemon: subprocess.Popen) -> None:
    daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(timeout=60)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()


def acks(sink: SmtpSink) -> list:
    """Accepted acknowledgements (each inquiry's queue_forward to the clerks has no In-Reply-To)."""
    return [item for item in sink.accepted if item.in_reply_to]


def wait_for(sink: SmtpSink, count: int, daemon: subprocess.Popen, workdir: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(acks(sink)) < count and time.monotonic() < deadline and daemon.poll() is None:
        time.sleep(0.05)
    accepted = acks(sink)
    if len(accepted) < count:
        log = (workdir / "mailbot.log").read_text(errors="replace")[-3000:]
        alive = "running" if daemon.poll() is None else f"exited {daemon.returncode}"
        raise SystemExit(f"only {len(accepted)} of {count} acknowledgements reached the relay in {timeout:.0f} s "
                         f"(daemon {alive}; is the pipeline wired to inquiries.handle_understood and the outbox "
                         f"job scheduled?)\n{log}")


def check_once(sink: SmtpSink) -> int:
    """Acks per answered Message-ID; exits when one was answered twice."""
    answered: dict[str, int] = {}
    for item in acks(sink):
        parent = item.in_reply_to
        answered[parent] = answered.get(parent, 0) + 1
    twice = {parent: n for parent, n in answered.items() if n > 1}
    if twice:
        raise SystemExit(f"answered more than once: {sorted(twice.items())[:10]}")
    return len(answered)


def main() -> None:
    # SIGTERM runs the finally below too: no Dovecot or daemon is left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mails", type=int, default=2000)
    parser.add_argument("--latency-mails", type=int, default=200)
    parser.add_argument("--rate", type=float, default=10.0, help="mails per second in the latency run")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--worker-seconds", default="0.2")
    parser.add_argument("--outbox-seconds", default="0.2")
    parser.add_argument("--workers", default="1", help="MAILBOT_WORKERS for the daemon")
    args = parser.parse_args()

    rng = random.Random(1446)
    mails = [make_mail(index, rng) for index in range(args.mails)]
    print(f"mails: {len(mails)} ({sum(map(len, mails)) / 1024 / 1024:.1f} MB), batch {args.batch}, "
          f"{args.workers} worker process(es) every {args.worker_seconds} s, outbox every {args.outbox_seconds} s")
    server = Dovecot()
    sink = SmtpSink()
    workdir = Path(tempfile.mkdtemp(prefix="mailbot-bench-e2e-"))
    daemon = None
    try:
        server.start()
        sink.start()
        refill(server, mails)
        base_seconds = baseline(server, args.batch)
        base_rate = len(mails) / base_seconds
        print(f"(a) baseline imapclient fetch + stdlib email parse: {base_rate:8.1f} mails/s ({base_seconds:.2f} s)")

        refill(server, mails)
        env = {
            **os.environ, **server.env(), **sink.env(),
            "MAILBOT_DB": f"sqlite:///{workdir / 'bench.db'}",
            "MAILBOT_SMTP_LISTEN": "",
            "MAILBOT_IMAP_BATCH": str(args.batch),
            "MAILBOT_WORKER_SECONDS": args.worker_seconds,
            "MAILBOT_OUTBOX_SECONDS": args.outbox_seconds,
            "MAILBOT_WORKERS": args.workers,
            "MAILBOT_LOG_LEVEL": "WARNING",
        }
        started = time.perf_counter()
        daemon = start_daemon(workdir, env)
        wait_for(sink, len(mails), daemon, workdir, timeout=600)
        seconds = time.perf_counter() - started
        rate = len(mails) / seconds
        ratio = rate / base_rate
        assert check_once(sink) == len(mails)
        print(f"(b) mailbot run: APPENDed -> ack accepted by relay:  {rate:8.1f} mails/s ({seconds:.2f} s)")
        print(f"ratio (b)/(a): {ratio:.2f} (target >= {RATIO_TARGET}) {'OK' if ratio >= RATIO_TARGET else 'BELOW TARGET'}")

        time.sleep(2)  # the daemon is idle in IDLE now
        before = len(acks(sink))
        appended: dict[str, float] = {}
        late = [make_mail(100_000 + index, rng) for index in range(args.latency_mails)]
        with server.client() as client:
            paced_from = time.perf_counter()
            for index, raw in enumerate(late):
                delay = paced_from + index / args.rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                appended[f"<bench-{100_000 + index}@example.com>"] = time.time()
                client.append("INBOX", raw)
        wait_for(sink, before + args.latency_mails, daemon, workdir, timeout=120)
        assert check_once(sink) == len(mails) + args.latency_mails
        latencies = sorted(
            item.at - appended[item.in_reply_to]
            for item in acks(sink) if item.in_reply_to in appended
        )
        p50 = statistics.median(latencies)
        p95 = latencies[max(0, int(len(latencies) * 0.95) - 1)]
        print(f"(c) latency APPEND -> relay at {args.rate:g} mails/s with IDLE ({len(latencies)} mails): "
              f"p50 {p50:.2f} s, p95 {p95:.2f} s, max {latencies[-1]:.2f} s "
              f"(target p95 < {P95_TARGET} s) {'OK' if p95 < P95_TARGET else 'ABOVE TARGET'}")
    finally:
        if daemon is not None:
            stop_daemon(daemon)
        sink.stop()
        server.cleanup()
        for path in sorted(workdir.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        workdir.rmdir()


if __name__ == "__main__":
    main()
