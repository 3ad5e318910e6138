"""tool calls and tool results on turns, tools on agents

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06 13:10:00.000000

Adds ``turns.tool_calls`` (an assistant turn's calls as JSON text) and ``turns.tool_call_id``
(a ``tool`` turn's call), and ``agents.tools`` (the tools an agent offers, as JSON text). All
are nullable: the rows already stored have none.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('turns', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tool_calls', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('tool_call_id', sa.String(length=128), nullable=True))
    with op.batch_alter_table('agents', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tools', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('agents', schema=None) as batch_op:
        batch_op.drop_column('tools')
    with op.batch_alter_table('turns', schema=None) as batch_op:
        batch_op.drop_column('tool_call_id')
        batch_op.drop_column('tool_calls')
