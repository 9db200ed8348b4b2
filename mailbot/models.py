"""Database tables (SQLModel).  Tables only: behaviour lives in the stages.

Times are timezone-aware UTC (``db.utcnow()``); SQLModel stores them as UTC on
SQLite and PostgreSQL alike and refuses naive ones.
Every schema change here needs a migration in ``db/versions``; a test compares
the two.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, Index, LargeBinary, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

# Processing states of an archived message.
RECEIVED = "received"
PROCESSED = "processed"
QUARANTINED = "quarantined"
MESSAGE_STATES = (RECEIVED, PROCESSED, QUARANTINED)


class Message(SQLModel, table=True):
    """One archived mail, stored once; its bytes are in MessageRaw."""

    __tablename__ = "message"

    id: int | None = Field(default=None, primary_key=True)
    sha256: str = Field(max_length=64, unique=True)
    message_id: str | None = Field(default=None, max_length=998, index=True)
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


class MessageRaw(SQLModel, table=True):
    """A mail's bytes exactly as they arrived, written with its Message row.

    A table of their own because SQLite rewrites a whole row on any UPDATE:
    with the bytes on the message row, marking a 25 MB mail processed held
    two more copies of it in memory.
    """

    __tablename__ = "message_raw"

    message: int = Field(foreign_key="message.id", primary_key=True)
    raw: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


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


class Daemon(SQLModel, table=True):
    """A running `mailbot run`: its heartbeat tells `mailbot status` whether anyone serves this database."""

    __tablename__ = "daemon"

    id: str = Field(primary_key=True, max_length=255)  # host:pid
    version: str = Field(max_length=64)
    started_at: datetime
    heartbeat_at: datetime


class RulesInForce(SQLModel, table=True):
    """The rules a daemon last loaded (the YAML files as they were), and its last refused reload:
    commands use these while the files on disk are mid-edit and broken."""

    __tablename__ = "rules_in_force"

    id: int = Field(default=1, primary_key=True)  # one row
    files: str = Field(sa_column=Column(Text, nullable=False))  # JSON {file name: text}
    fingerprint: str = Field(max_length=64)
    saved_at: datetime
    refused_at: datetime | None = None
    refused: str | None = Field(default=None, sa_column=Column(Text))


class Transaction(SQLModel, table=True):
    """A back-office record: who applied, which department, where it stands."""

    __tablename__ = "transaction"

    number: str = Field(primary_key=True, max_length=32)  # canonical YYYY/SERIAL
    department: str = Field(max_length=64)
    status: str = Field(max_length=64)
    applicant_name: str | None = Field(default=None, max_length=255)
    # Lower-cased addresses separated by single spaces (one record, several applicants' mails).
    applicant_emails: str = Field(default="", sa_column=Column(Text, nullable=False, server_default=""))
    updated_at: datetime
    created_at: datetime


class TransactionHistory(SQLModel, table=True):
    """Every status a transaction has had, and who or what set it."""

    __tablename__ = "transaction_history"

    id: int | None = Field(default=None, primary_key=True)
    number: str = Field(foreign_key="transaction.number", index=True, max_length=32)
    status: str = Field(max_length=64)
    previous_status: str | None = Field(default=None, max_length=64)
    changed_at: datetime
    source: str = Field(max_length=32)  # csv | cli | clerk | database | ...
    note: str | None = Field(default=None, sa_column=Column(Text))


class Inquiry(SQLModel, table=True):
    """A citizen's question, from its first mail until a clerk closes it."""

    __tablename__ = "inquiry"

    id: int | None = Field(default=None, primary_key=True)  # reference INQ-000123
    message: int = Field(foreign_key="message.id", unique=True)  # the mail that opened it
    department: str = Field(max_length=64, index=True)
    rule: str = Field(max_length=128)
    language: str = Field(max_length=2)
    state: str = Field(default="open", max_length=16, index=True)  # open | answered | closed
    sender: str = Field(max_length=998)
    sender_name: str | None = Field(default=None, max_length=998)
    subject: str | None = Field(default=None, sa_column=Column(Text))
    transactions: str = Field(default="", sa_column=Column(Text, nullable=False, server_default=""))
    priority: str = Field(default="normal", max_length=16)
    tag: str | None = Field(default=None, max_length=255)
    created_at: datetime = Field(index=True)
    due_at: datetime = Field(index=True)
    first_response_at: datetime | None = None
    closed_at: datetime | None = None
    claimed_by: str | None = Field(default=None, max_length=998)
    escalation_level: int = 0


class InquiryEvent(SQLModel, table=True):
    """One step of an inquiry's thread: citizen mail, clerk answer, internal note, status change."""

    __tablename__ = "inquiry_event"

    id: int | None = Field(default=None, primary_key=True)
    inquiry: int = Field(foreign_key="inquiry.id", index=True)
    kind: str = Field(max_length=32)  # citizen | followup | clerk | internal | status | escalation | system
    message: int | None = Field(default=None, foreign_key="message.id")
    author: str | None = Field(default=None, max_length=998)
    text: str | None = Field(default=None, sa_column=Column(Text))
    at: datetime


class Outbox(SQLModel, table=True):
    """A mail to send; written in the same transaction as the decision that caused it."""

    __tablename__ = "outbox"
    # The sender's claim reads the due rows of one state in this order, from the index
    # alone: it never reads a row's bytes to find the next 50 among thousands waiting.
    __table_args__ = (Index("ix_outbox_due", "state", "next_attempt_at", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(max_length=255, unique=True)  # what it answers; makes "send once" a constraint
    inquiry: int | None = Field(default=None, foreign_key="inquiry.id", index=True)
    template: str = Field(max_length=64)
    # Indexed: the daily limit of automatic mail counts per recipient, for every mail and notification.
    recipient: str = Field(max_length=998, index=True)
    message_id: str = Field(max_length=998, unique=True)
    raw: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    state: str = Field(default="pending", max_length=16)  # pending | sending | sent | failed
    attempts: int = 0
    next_attempt_at: datetime
    # host:pid of the process sending it: a crashed sender on this host is seen at once, not after the lease.
    lease_owner: str | None = Field(default=None, max_length=255)
    last_error: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime
    sent_at: datetime | None = None


class Subscription(SQLModel, table=True):
    """A citizen told of a transaction's status hears of its changes until they say stop."""

    __tablename__ = "subscription"
    __table_args__ = (UniqueConstraint("number", "email"),)

    id: int | None = Field(default=None, primary_key=True)
    number: str = Field(foreign_key="transaction.number", index=True, max_length=32)
    email: str = Field(max_length=998)
    language: str = Field(default="ar", max_length=2)
    inquiry: int | None = Field(default=None, foreign_key="inquiry.id")
    active: bool = True
    last_status: str | None = Field(default=None, max_length=64)  # the status they were last told
    # Changes told so far; part of each notification's outbox key, so a status
    # that changes back and forth is told every time, yet each change only once.
    changes_told: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    created_at: datetime


class Undeliverable(SQLModel, table=True):
    """An address that bounced: no more automatic mail to it."""

    __tablename__ = "undeliverable"

    email: str = Field(primary_key=True, max_length=998)
    reason: str | None = Field(default=None, sa_column=Column(Text))
    at: datetime


class Secret(SQLModel, table=True):
    """Keys the office generates once and shares between its processes (VERP signing)."""

    __tablename__ = "secret"

    name: str = Field(primary_key=True, max_length=64)
    value: str = Field(max_length=255)
