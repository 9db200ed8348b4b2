"""Database tables (SQLModel).  Tables only: behaviour lives in the stages.

Times are timezone-aware UTC (``db.utcnow()``); SQLModel stores them as UTC on
SQLite and PostgreSQL alike and refuses naive ones.
Every schema change here needs a migration in ``db/versions``; a test compares
the two.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, LargeBinary, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

# Processing states of an archived message.
RECEIVED = "received"
PROCESSED = "processed"
QUARANTINED = "quarantined"
MESSAGE_STATES = (RECEIVED, PROCESSED, QUARANTINED)


class Message(SQLModel, table=True):
    """One archived mail: the raw bytes exactly as they arrived, stored once."""

    __tablename__ = "message"

    id: int | None = Field(default=None, primary_key=True)
    sha256: str = Field(max_length=64, unique=True)
    message_id: str | None = Field(default=None, max_length=998, index=True)
    raw: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    size: int
    origin: str = Field(max_length=16)  # imap | smtp | lmtp | cli
    # UIDVALIDITY and UID are unsigned 32-bit: too large for a signed INTEGER.
    imap_uidvalidity: int | None = Field(default=None, sa_type=BigInteger)
    imap_uid: int | None = Field(default=None, sa_type=BigInteger)
    peer: str | None = Field(default=None, max_length=255)  # SMTP/LMTP client address
    received_at: datetime = Field(index=True)
    state: str = Field(default=RECEIVED, max_length=16, index=True)
    reason: str | None = Field(default=None, sa_column=Column(Text))
    processed_at: datetime | None = None
    attempts: int = 0
    # Filled by the pipeline once parsed; for people and `mailbot status`.
    subject: str | None = Field(default=None, sa_column=Column(Text))
    sender: str | None = Field(default=None, max_length=998)
    sent_date: datetime | None = None
    kind: str | None = Field(default=None, max_length=16)
    language: str | None = Field(default=None, max_length=2)


class ImapSeen(SQLModel, table=True):
    """A mailbox UID already archived, so a restart never fetches it twice."""

    __tablename__ = "imap_seen"
    __table_args__ = (UniqueConstraint("mailbox", "uidvalidity", "uid"),)

    id: int | None = Field(default=None, primary_key=True)
    mailbox: str = Field(max_length=255)
    uidvalidity: int = Field(sa_type=BigInteger)
    uid: int = Field(sa_type=BigInteger)
    message: int = Field(foreign_key="message.id", index=True)
    moved: bool = False


class IntakeState(SQLModel, table=True):
    """Health of each intake and job, for `mailbot status`."""

    __tablename__ = "intake_state"

    name: str = Field(primary_key=True, max_length=64)
    last_ok_at: datetime | None = None
    last_error_at: datetime | None = None
    last_error: str | None = Field(default=None, sa_column=Column(Text))
