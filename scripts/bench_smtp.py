"""SMTP ingress throughput against its baseline, both measured in this run.

Baseline: the same mails written with store.store_raw from the same number of
threads, no network.  The ratio (ingress / baseline) says what aiosmtpd, the
event loop and the thread hand-off cost on top of the database commit.

    .venv/bin/python scripts/bench_smtp.py [--mails 2000] [--clients 20] [--db URL]
"""

from __future__ import annotations

import argparse
import smtplib
import tempfile
import threading
import time
from email.message import EmailMessage
from pathlib import Path

from mailbot import db, store
from mailbot.intake.smtp import IngressServer
from mailbot.rules import load_rules
from mailbot.settings import SHIPPED_RULES

OFFICE = "inquiries@emirate.example"


def mail(tag: str, number: int) -> bytes:
    message = EmailMessage()
    message["From"] = f"citizen{number}@example.com"
    message["To"] = OFFICE
    message["Subject"] = f"استفسار عن المعاملة رقم 1446/{number:05d}"
    message["Message-ID"] = f"<{tag}-{number}@example.com>"
    message.set_content(f"السلام عليكم، أرغب في معرفة حالة معاملتي رقم 1446/{number:05d}.\n" * 5)
    return message.as_bytes().replace(b"\n", b"\r\n")


def in_threads(clients: int, work) -> float:  # noqa: ANN001 - callable(index)
    threads = [threading.Thread(target=work, args=(index,)) for index in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mails", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--db", help="database URL (default: SQLite in a temporary folder)")
    args = parser.parse_args()
    url = args.db or f"sqlite:///{Path(tempfile.mkdtemp(prefix='mailbot-bench-')) / 'bench.db'}"
    db.upgrade(url)
    engine = db.get_engine(url)
    per_client = args.mails // args.clients
    total = per_client * args.clients

    baseline_mails = [[mail(f"base{i}", n) for n in range(per_client)] for i in range(args.clients)]
    baseline = in_threads(args.clients, lambda i: [store.store_raw(engine, raw, origin="cli") for raw in baseline_mails[i]])

    ingress_mails = [[mail(f"smtp{i}", n) for n in range(per_client)] for i in range(args.clients)]
    server = IngressServer(engine, load_rules(SHIPPED_RULES), ("127.0.0.1", 0), lmtp=False,
                           max_message_bytes=40 * 1024 * 1024)
    server.start()

    def send(index: int) -> None:
        with smtplib.SMTP(*server.address, timeout=60) as client:
            for raw in ingress_mails[index]:
                if client.sendmail("citizen@example.com", [OFFICE], raw):
                    raise RuntimeError("refused")

    try:
        ingress = in_threads(args.clients, send)
    finally:
        server.stop()
    stored = store.count_by_state(engine)["received"]
    if stored != 2 * total:
        raise SystemExit(f"expected {2 * total} stored mails, found {stored}")

    print(f"database            {engine.dialect.name}")
    print(f"mails x clients     {per_client} x {args.clients} = {total}")
    print(f"baseline store_raw  {total / baseline:8.1f} mails/s ({baseline:.2f} s)")
    print(f"smtp ingress        {total / ingress:8.1f} mails/s ({ingress:.2f} s)")
    print(f"ratio ingress/base  {baseline / ingress:8.2f}")


if __name__ == "__main__":
    main()
