"""The conversation manager: stores turns around generation and builds engine requests.

Data flows one way: socket → manager → engine. The manager appends the user turn before
generation and the assistant turn after, in order, and builds the engine request from the agent
(system prompt + Markdown context as the system message) and the stored history.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, cast

import msgspec
from msgspec import Meta
from sqlalchemy.orm import Session

from ..engines.base import (
    ChatMessage,
    Chunk,
    Constraint,
    Engine,
    EngineRequest,
    Finished,
    PromptTokens,
    TextChunk,
    ToolCall,
)
from ..errors import AgentNotFound, BadRequest, Conflict, ConversationNotFound, EngineError
from ..ids import check_conversation_id
from ..metrics import Metrics
from ..storage import queries
from ..storage.database import Database
from ..storage.models import ConversationRow, TurnRow
from ..wire import FinishReason, GenerationOptions, Usage
from .admission import ConversationLocks
from .tool_calls import ToolUse, calls_from_json, calls_json, check_results, parse

if TYPE_CHECKING:
    from .export import TranscriptsDir

log = logging.getLogger(__name__)


# --- REST views ---------------------------------------------------------------------------------
class TurnView(msgspec.Struct, omit_defaults=True):
    id: str
    seq: int
    role: str  # user | assistant | tool
    content: str
    finish_reason: str | None
    usage: dict[str, object] | None
    created_at: str
    tool_calls: list[ToolCall] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers


class ConversationSummary(msgspec.Struct):
    id: str
    agent_id: str
    title: str
    created_at: str
    updated_at: str


class ConversationPatch(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``PATCH /conversations/{id}``: what may change about a conversation."""

    title: Annotated[str, Meta(min_length=1, max_length=200)]


class ConversationView(msgspec.Struct):
    id: str
    agent_id: str
    title: str
    created_at: str
    updated_at: str
    turns: list[TurnView]


def _turn_view(row: TurnRow) -> TurnView:
    usage = msgspec.json.decode(row.usage) if row.usage else None
    return TurnView(row.id, row.seq, row.role, row.content, row.finish_reason, usage, row.created_at,
                    list(calls_from_json(row.tool_calls)) or None, row.tool_call_id)


def _message(row: TurnRow) -> ChatMessage:
    """A stored turn as the engine reads it again."""
    return ChatMessage(row.role, row.content, calls_from_json(row.tool_calls),  # type: ignore[arg-type]
                       row.tool_call_id)


def _summary(row: ConversationRow) -> ConversationSummary:
    return ConversationSummary(row.id, row.agent_id, row.title, row.created_at, row.updated_at)


def system_message(system_prompt: str, markdown_context: str) -> str:
    """The agent's system prompt followed by its Markdown context, separated by a blank line."""
    return "\n\n".join(part for part in (system_prompt.strip(), markdown_context.strip()) if part)


# --- turns --------------------------------------------------------------------------------------
@dataclass
class TurnInProgress:
    """One chat turn in progress: the user turn is stored, the answer is being generated.

    ``pieces`` is the answer, the one copy of it: the turn runner appends each piece it hands
    to the route, the chat socket's resume replays from it, and :meth:`ConversationManager.finish`
    stores it.

    An unstored turn (``stored=False``: an OpenAI-style call naming no conversation) has no user
    turn id; its conversation id is a throwaway one that :meth:`ConversationManager.discard`
    makes the engine forget.
    """

    request_id: str
    conversation_id: str
    user_turn_id: str
    request: EngineRequest
    stored: bool = True
    pieces: list[str] = field(default_factory=list)
    finished: Finished | None = None
    # perf_counter() when the request arrived, and at the first and the latest answer piece.
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None
    prompt_tokens: int = 0  # from the engine's PromptTokens, for an answer cut short
    tools: ToolUse | None = None  # tools offered: the answer's calls are read out of its text
    tool_calls: tuple[ToolCall, ...] = ()  # the calls the answer made, once it ended

    def answer(self) -> str:
        """The answer's text, its calls read out into :attr:`tool_calls`."""
        text = "".join(self.pieces)
        if self.tools is None:
            return text
        text, self.tool_calls = parse(text, self.request_id,
                                      max_calls=None if self.tools.parallel else 1)
        return text

    def timed(self, usage: Usage) -> Usage:
        """``usage`` with the timings the engine left empty filled in from this turn's clock:
        time to first token from the request's arrival, decode rate from the first piece to the
        last (``completion_tokens - 1`` tokens in that span)."""
        first, last = self.first_token_at, self.last_token_at
        ttft, rate = usage.time_to_first_token_ms, usage.decode_tokens_per_s
        if ttft is None and first is not None:
            ttft = round((first - self.started) * 1000, 3)
        count = usage.completion_tokens or len(self.pieces)
        if rate is None and first is not None and last is not None and last > first and count > 1:
            rate = round((count - 1) / (last - first), 2)
        if (ttft, rate) == (usage.time_to_first_token_ms, usage.decode_tokens_per_s):
            return usage
        return msgspec.structs.replace(usage, time_to_first_token_ms=ttft, decode_tokens_per_s=rate)

    def partial_usage(self) -> Usage:
        """Usage of an answer that ended without the engine's own (cancelled or failed)."""
        return self.timed(Usage(prompt_tokens=self.prompt_tokens,
                                completion_tokens=len(self.pieces)))


