"""The back-office side of transactions: CSV import, status changes, lookups.

Import is all-or-nothing by default: a back-office export with one bad line is
more likely a wrong file than one bad record, so nothing changes until every
line is right (``skip_bad`` imports the good lines anyway).  Rows are written
with bulk statements so that 100,000 lines take seconds, not minutes.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from zoneinfo import ZoneInfo
from pathlib import Path
from typing import Callable, Iterable, Iterator

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection, Engine

from mailbot.db import utcnow
from mailbot.models import Transaction, TransactionHistory
from mailbot.rules import Rules
from mailbot.text import normalize_digits

COLUMNS = ("number", "department", "status", "applicant_email", "applicant_name", "updated_at")
_CHUNK = 1000  # rows per IN (...) lookup: under SQLite's and psycopg's parameter limits
_NUMBER = re.compile(r"^\s*(\d{4})\s*[/\-\\_.–—،]\s*(\d+)\s*$")
_EMAIL = re.compile(r"^[^@\s,;<>]+@[^@\s,;<>]+\.[^@\s,;<>]+$")
_TRANSACTION = Transaction.__table__
_HISTORY = TransactionHistory.__table__
_KNOWN = select(_TRANSACTION).where(_TRANSACTION.c.number.in_(bindparam("numbers", expanding=True)))


class TransactionError(ValueError):
    """A transaction command cannot be carried out; nothing was changed."""


@dataclass(frozen=True)
class KnownTransaction:
    """What the database holds about a number, as routing, disclosure and the replies need it."""

    number: str
    department: str
    status: str
    applicant_emails: tuple[str, ...]
    updated_at: datetime | None = None


@dataclass(frozen=True)
class Row:
    line: int
    number: str
    department: str
    status: str
    applicant_emails: str
    applicant_name: str | None
    updated_at: datetime


@dataclass
class ImportReport:
    rows: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    status_changes: int = 0
    errors: list[str] = field(default_factory=list)
    applied: bool = False
    encoding: str = "UTF-8"

    @property
    def bad_lines(self) -> int:
        """Lines with at least one error (errors read "line N: ...")."""
        return len({error.split(":", 1)[0] for error in self.errors})


def canonical_number(text: str, rules: Rules) -> str | None:
    """``YYYY/SERIAL`` when ``text`` is one transaction number within the rules' ranges."""
    found = _NUMBER.match(normalize_digits(text))
    if found is None:
        return None
    year, serial = found.groups()
    limits = rules.transactions
    if not limits.year.min <= int(year) <= limits.year.max:
        return None
    if not limits.serial_digits.min <= len(serial) <= limits.serial_digits.max:
        return None
    return f"{year}/{serial}"


def _parse_row(line: int, values: list[str], rules: Rules) -> Row | list[str]:
    """A Row, or every reason the line is wrong (an export with three mistakes on a line
    should need one round of corrections, not three)."""
    if len(values) != len(COLUMNS):
        return [f"line {line}: expected {len(COLUMNS)} columns ({','.join(COLUMNS)}), got {len(values)}"]
    number_text, department, status, emails, name, updated = (value.strip() for value in values)
    errors = []
    number = canonical_number(number_text, rules)
    if number is None:
        errors.append(f"line {line}: bad transaction number {number_text!r} (expected YYYY/SERIAL, e.g. 1446/00321)")
    if department not in rules.department_ids():
        errors.append(f"line {line}: unknown department {department!r} (expected {', '.join(rules.department_ids())})")
    if status not in rules.status_ids():
        errors.append(f"line {line}: unknown status {status!r} (expected {', '.join(rules.status_ids())})")
    addresses = [address.lower() for address in re.split(r"[\s;,]+", emails) if address]
    errors += [f"line {line}: bad email {address!r}" for address in addresses if not _EMAIL.match(address)]
    try:
        when = datetime.fromisoformat(updated)
    except ValueError:
        errors.append(f"line {line}: bad date {updated!r} (expected ISO 8601, e.g. 2025-01-30T10:00:00+03:00)")
    if errors or number is None:
        return errors
    # A date without an offset is on the office's clock (a back-office export's), not the server's.
    when = when.replace(tzinfo=ZoneInfo(rules.office.timezone)) if when.tzinfo is None else when
    when = when.astimezone(timezone.utc)
    return Row(line, number, department, status, " ".join(dict.fromkeys(addresses)), name or None, when)


