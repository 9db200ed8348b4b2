"""verp.py: signed return paths, and the key shared through the database."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import Engine

from mailbot import verp


def test_a_return_path_names_its_outbox_row_only_with_our_mac(engine: Engine) -> None:
    assert verp.known_key(engine) is None  # nothing sent yet: no address can be ours
    key = verp.secret_key(engine)
    address = verp.return_path(4711, "emirate.example", key)
    local, mac = address.partition("@")[0].rsplit("-", 1)

    assert local == "bounces+4711" and len(mac) == 16
    assert verp.known_key(engine) == key == verp.secret_key(engine)  # generated once, then kept
    assert verp.outbox_id(address, key) == 4711
    assert verp.outbox_id(address.upper(), key) == 4711  # servers may change the case
    assert verp.outbox_id(f"bounces+4712-{mac}@emirate.example", key) is None  # another id, same mac
    assert verp.outbox_id(address, b"another office's key") is None
    assert verp.outbox_id("bounces@emirate.example", key) is None


def test_mailbot_secret_from_the_environment_wins(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILBOT_SECRET", "s3cret")
    assert verp.secret_key(engine) == b"s3cret"
    address = verp.return_path(1, "emirate.example", b"s3cret")
    assert verp.outbox_id(address, verp.known_key(engine) or b"") == 1
