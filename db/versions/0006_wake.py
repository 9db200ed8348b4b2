"""PostgreSQL: wake the daemons on work (LISTEN/NOTIFY), whoever wrote it.

A stored mail, a new outgoing mail and a transaction's status change - by any daemon or by
an outside system's UPDATE - notify channel ``mailbot`` with 'mail', 'outbox' or 'status'
when their transaction commits (wake.py listens).  Nothing on SQLite, where one daemon
polls.

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

TRIGGERS = (
    ("message_wake", "AFTER INSERT OR UPDATE OF state ON message", "mail"),
    ("outbox_wake", "AFTER INSERT ON outbox", "outbox"),
    ("transaction_wake", 'AFTER UPDATE OF status ON "transaction"', "status"),
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("""
        CREATE OR REPLACE FUNCTION mailbot_wake() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('mailbot', TG_ARGV[0]);
            RETURN NULL;
        END $$
    """)
    for name, when, payload in TRIGGERS:
        op.execute(f"CREATE TRIGGER {name} {when} FOR EACH STATEMENT EXECUTE FUNCTION mailbot_wake('{payload}')")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name, when, _payload in TRIGGERS:
        table = when.rsplit(" ON ", 1)[1]
        op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
    op.execute("DROP FUNCTION IF EXISTS mailbot_wake()")