def decode_csv(data: bytes) -> tuple[str, str]:
    """(text, encoding name) of a back-office export: UTF-8 with or without a BOM, else
    Windows-1256, which is what Excel saves Arabic sheets as ("CSV" rather than "CSV UTF-8")."""
    if data.startswith(codecs.BOM_UTF8):
        return data[len(codecs.BOM_UTF8):].decode("utf-8", "replace"), "UTF-8 (with BOM)"
    try:
        return data.decode("utf-8"), "UTF-8"
    except UnicodeDecodeError:
        return data.decode("cp1256", "replace"), "Windows-1256"


def _header(first_line: str) -> tuple[str | None, str | None]:
    """(delimiter, error) read from the header line: ',' or ';' (Excel's list separator in
    many locales) when the header names COLUMNS with it."""
    for delimiter in (",", ";"):
        names = [name.strip().strip('"').lower() for name in first_line.split(delimiter)]
        if names == list(COLUMNS):
            return delimiter, None
    hint = ""
    if first_line.count("\t") >= len(COLUMNS) - 1:
        hint = " (the file is tab-separated: save it as CSV with ',' or ';')"
    return None, f"line 1: expected the header {','.join(COLUMNS)}, got {first_line.strip()!r}{hint}"


def read_csv(path: Path, rules: Rules, progress: Callable[[int], None] | None = None,
             ) -> tuple[list[Row], list[str], str]:
    """Every good row, every error (with its line number) and the encoding of a back-office CSV."""
    rows: list[Row] = []
    errors: list[str] = []
    first_line: dict[str, int] = {}
    text, encoding = decode_csv(path.read_bytes())
    delimiter, error = _header(text.split("\n", 1)[0].rstrip("\r"))
    if delimiter is None:
        return [], [error or "line 1: no header"], encoding
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    next(reader)
    for values in reader:
        if progress is not None:
            progress(1)
        if not any(value.strip() for value in values):
            continue
        parsed = _parse_row(reader.line_num, values, rules)
        if isinstance(parsed, list):
            errors += parsed
        elif parsed.number in first_line:
            errors.append(f"line {parsed.line}: transaction {parsed.number} already on line {first_line[parsed.number]}")
        else:
            first_line[parsed.number] = parsed.line
            rows.append(parsed)
    return rows, errors, encoding


def _chunks(items: list, size: int = _CHUNK) -> Iterator[list]:  # noqa: ANN001 - any list
    for start in range(0, len(items), size):
        yield items[start:start + size]


def import_rows(engine: Engine, rows: list[Row], report: ImportReport) -> None:
    """Upsert ``rows`` in one database transaction; a status change gets a history entry."""
    now = utcnow()
    with engine.begin() as connection:
        existing = {}
        for chunk in _chunks([row.number for row in rows]):
            query = select(_TRANSACTION).where(_TRANSACTION.c.number.in_(chunk))
            existing.update({record.number: record for record in connection.execute(query)})
        new, changed, history = [], [], []
        for row in rows:
            values = {"number": row.number, "department": row.department, "status": row.status,
                      "applicant_emails": row.applicant_emails, "applicant_name": row.applicant_name,
                      "updated_at": row.updated_at}
            old = existing.get(row.number)
            if old is None:
                new.append({**values, "created_at": now})
                history.append({"number": row.number, "status": row.status, "previous_status": None,
                                "changed_at": row.updated_at, "source": "csv", "note": None})
                continue
            if (old.department, old.status, old.applicant_emails, old.applicant_name) == (
                    row.department, row.status, row.applicant_emails, row.applicant_name):
                report.unchanged += 1
                continue
            changed.append({f"b_{key}": value for key, value in values.items()})
            if old.status != row.status:
                history.append({"number": row.number, "status": row.status, "previous_status": old.status,
                                "changed_at": row.updated_at, "source": "csv", "note": None})
                report.status_changes += 1
        _write(connection, new, changed, history)
        report.created, report.updated = len(new), len(changed)
    report.applied = True


