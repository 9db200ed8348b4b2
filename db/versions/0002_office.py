"""Office: transactions, inquiries, outbox, subscriptions (everything after the archive).

Revision ID: 0002
Revises: 0001
"""

from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('transaction',
    sa.Column('number', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('department', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('applicant_name', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
    sa.Column('applicant_emails', sa.Text(), server_default='', nullable=False),
    sa.Column('updated_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('number')
    )
    op.create_table('undeliverable',
    sa.Column('email', sqlmodel.sql.sqltypes.AutoString(length=998), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('email')
    )
    op.create_table('inquiry',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('message', sa.Integer(), nullable=False),
    sa.Column('department', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('rule', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('language', sqlmodel.sql.sqltypes.AutoString(length=2), nullable=False),
    sa.Column('state', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('sender', sqlmodel.sql.sqltypes.AutoString(length=998), nullable=False),
    sa.Column('sender_name', sqlmodel.sql.sqltypes.AutoString(length=998), nullable=True),
    sa.Column('subject', sa.Text(), nullable=True),
    sa.Column('transactions', sa.Text(), server_default='', nullable=False),
    sa.Column('priority', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('tag', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('due_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('first_response_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('closed_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('claimed_by', sqlmodel.sql.sqltypes.AutoString(length=998), nullable=True),
    sa.Column('escalation_level', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['message'], ['message.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('message')
    )
    with op.batch_alter_table('inquiry', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_inquiry_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_inquiry_department'), ['department'], unique=False)
        batch_op.create_index(batch_op.f('ix_inquiry_due_at'), ['due_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_inquiry_state'), ['state'], unique=False)

    op.create_table('transaction_history',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('number', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('previous_status', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('changed_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('source', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('note', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['number'], ['transaction.number'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('transaction_history', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_transaction_history_number'), ['number'], unique=False)

    op.create_table('inquiry_event',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('inquiry', sa.Integer(), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('message', sa.Integer(), nullable=True),
    sa.Column('author', sqlmodel.sql.sqltypes.AutoString(length=998), nullable=True),
    sa.Column('text', sa.Text(), nullable=True),
    sa.Column('at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['inquiry'], ['inquiry.id'], ),
    sa.ForeignKeyConstraint(['message'], ['message.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('inquiry_event', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_inquiry_event_inquiry'), ['inquiry'], unique=False)

    op.create_table('outbox',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('key', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('inquiry', sa.Integer(), nullable=True),
    sa.Column('template', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('recipient', sqlmodel.sql.sqltypes.AutoString(length=998), nullable=False),
    sa.Column('message_id', sqlmodel.sql.sqltypes.AutoString(length=998), nullable=False),
    sa.Column('raw', sa.LargeBinary(), nullable=False),
    sa.Column('state', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('lease_owner', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('sent_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['inquiry'], ['inquiry.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key'),
    sa.UniqueConstraint('message_id')
    )
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_outbox_inquiry'), ['inquiry'], unique=False)
        batch_op.create_index(batch_op.f('ix_outbox_next_attempt_at'), ['next_attempt_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_outbox_recipient'), ['recipient'], unique=False)
        batch_op.create_index(batch_op.f('ix_outbox_state'), ['state'], unique=False)

    op.create_table('subscription',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('number', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('email', sqlmodel.sql.sqltypes.AutoString(length=998), nullable=False),
    sa.Column('language', sqlmodel.sql.sqltypes.AutoString(length=2), nullable=False),
    sa.Column('inquiry', sa.Integer(), nullable=True),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('last_status', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('changes_told', sa.Integer(), server_default='0', nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['inquiry'], ['inquiry.id'], ),
    sa.ForeignKeyConstraint(['number'], ['transaction.number'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('number', 'email')
    )
    with op.batch_alter_table('subscription', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_subscription_number'), ['number'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('subscription', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_subscription_number'))

    op.drop_table('subscription')
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_outbox_state'))
        batch_op.drop_index(batch_op.f('ix_outbox_recipient'))
        batch_op.drop_index(batch_op.f('ix_outbox_next_attempt_at'))
        batch_op.drop_index(batch_op.f('ix_outbox_inquiry'))

    op.drop_table('outbox')
    with op.batch_alter_table('inquiry_event', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_inquiry_event_inquiry'))

    op.drop_table('inquiry_event')
    with op.batch_alter_table('transaction_history', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_transaction_history_number'))

    op.drop_table('transaction_history')
    with op.batch_alter_table('inquiry', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_inquiry_state'))
        batch_op.drop_index(batch_op.f('ix_inquiry_due_at'))
        batch_op.drop_index(batch_op.f('ix_inquiry_department'))
        batch_op.drop_index(batch_op.f('ix_inquiry_created_at'))

    op.drop_table('inquiry')
    op.drop_table('undeliverable')
    op.drop_table('transaction')
