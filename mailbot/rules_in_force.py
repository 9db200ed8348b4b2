"""The rules a daemon has in force, kept in the database beside its last refused reload.

An admin's half-edited rules folder must not stop the clerks and the back-office:
commands that need rules take the files on disk when they load, else the copy the
daemon saved when it last loaded good ones (and say why the files were refused).

Several daemons share one copy: the last good edit saved by any of them is the office's
rules, and the others ``follow`` it (at their next reload tick; on PostgreSQL a saved
edit also notifies 'rules' so the daemons adopt it at once).  A daemon that starts saves
its own folder's rules, so keep the folders of all machines the same, or edit on one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select, text, update
from sqlalchemy.engine import Engine

from mailbot import db
from mailbot.models import RulesInForce
from mailbot.rules import Rules, RulesError, RulesReloader, load_rules

log = logging.getLogger(__name__)

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


def save(engine: Engine, folder: Path) -> str:
    """Keep the files of ``folder`` (just loaded and found good) as the rules in force; returns
    their fingerprint (give it to ``follow`` as the rules this daemon already has)."""
    files = _files(folder)
    values = {"files": json.dumps(files, ensure_ascii=False), "fingerprint": _fingerprint(files),
              "saved_at": db.utcnow(), "refused_at": None, "refused": None}
    with engine.begin() as connection:
        connection.execute(db.insert_ignoring_duplicates(engine, _TABLE).values(id=1, **values))
        connection.execute(update(_TABLE).where(_TABLE.c.id == 1).values(**values))
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_notify('mailbot', 'rules')"))  # sent at commit
    return str(values["fingerprint"])


def follow(engine: Engine, reloader: RulesReloader, have: str | None) -> str | None:
    """Adopt the rules in force another daemon saved, when they are not the ones this process
    has (fingerprint ``have``): ``reloader.rules`` is swapped.  Returns the fingerprint of the
    rules the process now has (``have`` when nothing changed or the saved rules do not load)."""
    with engine.connect() as connection:
        saved_print = connection.execute(select(_TABLE.c.fingerprint).where(_TABLE.c.id == 1)).scalar_one_or_none()
    if saved_print is None or saved_print == have:
        return have
    kept = saved(engine)
    if kept is None:
        return have
    try:
        reloader.rules = kept.rules()
    except RulesError as error:
        log.error("rules saved by another daemon do not load here, rules in force kept: %s", "; ".join(error.errors))
        return saved_print  # not again at every tick: only a newer save is tried
    if have is not None:  # None: a process's first look, taking the daemon's own rules
        log.info("rules in force: adopted the edit another daemon saved at %s", kept.saved_at.isoformat())
    return saved_print


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
