"""VERP return paths: each outgoing mail's envelope sender names it, signed.

``bounces+<outbox id>-<mac>@<domain>``: a delivery report sent back to that
address names the outbox row it is about, and the mac (HMAC-SHA256 of the id,
first 16 hex digits) proves we made the address, so nobody can forge a bounce
for a mail of ours by guessing ids.  The key is ``MAILBOT_SECRET`` from the
environment, else a random key generated once and kept in the ``secret`` table
(every process of one office shares it through the database).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets

from sqlalchemy import select
from sqlalchemy.engine import Connection, Engine

from mailbot import db
from mailbot.models import Secret

LOCAL = "bounces"
_NAME = "verp"
_ADDRESS = re.compile(rf"^{LOCAL}\+(\d{{1,18}})-([0-9a-f]{{16}})@([^@\s]+)$", re.IGNORECASE)
_table = Secret.__table__
_keys: dict[str, bytes] = {}  # database URL -> key: read once per process


def secret_key(engine: Engine) -> bytes:
    """The signing key: ``MAILBOT_SECRET``, else the database's, created (and committed) on first use."""
    key = known_key(engine)
    if key is not None:
        return key
    with engine.begin() as connection:
        connection.execute(
            db.insert_ignoring_duplicates(connection, _table), {"name": _NAME, "value": secrets.token_hex(32)}
        )
    key = known_key(engine)
    assert key is not None
    return key


def known_key(bind: Engine | Connection) -> bytes | None:
    """The signing key if there is one yet, read only: before the first mail was sent there is
    none, and no address can be a return path of ours."""
    configured = os.environ.get("MAILBOT_SECRET")
    if configured:
        return configured.encode("utf-8")
    url = str(bind.engine.url)
    if url not in _keys:
        query = select(_table.c.value).where(_table.c.name == _NAME)
        if isinstance(bind, Connection):
            value = bind.execute(query).scalar_one_or_none()
        else:
            with bind.connect() as connection:
                value = connection.execute(query).scalar_one_or_none()
        if value is None:
            return None
        _keys[url] = value.encode("ascii")
    return _keys[url]


def _mac(outbox_id: int, key: bytes) -> str:
    return hmac.new(key, str(outbox_id).encode("ascii"), hashlib.sha256).hexdigest()[:16]


def return_path(outbox_id: int, domain: str, key: bytes) -> str:
    """The envelope sender for outbox row ``outbox_id``."""
    return f"{LOCAL}+{outbox_id}-{_mac(outbox_id, key)}@{domain}"


def is_return_path(address: str) -> bool:
    """True when ``address`` has the form of a return path (its mac not checked)."""
    return _ADDRESS.match(address.strip()) is not None


def outbox_id(address: str, key: bytes) -> int | None:
    """The outbox row a return path names, or None when it is not one of ours (bad form or mac)."""
    found = _ADDRESS.match(address.strip())
    if found is None:
        return None
    number = int(found.group(1))
    return number if hmac.compare_digest(found.group(2).lower(), _mac(number, key)) else None
