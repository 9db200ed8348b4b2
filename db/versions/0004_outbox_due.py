"""Outbox due index: one index on (state, next_attempt_at, id) instead of one on each column.

The sender claimed its next 50 mails by reading every due row and sorting them;
on SQLite each of those reads went through the row's mail bytes, which lie
before next_attempt_at.  With 4,000 mails waiting (an hour's relay outage at a
busy office) that was 10 ms per batch of 50.  The index gives the next 50 in
order without touching the rows.

Revision ID: 0004
Revises: 0003
"""

from alembic import op


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_outbox_due', 'outbox', ['state', 'next_attempt_at', 'id'], unique=False)
    op.drop_index('ix_outbox_state', table_name='outbox')
    op.drop_index('ix_outbox_next_attempt_at', table_name='outbox')


def downgrade() -> None:
    op.create_index('ix_outbox_next_attempt_at', 'outbox', ['next_attempt_at'], unique=False)
    op.create_index('ix_outbox_state', 'outbox', ['state'], unique=False)
    op.drop_index('ix_outbox_due', table_name='outbox')