def _write(connection: Connection, new: list[dict], changed: list[dict], history: list[dict]) -> None:
    for chunk in _chunks(new, 5000):
        connection.execute(insert(_TRANSACTION), chunk)
    statement = (
        update(_TRANSACTION)
        .where(_TRANSACTION.c.number == bindparam("b_number"))
        .values({name: bindparam(f"b_{name}") for name in
                 ("department", "status", "applicant_emails", "applicant_name", "updated_at")})
    )
    for chunk in _chunks(changed, 5000):
        connection.execute(statement, chunk)
    for chunk in _chunks(history, 5000):
        connection.execute(insert(_HISTORY), chunk)


def import_csv(engine: Engine, path: Path, rules: Rules, skip_bad: bool = False,
               progress: Callable[[int], None] | None = None) -> ImportReport:
    """Read and import a back-office CSV; with errors and not ``skip_bad``, nothing is changed."""
    rows, errors, encoding = read_csv(path, rules, progress)
    report = ImportReport(errors=errors, encoding=encoding)
    report.rows = len(rows) + report.bad_lines
    if errors and not skip_bad:
        return report
    import_rows(engine, rows, report)
    return report


def set_status(engine: Engine, number: str, status: str, rules: Rules, note: str | None = None,
               source: str = "cli") -> str:
    """Change a transaction's status and record it; returns the previous status."""
    canonical = canonical_number(number, rules)
    if status not in rules.status_ids():
        raise TransactionError(f"unknown status {status!r} (expected {', '.join(rules.status_ids())})")
    if canonical is None:
        raise TransactionError(f"bad transaction number {number!r} (expected YYYY/SERIAL, e.g. 1446/00321)")
    now = utcnow()
    with engine.begin() as connection:
        previous = connection.execute(
            select(_TRANSACTION.c.status).where(_TRANSACTION.c.number == canonical)).scalar_one_or_none()
        if previous is None:
            raise TransactionError(f"no transaction {canonical} on file")
        connection.execute(update(_TRANSACTION).where(_TRANSACTION.c.number == canonical)
                           .values(status=status, updated_at=now))
        connection.execute(insert(_HISTORY).values(number=canonical, status=status, previous_status=previous,
                                                   changed_at=now, source=source, note=note))
    return previous


def show(engine: Engine, number: str, rules: Rules) -> tuple[Transaction, list[TransactionHistory]]:
    """The record and its history, oldest first."""
    canonical = canonical_number(number, rules)
    if canonical is None:
        raise TransactionError(f"bad transaction number {number!r} (expected YYYY/SERIAL, e.g. 1446/00321)")
    with engine.connect() as connection:
        record = connection.execute(select(_TRANSACTION).where(_TRANSACTION.c.number == canonical)).first()
        if record is None:
            raise TransactionError(f"no transaction {canonical} on file")
        history = connection.execute(select(_HISTORY).where(_HISTORY.c.number == canonical)
                                     .order_by(_HISTORY.c.changed_at, _HISTORY.c.id)).all()
    return Transaction(**record._mapping), [TransactionHistory(**entry._mapping) for entry in history]


def known_transactions(bind: Engine | Connection, numbers: Iterable[str]) -> dict[str, KnownTransaction]:
    """What the database holds about ``numbers`` (canonical), for route and disclose.

    ``bind``: an engine, or the pipeline's connection (no second connection per mail)."""
    if isinstance(bind, Engine):
        with bind.connect() as connection:
            return known_transactions(connection, numbers)
    wanted = list(dict.fromkeys(numbers))
    known: dict[str, KnownTransaction] = {}
    for chunk in _chunks(wanted):
        for record in bind.execute(_KNOWN, {"numbers": chunk}):
            known[record.number] = KnownTransaction(record.number, record.department, record.status,
                                                    tuple(record.applicant_emails.lower().split()),
                                                    record.updated_at)
    return known
