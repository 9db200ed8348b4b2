"""The rules a daemon has in force, kept in the database beside its last refused reload.

An admin's half-edited rules folder must not stop the clerks and the back-office:
commands that need rules take the files on disk when they load, else the copy the
daemon saved when it last loaded good ones (and say why the files were refused).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from mailbot import db
from mailbot.models import RulesInForce
from mailbot.rules import Rules, load_rules

_TABLE = RulesInForce.__table__


@dataclass(frozen=True)
class Kept:
    files: dict[str, str]  # file name -> its text, as the daemon loaded it
    saved_at: datetime
    refused_at: datetime | None
    refused: str | None  # why the daemon's last reload was refused, when it was

    def rules(self) -> Rules:
        """Load the kept files (they loaded when saved; a RulesError here means a newer mailbot's rules)."""
        with tempfile.TemporaryDirectory(prefix="mailbot-rules-") as folder:
            for name, text in self.files.items():
                (Path(folder) / Path(name).name).write_text(text, encoding="utf-8")
            return load_rules(folder)


def _files(folder: Path) -> dict[str, str]:
    return {path.name: path.read_text(encoding="utf-8") for path in sorted(folder.glob("*.yaml"))}


def _fingerprint(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def save(engine: Engine, folder: Path) -> None:
    """Keep the files of ``folder`` (just loaded and found good) as the rules in force."""
    files = _files(folder)
    values = {"files": json.dumps(files, ensure_ascii=False), "fingerprint": _fingerprint(files),
              "saved_at": db.utcnow(), "refused_at": None, "refused": None}
    with engine.begin() as connection:
        connection.execute(db.insert_ignoring_duplicates(engine, _TABLE).values(id=1, **values))
        connection.execute(update(_TABLE).where(_TABLE.c.id == 1).values(**values))


def record_refused(engine: Engine, errors: list[str]) -> None:
    """The files on disk were refused; the rules in force stay as saved."""
    with engine.begin() as connection:
        connection.execute(update(_TABLE).where(_TABLE.c.id == 1)
                           .values(refused_at=db.utcnow(), refused="; ".join(errors)))


def saved(engine: Engine) -> Kept | None:
    """The rules in force as the daemon saved them; None when no daemon has saved any."""
    with engine.connect() as connection:
        row = connection.execute(select(_TABLE).where(_TABLE.c.id == 1)).one_or_none()
    if row is None:
        return None
    return Kept(json.loads(row.files), row.saved_at, row.refused_at, row.refused)
