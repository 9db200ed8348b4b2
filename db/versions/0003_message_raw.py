"""Message raw: a mail's bytes move from `message` to their own table `message_raw`.

SQLite rewrites a whole row on any UPDATE, so every state change of a mail
copied its bytes (two 25 MB copies in memory for a 25 MB mail).

Revision ID: 0003
Revises: 0002
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('message_raw',
    sa.Column('message', sa.Integer(), nullable=False),
    sa.Column('raw', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['message'], ['message.id'], ),
    sa.PrimaryKeyConstraint('message')
    )
    op.execute("INSERT INTO message_raw (message, raw) SELECT id, raw FROM message")
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.drop_column('raw')


def downgrade() -> None:
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.add_column(sa.Column('raw', sa.LargeBinary(), nullable=True))
    op.execute("UPDATE message SET raw = (SELECT raw FROM message_raw WHERE message_raw.message = message.id)")
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.alter_column('raw', existing_type=sa.LargeBinary(), nullable=False)
    op.drop_table('message_raw')
