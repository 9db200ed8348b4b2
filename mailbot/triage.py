"""`mailbot triage`: what the service would do with mail files, without doing it.

Pure stages only (parse -> understand -> route/disclose); the one edge is a
read-only look at the transactions on file.  Nothing is written, no file is
created: a database that does not exist is an empty one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError

from mailbot.disclose import disclosed, reply_template
from mailbot.parse import ParseError, parse_mail
from mailbot.route import route
from mailbot.rules import Rules
from mailbot.transactions import KnownTransaction, known_transactions
from mailbot.understand import Understanding, understand

log = logging.getLogger(__name__)

Lookup = Callable[[Iterable[str]], Mapping[str, KnownTransaction]]


@dataclass(frozen=True)
class Triage:
    file: str
    understanding: Understanding | None
    department: str | None = None
    rule: str | None = None
    reply: str | None = None
    disclosed: tuple[str, ...] = ()
    route_evidence: str = ""
    error: str | None = None

    def as_json(self) -> dict:
        u = self.understanding
        if u is None:
            return {"file": self.file, "message_id": None, "kind": None, "language": None, "transactions": [],
                    "department": None, "rule": None, "reply": None, "disclosed": [], "error": self.error}
        return {
            "file": self.file,
            "message_id": u.mail.message_id,
            "kind": u.kind,
            "language": u.language,
            "transactions": list(u.numbers),
            "department": self.department,
            "rule": self.rule,
            "reply": self.reply,
            "disclosed": list(self.disclosed),
        }


def mail_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Each path, or each file under a directory (sorted, subfolders too); missing paths are yielded too."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def triage_file(path: Path, rules: Rules, lookup: Lookup) -> Triage:
    """The decision for one file: the single place where the stages are run for triage."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        return Triage(str(path), None, error=f"cannot read file: {error.strerror or error}")
    try:
        parsed = parse_mail(raw)
    except ParseError as error:
        return Triage(str(path), None, error=f"cannot parse: {error}")
    u = understand(parsed, rules)
    known = lookup(u.numbers)
    decision = route(u, rules, known)
    shown = disclosed(u, rules, known)
    return Triage(str(path), u, decision.department, decision.rule, reply_template(u, decision, shown),
                  tuple(shown), decision.evidence)


def triage_paths(paths: Iterable[Path], rules: Rules, lookup: Lookup) -> Iterator[Triage]:
    for path in mail_files(paths):
        yield triage_file(path, rules, lookup)


def _sqlite_read_only(path: Path) -> str:
    # mode=ro still creates the -wal/-shm files of a WAL database when no writer
    # has them open.  Without a -wal file nobody is writing (the last writer
    # checkpointed and removed it), so the file can be read as immutable, which
    # creates nothing.
    if Path(f"{path}-wal").exists():
        return "mode=ro"
    return "mode=ro&immutable=1"


def read_only_lookup(db_url: str) -> tuple[Lookup, Engine | None]:
    """Transactions on file, read without writing; an absent SQLite file is an empty database."""
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if not database or database == ":memory:" or not Path(database).is_file():
            return (lambda numbers: {}), None
        engine = create_engine(f"sqlite:///file:{Path(database).resolve()}?{_sqlite_read_only(Path(database))}&uri=true")
    else:
        engine = create_engine(url)

    def lookup(numbers: Iterable[str]) -> Mapping[str, KnownTransaction]:
        wanted = list(numbers)
        if not wanted:
            return {}
        try:
            return known_transactions(engine, wanted)
        except SQLAlchemyError as error:
            # A database without the transactions table yet knows no transaction.
            log.warning("transactions not readable, treating as none: %s", error.__class__.__name__)
            return {}

    return lookup, engine


def explain(t: Triage) -> str:
    """A readable account of one decision: why each number, why this kind, why this language."""
    if t.understanding is None:
        return f"{t.file}\n  error: {t.error}\n"
    u = t.understanding
    lines = [
        f"{t.file}",
        f"  message-id: {u.mail.message_id}",
        f"  kind:       {u.kind} — {u.kind_reason}",
        f"  language:   {u.language} — {u.language_reason}",
    ]
    if u.transactions:
        lines.append("  transactions:")
        for found in u.transactions:
            lines.append(f"    {found.number}  in {found.where}, pattern {found.pattern}, written {found.written!r}")
    else:
        lines.append("  transactions: none found")
    if u.bounce is not None:
        lines.append(f"  bounce:     failed {', '.join(u.bounce.recipients) or '?'}; "
                     f"original {u.bounce.original_message_id or '?'}; status {u.bounce.status or '?'}")
    lines.append(f"  department: {t.department} (rule {t.rule}){' — ' + t.route_evidence if t.route_evidence else ''}")
    lines.append(f"  reply:      {t.reply}; disclosed: {', '.join(t.disclosed) or 'nothing'}")
    return "\n".join(lines) + "\n"
