"""SQLAlchemy models. The schema is created only by Alembic (``storage/migrations/``).

Plain names a person can read with ``sqlite3``: text ids, ISO-8601 UTC timestamps stored as text
(``2026-11-24T05:16:23.123456Z``, which also sorts correctly), a per-conversation ``seq``.

Search is case-insensitive for every script, the same on SQLite and PostgreSQL: titles and turn
contents are also stored case-folded (:func:`casefold`, ``title_casefold`` / ``content_casefold``,
written with them by :mod:`.queries`), and a search compares the folded query with those by
``LIKE``. The databases' own ``lower()`` cannot do this: SQLite's folds ASCII only, PostgreSQL's
depends on the server's locale (ASCII only under ``C``) and leaves a final sigma as it is, so a
Greek word typed in lower case never matches its capitals.
"""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime

from sqlalchemy import ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> str:
    """Now as ISO-8601 UTC with microseconds and a ``Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def casefold(text: str) -> str:
    """``text`` for caseless comparison: Unicode full case folding (``ß`` → ``ss``, final and capital
    sigma → sigma, ``É`` → ``é``) of its canonical decomposition, recomposed, so that ``é`` typed as one
    character or as ``e`` + a combining accent folds alike (Unicode's canonical caseless match).
    Migration ``0002`` holds a frozen copy for its backfill: change both or neither."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", text).casefold())


class Base(DeclarativeBase):
    pass


class AgentRow(Base):
    __tablename__ = "agents"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    system_prompt: Mapped[str] = mapped_column(Text, default="")
    markdown_context: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[str] = mapped_column(String(32))
    updated_at: Mapped[str] = mapped_column(String(32))
    tools: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON list of wire.Tool


class ConversationRow(Base):
    __tablename__ = "conversations"
    __table_args__ = (Index("ix_conversations_agent_updated", "agent_id", "updated_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Not a foreign key: deleting an agent keeps its conversations readable. In a room, the first
    # participant (``conversation_agents`` lists them all).
    agent_id: Mapped[str] = mapped_column(String(64))
    title: Mapped[str] = mapped_column(Text, default="")
    title_casefold: Mapped[str] = mapped_column(Text, server_default="")  # casefold(title), for search
    created_at: Mapped[str] = mapped_column(String(32))
    updated_at: Mapped[str] = mapped_column(String(32), index=True)


class ConversationAgentRow(Base):
    """A participant of a conversation: one row for a plain conversation, several for a room.
    ``position`` orders them (0, 1, 2, …) as the room lists them."""

    __tablename__ = "conversation_agents"
    __table_args__ = (Index("ix_conversation_agents_agent", "agent_id"),)

    conversation_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True)
    # Not a foreign key either: a deleted agent stays listed until the room drops it.
    agent_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)


class TurnRow(Base):
    __tablename__ = "turns"
    __table_args__ = (UniqueConstraint("conversation_id", "seq", name="uq_turns_conversation_seq"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    conversation_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("conversations.id", ondelete="CASCADE")
    )
    seq: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))  # user | assistant | tool
    content: Mapped[str] = mapped_column(Text)
    content_casefold: Mapped[str] = mapped_column(Text, server_default="")  # casefold(content), for search
    finish_reason: Mapped[str | None] = mapped_column(String(16), nullable=True)  # assistant only
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    usage: Mapped[str | None] = mapped_column(Text, nullable=True)  # full usage as JSON
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[str] = mapped_column(String(32))
    # An assistant turn's calls, as a JSON list of {"id", "name", "arguments"}; a tool turn's
    # call id (the call it answers).
    tool_calls: Mapped[str | None] = mapped_column(Text, nullable=True)
    tool_call_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # Who spoke an assistant turn (NULL for the user's): in a room, which participant answered.
    agent_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