class ConversationManager:
    def __init__(self, db: Database, engine: Engine, *, default_max_new_tokens: int,
                 metrics: Metrics | None = None, transcripts: TranscriptsDir | None = None
                 ) -> None:
        self.db = db
        self.engine = engine
        self.default_max_new_tokens = default_max_new_tokens
        self.metrics = metrics or Metrics()
        #: One turn (or truncation) at a time per conversation: held by the turn runner from
        #: before the history is read until the answer is stored, and by :meth:`truncate`.
        self.locks = ConversationLocks(self.metrics)
        self.transcripts = transcripts  # kept up to date after each answer, when set

    # REST ---------------------------------------------------------------------------------------
    async def list(self, *, agent_id: str | None, limit: int, offset: int,
                   search: str | None = None) -> list[ConversationSummary]:
        rows = await self.db.read(lambda session: queries.list_conversations(
            session, agent_id=agent_id, limit=limit, offset=offset, search=search))
        return [_summary(r) for r in rows]

    async def rename(self, conversation_id: str, title: str) -> ConversationSummary:
        check_conversation_id(conversation_id)

        def store(session: Session) -> ConversationSummary:
            row = queries.rename_conversation(session, conversation_id, title)
            if row is None:
                raise ConversationNotFound(f"conversation {conversation_id!r} not found")
            return _summary(row)

        return await self.db.write(store)

    async def truncate(self, conversation_id: str, from_seq: int) -> None:
        """Delete the turns from the user turn ``from_seq`` on: what "edit and resend" and
        "regenerate" do before sending that message again. The engine's conversation cache
        needs no telling: it rolls back to the prefix the next prompt shares with it.

        It waits for a turn running in the conversation to be stored (its lock), so the answer
        is never stored after the truncation: user and assistant turns keep alternating."""
        check_conversation_id(conversation_id)

        def store(session: Session) -> None:
            if not queries.touch_conversation(session, conversation_id):  # locks its row
                raise ConversationNotFound(f"conversation {conversation_id!r} not found")
            turn = next((t for t in queries.list_turns(session, conversation_id)
                         if t.seq == from_seq), None)
            if turn is None or turn.role != "user":
                raise BadRequest(f"conversation {conversation_id!r} has no user turn with "
                                 f"seq {from_seq}")
            queries.truncate_conversation(session, conversation_id, from_seq)

        async with self.locks.hold(conversation_id):
            await self.db.write(store)

    async def get(self, conversation_id: str) -> ConversationView:
        check_conversation_id(conversation_id)

        def load(session: Session) -> tuple[ConversationRow, list[TurnRow]]:
            row = queries.get_conversation(session, conversation_id)
            if row is None:
                raise ConversationNotFound(f"conversation {conversation_id!r} not found")
            return row, queries.list_turns(session, conversation_id)

        row, turns = await self.db.read(load)
        return ConversationView(row.id, row.agent_id, row.title, row.created_at, row.updated_at,
                                [_turn_view(t) for t in turns])

    async def delete(self, conversation_id: str) -> None:
        check_conversation_id(conversation_id)
        if not await self.db.write(lambda session: queries.delete_conversation(session,
                                                                                conversation_id)):
            raise ConversationNotFound(f"conversation {conversation_id!r} not found")
        self.engine.forget(conversation_id)
        if self.transcripts is not None:
            await self.transcripts.remove(conversation_id)

    # chat ---------------------------------------------------------------------------------------
    async def begin(self, *, request_id: str, agent_id: str, message: str,
                    conversation_id: str | None, options: GenerationOptions,
                    constraint: Constraint | None = None, tools: ToolUse | None = None,
                    tool_results: Sequence[ChatMessage] = (),
                    result_params: Sequence[str] = ()) -> TurnInProgress:
        """Validate, store the user turn, and build the engine request (history + new message).

        ``tool_results`` (role ``tool``) are stored before the user turn and must answer calls
        of the last stored answer; ``message`` may then be "" (no user turn). ``tools``' own
        constraint replaces ``constraint``."""
        started = time.perf_counter()
        if conversation_id is not None:
            check_conversation_id(conversation_id)

        def load(session: Session) -> tuple[tuple[str, str], list[ChatMessage]]:
            # A read: on SQLite the history may be long, and the writer must not wait for it.
            agent = queries.get_agent(session, agent_id)
            if agent is None:
                raise AgentNotFound(f"agent {agent_id!r} not found")
            prompt = (agent.system_prompt, agent.markdown_context)
            if conversation_id is None:
                return prompt, []
            conversation = queries.get_conversation(session, conversation_id)
            if conversation is None:
                raise ConversationNotFound(f"conversation {conversation_id!r} not found")
            if conversation.agent_id != agent_id:
                raise Conflict(
                    f"conversation {conversation_id!r} belongs to agent {conversation.agent_id!r}, "
                    f"not {agent_id!r}", code="conversation_agent_mismatch")
            return prompt, [_message(t) for t in queries.list_turns(session, conversation_id)]

        def store(session: Session) -> tuple[str, str]:  # the writer queue, one transaction
            if conversation_id is None:
                conversation = queries.create_conversation(session, agent_id, _title(message))
            elif queries.touch_conversation(session, conversation_id):
                conversation = conversation_id
            else:  # deleted since it was read
                raise ConversationNotFound(f"conversation {conversation_id!r} not found")
            if history and history[-1].role in ("user", "tool"):
                # The last answer was never stored (the disk filled, the process died): mark it
                # failed, so user and assistant turns keep alternating.
                queries.append_turn(session, conversation, role="assistant", content="",
                                    finish_reason="error", request_id=None)
            turn_id = ""
            for result in tool_results:
                turn_id = queries.append_turn(session, conversation, role="tool",
                                              content=result.content, request_id=request_id,
                                              tool_call_id=result.tool_call_id)
            if message or not tool_results:
                turn_id = queries.append_turn(session, conversation, role="user",
                                              content=message, request_id=request_id)
            return conversation, turn_id

        (system_prompt, context), history = await self.db.read(load)
        check_results(history, tool_results, params=result_params)
        if (refused := self.engine.refusal(system_message(system_prompt, context))) is not None:
            raise refused  # e.g. the model failed to load: store no turn that cannot run
        stored_in, user_turn_id = await self.db.write(store)

        messages = []
        system = system_message(system_prompt, context)
        if system:
            messages.append(ChatMessage("system", system))
        messages.extend(m for m in history if m.role in ("user", "assistant", "tool"))
        messages.extend(tool_results)
        if message or not tool_results:
            messages.append(ChatMessage("user", message))
        request = EngineRequest(
            request_id=request_id, conversation_id=stored_in, messages=messages,
            options=options,
            max_new_tokens=options.max_new_tokens or self.default_max_new_tokens,
            constraint=tools.constraint if tools is not None else constraint,
        )
        return TurnInProgress(request_id, stored_in, user_turn_id, request, started=started,
                              tools=tools)

    async def begin_unstored(self, *, request_id: str, agent_id: str, messages: Sequence[ChatMessage],
                             options: GenerationOptions, constraint: Constraint | None = None,
                             tools: ToolUse | None = None) -> TurnInProgress:
        """A turn whose history is the caller's ``messages`` and that stores nothing.

        The agent's system message comes first; the caller's system messages are appended to it
        (chat templates accept one system message, at the start). The engine sees a throwaway
        conversation id; end the turn with :meth:`discard`.
        """
        started = time.perf_counter()
        agent = await self.db.read(lambda session: queries.get_agent(session, agent_id))
        if agent is None:
            raise AgentNotFound(f"agent {agent_id!r} not found")
        systems = [system_message(agent.system_prompt, agent.markdown_context)]
        systems += [m.content for m in messages if m.role == "system"]
        system = "\n\n".join(s for s in systems if s)
        engine_messages = [ChatMessage("system", system)] if system else []
        engine_messages += [m for m in messages if m.role != "system"]
        request = EngineRequest(
            request_id=request_id, conversation_id=f"tmp_{uuid.uuid4().hex}",
            messages=engine_messages, options=options,
            max_new_tokens=options.max_new_tokens or self.default_max_new_tokens,
            constraint=tools.constraint if tools is not None else constraint,
        )
        return TurnInProgress(request_id, request.conversation_id, "", request, stored=False,
                              started=started, tools=tools)

    async def generate(self, turn: TurnInProgress) -> AsyncGenerator[str, None]:
        """Yield the answer's text pieces (the caller keeps those it sent in ``turn.pieces``);
        ``turn.finished`` receives the engine's :class:`Finished`, its usage as the engine
        reported it (:meth:`TurnInProgress.timed` fills the rest once, when the turn ends)."""
        stream = cast(AsyncGenerator[Chunk, None], self.engine.stream(turn.request))
        try:
            async for chunk in stream:
                if isinstance(chunk, TextChunk):
                    if chunk.text:
                        now = time.perf_counter()
                        if turn.last_token_at is None:
                            turn.first_token_at = now
                            self.metrics.first_token.observe(now - turn.started)
                        else:
                            self.metrics.inter_token.observe(now - turn.last_token_at)
                        turn.last_token_at = now
                        yield chunk.text
                elif isinstance(chunk, PromptTokens):
                    turn.prompt_tokens = chunk.count
                elif isinstance(chunk, Finished):
                    turn.finished = chunk
                    return
            raise EngineError("the engine ended the answer without a finish reason")
        finally:
            await stream.aclose()  # cancels the engine's work when we stop early

    async def finish(self, turn: TurnInProgress, reason: FinishReason, usage: Usage) -> str:
        """Store the assistant turn (whatever was streamed) with ``usage`` and return its id."""
        if not turn.stored:
            raise ValueError("an unstored turn ends with discard(), not finish()")
        self.metrics.turn_ended(reason, usage)
        content = turn.answer()
        fields = {"role": "assistant", "content": content, "finish_reason": reason,
                  "tool_calls": calls_json(turn.tool_calls),
                  "prompt_tokens": usage.prompt_tokens,
                  "completion_tokens": usage.completion_tokens,
                  "usage": msgspec.json.encode(usage).decode(), "request_id": turn.request_id}

        def store(session: Session) -> str:  # the writer queue, one transaction
            if not queries.touch_conversation(session, turn.conversation_id):
                raise ConversationNotFound(
                    f"conversation {turn.conversation_id!r} was deleted during the turn")
            return queries.append_turn(session, turn.conversation_id, **fields)

        turn_id = await self.db.write(store)
        if self.transcripts is not None:
            await self.transcripts.update(turn.conversation_id)
        return turn_id

    async def discard(self, turn: TurnInProgress, reason: FinishReason, usage: Usage) -> None:
        """End an unstored turn: nothing is written and the engine forgets its throwaway state."""
        self.metrics.turn_ended(reason, usage)
        turn.answer()  # its calls, for the route
        self.engine.forget(turn.conversation_id)


def _title(message: str) -> str:
    line = message.strip().splitlines()[0] if message.strip() else ""
    return line[:80]

