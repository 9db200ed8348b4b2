"""Daemon heartbeats and the rules in force, for `mailbot status` and for commands run while
the rules folder is mid-edit.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'daemon',
        sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
        sa.Column('version', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('started_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('heartbeat_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_table(
        'rules_in_force',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('files', sa.Text(), nullable=False),
        sa.Column('fingerprint', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('saved_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('refused_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column('refused', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )


def downgrade() -> None:
    op.drop_table('rules_in_force')
    op.drop_table('daemon')
