"""Thin async repositories, one per aggregate, each over an ``AsyncSession``.

They never commit: the caller (the conversation manager, a route) owns the transaction. The
chat's hot writes (a conversation, a turn) also exist as plain functions over a synchronous
``Connection``, for :meth:`~streaming_llm.storage.database.Database.write`; both build the same
statements.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Connection, Insert, Update, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from .models import AgentRow, ConversationRow, TurnRow, utcnow


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _touch(conversation_id: str) -> Update:
    return (update(ConversationRow).where(ConversationRow.id == conversation_id)
            .values(updated_at=utcnow()).execution_options(synchronize_session=False))


def _insert_turn(conversation_id: str, **fields: Any) -> tuple[Insert, dict[str, Any]]:
    """``INSERT ... SELECT max(seq) + 1``: the next ``seq`` of the conversation (0, 1, 2, ...)
    in the same statement, so a turn is one round trip."""
    values = {"id": new_id("turn"), "conversation_id": conversation_id, "created_at": utcnow(),
              **fields}
    next_seq = (select(func.coalesce(func.max(TurnRow.seq) + 1, 0))
                .where(TurnRow.conversation_id == conversation_id).scalar_subquery())
    return insert(TurnRow).values(**values, seq=next_seq).returning(TurnRow.seq), values


class AgentRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def list(self) -> list[AgentRow]:
        return list((await self.session.scalars(select(AgentRow).order_by(AgentRow.id))).all())

    async def get(self, agent_id: str) -> AgentRow | None:
        return await self.session.get(AgentRow, agent_id)

    async def upsert(
        self, agent_id: str, *, name: str, system_prompt: str, markdown_context: str,
        updated_at: str | None = None,
    ) -> tuple[AgentRow, bool]:
        """Insert or update; returns ``(row, created)``."""
        now = updated_at or utcnow()
        row = await self.get(agent_id)
        created = row is None
        if row is None:
            row = AgentRow(id=agent_id, created_at=now)
            self.session.add(row)
        row.name, row.system_prompt, row.markdown_context = name, system_prompt, markdown_context
        row.updated_at = now
        await self.session.flush()
        return row, created

    async def delete(self, agent_id: str) -> bool:
        result = await self.session.execute(delete(AgentRow).where(AgentRow.id == agent_id))
        return bool(result.rowcount)  # type: ignore[attr-defined]


class ConversationRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, conversation_id: str) -> ConversationRow | None:
        return await self.session.get(ConversationRow, conversation_id)

    async def list(self, *, agent_id: str | None = None, limit: int = 100,
                   offset: int = 0, search: str | None = None) -> list[ConversationRow]:
        query = select(ConversationRow)
        if agent_id is not None:
            query = query.where(ConversationRow.agent_id == agent_id)
        if search:  # a case-insensitive substring of the title or of any turn
            in_turns = select(TurnRow.id).where(
                TurnRow.conversation_id == ConversationRow.id,
                TurnRow.content.icontains(search, autoescape=True))
            query = query.where(ConversationRow.title.icontains(search, autoescape=True)
                                | in_turns.exists())
        query = query.order_by(ConversationRow.updated_at.desc(), ConversationRow.id.desc())
        return list((await self.session.scalars(query.limit(limit).offset(offset))).all())

    async def rename(self, conversation_id: str, title: str) -> ConversationRow | None:
        row = await self.session.get(ConversationRow, conversation_id)
        if row is not None:
            row.title = title
            await self.session.flush()
        return row

    async def truncate(self, conversation_id: str, from_seq: int) -> int:
        """Delete the turns with ``seq >= from_seq``; return how many went."""
        result = await self.session.execute(delete(TurnRow).where(
            TurnRow.conversation_id == conversation_id, TurnRow.seq >= from_seq))
        await self.session.execute(_touch(conversation_id))
        return int(result.rowcount)  # type: ignore[attr-defined]

    async def delete(self, conversation_id: str) -> bool:
        await self.session.execute(delete(TurnRow).where(TurnRow.conversation_id == conversation_id))
        result = await self.session.execute(
            delete(ConversationRow).where(ConversationRow.id == conversation_id))
        return bool(result.rowcount)  # type: ignore[attr-defined]


class TurnRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def list_turns(self, conversation_id: str) -> list[TurnRow]:
        query = select(TurnRow).where(TurnRow.conversation_id == conversation_id).order_by(TurnRow.seq)
        return list((await self.session.scalars(query)).all())


# --- the writer thread (Database.write): a plain connection, one transaction -----------------
def agent_prompt(conn: Connection, agent_id: str) -> tuple[str, str] | None:
    """``(system_prompt, markdown_context)`` of the agent, None when it does not exist."""
    row = conn.execute(select(AgentRow.system_prompt, AgentRow.markdown_context)
                       .where(AgentRow.id == agent_id)).first()
    return (row[0], row[1]) if row is not None else None


def conversation_owner(conn: Connection, conversation_id: str) -> str | None:
    """The agent id of the conversation, None when it does not exist."""
    return conn.execute(select(ConversationRow.agent_id)
                        .where(ConversationRow.id == conversation_id)).scalar_one_or_none()


def turn_history(conn: Connection, conversation_id: str) -> list[tuple[str, str]]:
    """``(role, content)`` of every turn of the conversation, in order."""
    rows = conn.execute(select(TurnRow.role, TurnRow.content)
                        .where(TurnRow.conversation_id == conversation_id).order_by(TurnRow.seq))
    return [(role, content) for role, content in rows]


def create_conversation(conn: Connection, agent_id: str, title: str = "") -> str:
    now = utcnow()
    conversation_id = new_id("conv")
    conn.execute(insert(ConversationRow).values(id=conversation_id, agent_id=agent_id,
                                                title=title, created_at=now, updated_at=now))
    return conversation_id


def touch_conversation(conn: Connection, conversation_id: str) -> bool:
    """Mark the conversation active now; False when it does not exist."""
    return bool(conn.execute(_touch(conversation_id)).rowcount)


def append_turn(conn: Connection, conversation_id: str, **fields: Any) -> str:
    """Append a turn (``role``, ``content`` and the other ``turns`` columns) and return its id."""
    statement, values = _insert_turn(conversation_id, **fields)
    conn.execute(statement).scalar_one()
    return str(values["id"])
