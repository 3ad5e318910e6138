"""The query layer: every statement the service runs, one function per job, over a ``Session``.

The functions never commit: they run inside :meth:`Database.read` / :meth:`Database.write`, which
own the transaction, on SQLite and PostgreSQL alike (no dialect-specific SQL here). Rows come back
as the models of :mod:`.models`, detached and fully loaded (``expire_on_commit=False``).

Appending a turn (:func:`append_turn`) numbers it ``max(seq) + 1`` of its conversation inside the
``INSERT``. That is safe because every append first updates the conversation row
(:func:`touch_conversation`, in the same transaction):

- PostgreSQL: the ``UPDATE`` takes the conversation row's lock, so a second transaction appending
  to the same conversation waits at its ``UPDATE`` until the first commits. Under READ COMMITTED
  each statement sees what was committed before it started, so the waiting transaction's
  ``INSERT … SELECT max(seq) + 1`` then sees the first one's turn and takes the next number.
  Appends to different conversations do not wait for each other.
- SQLite: one writer at a time for the whole database (and one writer thread in
  :class:`Database`), so the transactions run one after the other.

The unique constraint ``(conversation_id, seq)`` is the backstop: a numbering race would be
refused (:class:`~streaming_llm.errors.StorageConflict`), never stored twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session

from .models import AgentRow, ConversationAgentRow, ConversationRow, TurnRow, casefold, utcnow


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# --- agents -------------------------------------------------------------------------------------
def list_agents(session: Session) -> list[AgentRow]:
    return list(session.scalars(select(AgentRow).order_by(AgentRow.id)))


def get_agent(session: Session, agent_id: str) -> AgentRow | None:
    return session.get(AgentRow, agent_id)


def upsert_agent(session: Session, agent_id: str, *, name: str, system_prompt: str,
                 markdown_context: str, tools: str | None = None) -> tuple[AgentRow, bool]:
    """Insert or update the agent; returns ``(row, created)``. An existing row stays locked
    (``FOR UPDATE`` on PostgreSQL) until the transaction ends, so concurrent updates of one agent
    queue; two concurrent creations of one id end in a :class:`StorageConflict` for one of them."""
    now = utcnow()
    row = session.get(AgentRow, agent_id, with_for_update=True)
    created = row is None
    if row is None:
        row = AgentRow(id=agent_id, created_at=now)
        session.add(row)
    row.name, row.system_prompt, row.markdown_context = name, system_prompt, markdown_context
    row.tools = tools
    row.updated_at = now
    session.flush()
    return row, created


def delete_agent(session: Session, agent_id: str) -> bool:
    return bool(session.execute(delete(AgentRow).where(AgentRow.id == agent_id)).rowcount)  # type: ignore[attr-defined]


# --- conversations ------------------------------------------------------------------------------
def get_conversation(session: Session, conversation_id: str) -> ConversationRow | None:
    return session.get(ConversationRow, conversation_id)


def list_conversations(session: Session, *, agent_id: str | None = None,
                       limit: int | None = 100, offset: int = 0,
                       search: str | None = None) -> list[ConversationRow]:
    """Most recently active first; ``limit=None``: all of them. ``search``: only those whose
    title or any turn contains it, case-insensitively in any script (the stored case-folded
    copies, see :mod:`.models`; LIKE wildcards in it are plain text)."""
    query = select(ConversationRow)
    if agent_id is not None:  # a participant: the agent of a plain conversation, or in a room
        query = query.where(ConversationRow.id.in_(
            select(ConversationAgentRow.conversation_id)
            .where(ConversationAgentRow.agent_id == agent_id)))
    if search:
        folded = casefold(search)
        in_turns = select(TurnRow.id).where(
            TurnRow.conversation_id == ConversationRow.id,
            TurnRow.content_casefold.contains(folded, autoescape=True))
        query = query.where(ConversationRow.title_casefold.contains(folded, autoescape=True)
                            | in_turns.exists())
    query = query.order_by(ConversationRow.updated_at.desc(), ConversationRow.id.desc())
    return list(session.scalars(query.limit(limit).offset(offset)))


def create_conversation(session: Session, agent_id: str, title: str = "",
                        agent_ids: Sequence[str] = ()) -> str:
    """A new conversation of ``agent_id``, or a room of ``agent_ids`` (then ``agent_id`` is the
    first of them)."""
    now = utcnow()
    conversation_id = new_id("conv")
    participants = list(agent_ids) or [agent_id]
    session.execute(insert(ConversationRow).values(
        id=conversation_id, agent_id=participants[0], title=title, title_casefold=casefold(title),
        created_at=now, updated_at=now))
    _insert_participants(session, conversation_id, participants)
    return conversation_id


def touch_conversation(session: Session, conversation_id: str) -> bool:
    """Mark the conversation active now, locking its row until the transaction ends (see the
    module's note on appending); False when it does not exist."""
    result = session.execute(
        update(ConversationRow).where(ConversationRow.id == conversation_id)
        .values(updated_at=utcnow()).execution_options(synchronize_session=False))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def rename_conversation(session: Session, conversation_id: str,
                        title: str) -> ConversationRow | None:
    row = session.get(ConversationRow, conversation_id, with_for_update=True)
    if row is not None:
        row.title, row.title_casefold = title, casefold(title)
        session.flush()
    return row


def truncate_conversation(session: Session, conversation_id: str, from_seq: int) -> int:
    """Delete the turns with ``seq >= from_seq``; return how many went. Call it after
    :func:`touch_conversation` in the same transaction, so no append interleaves."""
    result = session.execute(delete(TurnRow).where(
        TurnRow.conversation_id == conversation_id, TurnRow.seq >= from_seq))
    return int(result.rowcount)  # type: ignore[attr-defined]


def delete_conversation(session: Session, conversation_id: str) -> bool:
    session.execute(delete(TurnRow).where(TurnRow.conversation_id == conversation_id))
    session.execute(delete(ConversationAgentRow)
                    .where(ConversationAgentRow.conversation_id == conversation_id))
    result = session.execute(
        delete(ConversationRow).where(ConversationRow.id == conversation_id))
    return bool(result.rowcount)  # type: ignore[attr-defined]


# --- turns --------------------------------------------------------------------------------------
def list_turns(session: Session, conversation_id: str) -> list[TurnRow]:
    """Every turn of the conversation, in ``seq`` order."""
    return list(session.scalars(select(TurnRow).where(TurnRow.conversation_id == conversation_id)
                                .order_by(TurnRow.seq)))


def append_turn(session: Session, conversation_id: str, **fields: Any) -> str:
    """Append a turn (``role``, ``content`` and the other ``turns`` columns) to a conversation
    that :func:`touch_conversation` locked in this transaction; returns the turn's id.

    ``INSERT … SELECT max(seq) + 1``: the next ``seq`` (0, 1, 2, …) in the same statement, one
    round trip."""
    turn_id = new_id("turn")
    if "content" in fields:
        fields["content_casefold"] = casefold(fields["content"])
    next_seq = (select(func.coalesce(func.max(TurnRow.seq) + 1, 0))
                .where(TurnRow.conversation_id == conversation_id).scalar_subquery())
    session.execute(insert(TurnRow).values(id=turn_id, conversation_id=conversation_id,
                                           created_at=utcnow(), seq=next_seq, **fields))
    return turn_id


# --- participants (rooms) -----------------------------------------------------------------------
def _insert_participants(session: Session, conversation_id: str, agent_ids: Sequence[str]) -> None:
    session.execute(insert(ConversationAgentRow), [
        {"conversation_id": conversation_id, "agent_id": agent_id, "position": position}
        for position, agent_id in enumerate(agent_ids)])


def list_participants(session: Session, conversation_id: str) -> list[str]:
    """The conversation's agents in their order: one for a plain conversation, several in a room."""
    return list(session.scalars(
        select(ConversationAgentRow.agent_id)
        .where(ConversationAgentRow.conversation_id == conversation_id)
        .order_by(ConversationAgentRow.position)))


def participants_of(session: Session, conversation_ids: Sequence[str]) -> dict[str, list[str]]:
    """:func:`list_participants` for many conversations in one query."""
    found: dict[str, list[str]] = {cid: [] for cid in conversation_ids}
    if not conversation_ids:
        return found
    rows = session.execute(
        select(ConversationAgentRow.conversation_id, ConversationAgentRow.agent_id)
        .where(ConversationAgentRow.conversation_id.in_(list(conversation_ids)))
        .order_by(ConversationAgentRow.conversation_id, ConversationAgentRow.position))
    for conversation_id, agent_id in rows:
        found[conversation_id].append(agent_id)
    return found


def set_participants(session: Session, conversation_id: str, agent_ids: Sequence[str]) -> None:
    """Replace the participants (at least one) by ``agent_ids`` in that order; the first becomes
    ``conversations.agent_id``. Call it after :func:`touch_conversation` in the same transaction."""
    session.execute(delete(ConversationAgentRow)
                    .where(ConversationAgentRow.conversation_id == conversation_id))
    _insert_participants(session, conversation_id, agent_ids)
    session.execute(update(ConversationRow).where(ConversationRow.id == conversation_id)
                    .values(agent_id=agent_ids[0]).execution_options(synchronize_session=False))
