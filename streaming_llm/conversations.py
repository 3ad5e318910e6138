"""The conversation manager: stores turns around generation and builds engine requests.

Data flows one way: socket → manager → engine. The manager appends the user turn before
generation and the assistant turn after, in order, and builds the engine request from the agent
(system prompt + Markdown context as the system message) and the stored history.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import cast

import msgspec

from .engines.base import (
    ChatMessage,
    Chunk,
    Engine,
    EngineRequest,
    Finished,
    FinishReason,
    GenerationOptions,
    TextChunk,
    Usage,
)
from .errors import AgentNotFound, Conflict, ConversationNotFound, EngineError
from .ids import check_conversation_id
from .storage.database import Database
from .storage.models import ConversationRow, TurnRow
from .storage.repositories import AgentRepository, ConversationRepository, TurnRepository

log = logging.getLogger(__name__)


# --- REST views ---------------------------------------------------------------------------------
class TurnView(msgspec.Struct):
    id: str
    seq: int
    role: str
    content: str
    finish_reason: str | None
    usage: dict[str, object] | None
    created_at: str


class ConversationSummary(msgspec.Struct):
    id: str
    agent_id: str
    title: str
    created_at: str
    updated_at: str


class ConversationView(msgspec.Struct):
    id: str
    agent_id: str
    title: str
    created_at: str
    updated_at: str
    turns: list[TurnView]


def _turn_view(row: TurnRow) -> TurnView:
    usage = msgspec.json.decode(row.usage) if row.usage else None
    return TurnView(row.id, row.seq, row.role, row.content, row.finish_reason, usage, row.created_at)


def _summary(row: ConversationRow) -> ConversationSummary:
    return ConversationSummary(row.id, row.agent_id, row.title, row.created_at, row.updated_at)


def system_message(system_prompt: str, markdown_context: str) -> str:
    """The agent's system prompt followed by its Markdown context, separated by a blank line."""
    return "\n\n".join(part for part in (system_prompt.strip(), markdown_context.strip()) if part)


# --- turns --------------------------------------------------------------------------------------
@dataclass
class Turn:
    """One chat turn in progress: the user turn is stored, the answer is being generated."""

    request_id: str
    conversation_id: str
    user_turn_id: str
    request: EngineRequest
    pieces: list[str] = field(default_factory=list)
    finished: Finished | None = None


class ConversationManager:
    def __init__(self, db: Database, engine: Engine, *, default_max_new_tokens: int) -> None:
        self.db = db
        self.engine = engine
        self.default_max_new_tokens = default_max_new_tokens

    # REST ---------------------------------------------------------------------------------------
    async def list(self, *, agent_id: str | None, limit: int, offset: int) -> list[ConversationSummary]:
        async with self.db.session() as session:
            rows = await ConversationRepository(session).list(agent_id=agent_id, limit=limit,
                                                               offset=offset)
        return [_summary(r) for r in rows]

    async def get(self, conversation_id: str) -> ConversationView:
        check_conversation_id(conversation_id)
        async with self.db.session() as session:
            row = await ConversationRepository(session).get(conversation_id)
            if row is None:
                raise ConversationNotFound(f"conversation {conversation_id!r} not found")
            turns = await TurnRepository(session).list_turns(conversation_id)
        return ConversationView(row.id, row.agent_id, row.title, row.created_at, row.updated_at,
                                [_turn_view(t) for t in turns])

    async def delete(self, conversation_id: str) -> None:
        check_conversation_id(conversation_id)
        async with self.db.session() as session:
            if not await ConversationRepository(session).delete(conversation_id):
                raise ConversationNotFound(f"conversation {conversation_id!r} not found")
            await session.commit()
        self.engine.forget(conversation_id)

    # chat ---------------------------------------------------------------------------------------
    async def begin(self, *, request_id: str, agent_id: str, message: str,
                    conversation_id: str | None, options: GenerationOptions) -> Turn:
        """Validate, store the user turn, and build the engine request (history + new message)."""
        async with self.db.session() as session:
            agent = await AgentRepository(session).get(agent_id)
            if agent is None:
                raise AgentNotFound(f"agent {agent_id!r} not found")
            conversations, turns = ConversationRepository(session), TurnRepository(session)
            if conversation_id is None:
                conversation = await conversations.create(agent_id, title=_title(message))
                history: list[TurnRow] = []
            else:
                check_conversation_id(conversation_id)
                found = await conversations.get(conversation_id)
                if found is None:
                    raise ConversationNotFound(f"conversation {conversation_id!r} not found")
                if found.agent_id != agent_id:
                    raise Conflict(
                        f"conversation {conversation_id!r} belongs to agent {found.agent_id!r}, "
                        f"not {agent_id!r}", code="conversation_agent_mismatch")
                conversation = found
                history = await turns.list_turns(conversation.id)
            user_turn = await turns.append(conversation.id, role="user", content=message,
                                           request_id=request_id)
            await conversations.touch(conversation.id)
            await session.commit()

        messages = []
        system = system_message(agent.system_prompt, agent.markdown_context)
        if system:
            messages.append(ChatMessage("system", system))
        messages.extend(ChatMessage(t.role, t.content) for t in history  # type: ignore[arg-type]
                        if t.role in ("user", "assistant"))
        messages.append(ChatMessage("user", message))
        request = EngineRequest(
            request_id=request_id, conversation_id=conversation.id, messages=messages,
            options=options,
            max_new_tokens=options.max_new_tokens or self.default_max_new_tokens,
        )
        return Turn(request_id, conversation.id, user_turn.id, request)

    async def generate(self, turn: Turn) -> AsyncIterator[str]:
        """Yield the answer's text pieces; ``turn.pieces`` keeps what was yielded so far and
        ``turn.finished`` receives the engine's :class:`Finished`."""
        stream = cast(AsyncGenerator[Chunk, None], self.engine.stream(turn.request))
        try:
            async for chunk in stream:
                if isinstance(chunk, TextChunk):
                    if chunk.text:
                        turn.pieces.append(chunk.text)
                        yield chunk.text
                elif isinstance(chunk, Finished):
                    turn.finished = chunk
                    return
            raise EngineError("the engine ended the answer without a finish reason")
        finally:
            await stream.aclose()  # cancels the engine's work when we stop early

    async def finish(self, turn: Turn, reason: FinishReason, usage: Usage) -> str:
        """Store the assistant turn (whatever was streamed) and return its id."""
        async with self.db.session() as session:
            row = await TurnRepository(session).append(
                turn.conversation_id, role="assistant", content="".join(turn.pieces),
                finish_reason=reason, prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                usage=msgspec.json.encode(usage).decode(), request_id=turn.request_id,
            )
            await ConversationRepository(session).touch(turn.conversation_id)
            await session.commit()
        return row.id


def _title(message: str) -> str:
    line = message.strip().splitlines()[0] if message.strip() else ""
    return line[:80]


async def store_partial(manager: ConversationManager, turn: Turn, reason: FinishReason,
                        usage: Usage | None = None) -> str:
    """Store a partial answer even while the calling task is being cancelled."""
    usage = usage or Usage(completion_tokens=len(turn.pieces))
    return await asyncio.shield(manager.finish(turn, reason, usage))
