"""rooms: a conversation's participants, and who spoke each turn

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06 13:00:00.000000

Adds ``conversation_agents`` (conversation_id, agent_id, position): the agents taking part in a
conversation, in order; one row for a plain conversation, several for a room. Adds
``turns.agent_id``: the agent that spoke an assistant turn (NULL for the user's turns). Both are
filled for the rows already stored from ``conversations.agent_id``, in one statement each.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('conversation_agents',
    sa.Column('conversation_id', sa.String(length=64), nullable=False),
    sa.Column('agent_id', sa.String(length=64), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['conversation_id'], ['conversations.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('conversation_id', 'agent_id')
    )
    with op.batch_alter_table('conversation_agents', schema=None) as batch_op:
        batch_op.create_index('ix_conversation_agents_agent', ['agent_id'], unique=False)
    with op.batch_alter_table('turns', schema=None) as batch_op:
        batch_op.add_column(sa.Column('agent_id', sa.String(length=64), nullable=True))
    op.execute("INSERT INTO conversation_agents (conversation_id, agent_id, position) "
               "SELECT id, agent_id, 0 FROM conversations")
    op.execute("UPDATE turns SET agent_id = (SELECT conversations.agent_id FROM conversations "
               "WHERE conversations.id = turns.conversation_id) WHERE role = 'assistant'")


def downgrade() -> None:
    with op.batch_alter_table('turns', schema=None) as batch_op:
        batch_op.drop_column('agent_id')
    with op.batch_alter_table('conversation_agents', schema=None) as batch_op:
        batch_op.drop_index('ix_conversation_agents_agent')
    op.drop_table('conversation_agents')
