"""Benchmark: 10,000 subscribed transactions change status in ONE CSV import; how fast are all told?

Measured in the same run:
  baseline  composing the same 10,000 status_changed mails to bytes in a plain loop (no database)
  notify    ``notify.notify_status_changes``: find the changes, compose, queue in the outbox,
            record each subscriber as told
Target: notify throughput >= 0.5 x baseline throughput.

    .venv/bin/python scripts/bench_notify.py [--count 10000] [--db URL]

Without --db a fresh SQLite file in a temporary folder is used.  With --db the
URL must name an EMPTY database (tables are created; nothing is dropped).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, insert, select

from mailbot import db, notify, transactions
from mailbot.models import Inquiry, Message, MessageRaw, Outbox, Subscription
from mailbot.rules import load_rules
from mailbot.settings import SHIPPED_RULES, Settings


def write_csv(path: Path, count: int, status: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(transactions.COLUMNS)
        for i in range(count):
            writer.writerow([f"1446/{100000 + i}", "prisons", status, f"citizen{i}@sahab.example",
                             f"مواطن رقم {i}", "2025-01-25T09:00:00+03:00"])


def subscribe_everyone(engine, count: int) -> None:  # noqa: ANN001
    """One inquiry per citizen (with its archived mail) and one subscription, written in bulk."""
    now = db.utcnow()
    with engine.begin() as connection:
        connection.execute(insert(Message.__table__), [
            {"sha256": f"{i:064x}", "message_id": f"<c{i}@sahab.example>", "size": 1,
             "origin": "smtp", "received_at": now, "state": "processed", "attempts": 0} for i in range(count)])
        ids = connection.execute(select(Message.__table__.c.id).order_by(Message.__table__.c.id)).scalars().all()
        connection.execute(insert(MessageRaw.__table__), [{"message": id_, "raw": b"x"} for id_ in ids])
        connection.execute(insert(Inquiry.__table__), [
            {"message": ids[i], "department": "prisons", "rule": "known-transaction",
             "language": "ar" if i % 3 else "en", "state": "open", "sender": f"citizen{i}@sahab.example",
             "sender_name": f"مواطن رقم {i}", "subject": "استفسار", "transactions": f"1446/{100000 + i}",
             "priority": "normal", "created_at": now, "due_at": now + timedelta(hours=24), "escalation_level": 0}
            for i in range(count)])
        inquiries = connection.execute(select(Inquiry.__table__.c.id).order_by(Inquiry.__table__.c.id)).scalars().all()
        connection.execute(insert(Subscription.__table__), [
            {"number": f"1446/{100000 + i}", "email": f"citizen{i}@sahab.example", "language": "ar" if i % 3 else "en",
             "inquiry": inquiries[i], "active": True, "last_status": "received", "changes_told": 0,
             "created_at": now} for i in range(count)])


def baseline(engine, rules, settings: Settings) -> tuple[float, int]:  # noqa: ANN001
    """The same mails composed and turned into bytes in a plain loop, rows read beforehand."""
    rows = notify._changed(engine, 0, 10**9)  # noqa: SLF001 - the exact rows the job will see
    now = db.utcnow()
    started = time.perf_counter()
    for row in rows:
        # An OutgoingMail is made with its bytes (raw): composing it is composing and encoding.
        notify._status_mail(row, rules, settings.templates_dir, now)  # noqa: SLF001
    return time.perf_counter() - started, len(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--db", default=None, help="SQLAlchemy URL of an empty database (default: temp SQLite)")
    args = parser.parse_args()
    rules = load_rules(SHIPPED_RULES)
    settings = Settings()
    with tempfile.TemporaryDirectory() as folder:
        url = args.db or f"sqlite:///{folder}/bench.db"
        db.upgrade(url)
        engine = db.get_engine(url)
        write_csv(Path(folder) / "before.csv", args.count, "received")
        write_csv(Path(folder) / "after.csv", args.count, "completed")
        transactions.import_csv(engine, Path(folder) / "before.csv", rules)
        subscribe_everyone(engine, args.count)

        started = time.perf_counter()
        report = transactions.import_csv(engine, Path(folder) / "after.csv", rules)
        imported = time.perf_counter() - started
        base_seconds, base_count = baseline(engine, rules, settings)

        started = time.perf_counter()
        queued = notify.notify_status_changes(engine, rules, settings)
        seconds = time.perf_counter() - started
        with engine.connect() as connection:
            in_outbox = connection.execute(
                select(func.count()).select_from(Outbox.__table__).where(Outbox.template == "status_changed")
            ).scalar_one()
        again = notify.notify_status_changes(engine, rules, settings)
        db.dispose_engines()

    print(f"database          {engine.dialect.name}")
    print(f"csv import        {report.status_changes} status changes in {imported:.2f} s")
    print(f"baseline          {base_count} mails composed in {base_seconds:.2f} s = {base_count / base_seconds:.0f} mails/s")
    print(f"notify job        {queued} notifications queued in {seconds:.2f} s = {queued / seconds:.0f} notifications/s")
    print(f"outbox            {in_outbox} status_changed rows; a second run queued {again}")
    ratio = (queued / seconds) / (base_count / base_seconds)
    print(f"ratio             {ratio:.2f} x baseline (target >= 0.50)")
    ok = queued == in_outbox == args.count and again == 0 and ratio >= 0.5
    print("result            " + ("OK" if ok else "BELOW TARGET OR INCOMPLETE"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
