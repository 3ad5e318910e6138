"""case-folded copies of titles and turn contents, for search in any script

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06 12:30:00.000000

Adds ``conversations.title_casefold`` and ``turns.content_casefold`` (see ``storage/models.py``)
and fills them for the rows already stored, in batches by id so that a large database is never
read whole.
"""
from __future__ import annotations

import unicodedata

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

BATCH = 500


def _casefold(text: str) -> str:
    # A frozen copy of storage.models.casefold as it was when this migration was written.
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", text).casefold())


def _backfill(table: str, source: str, target: str) -> None:
    bind = op.get_bind()
    rows = sa.table(table, sa.column("id", sa.String), sa.column(source, sa.Text),
                    sa.column(target, sa.Text))
    last = ""
    while True:
        batch = bind.execute(sa.select(rows.c.id, rows.c[source]).where(rows.c.id > last)
                             .order_by(rows.c.id).limit(BATCH)).all()
        if not batch:
            return
        bind.execute(rows.update().where(rows.c.id == sa.bindparam("row_id"))
                     .values({target: sa.bindparam("folded")}),
                     [{"row_id": row_id, "folded": _casefold(text or "")} for row_id, text in batch])
        last = batch[-1][0]


def upgrade() -> None:
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('title_casefold', sa.Text(), server_default='', nullable=False))
    with op.batch_alter_table('turns', schema=None) as batch_op:
        batch_op.add_column(sa.Column('content_casefold', sa.Text(), server_default='', nullable=False))
    _backfill('conversations', 'title', 'title_casefold')
    _backfill('turns', 'content', 'content_casefold')


def downgrade() -> None:
    with op.batch_alter_table('turns', schema=None) as batch_op:
        batch_op.drop_column('content_casefold')
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.drop_column('title_casefold')
