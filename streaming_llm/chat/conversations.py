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
from ..errors import (
    AgentNotFound,
    BadRequest,
    ConversationNotFound,
    EngineError,
    ValidationFailed,
)
from ..ids import check_conversation_id
from ..metrics import Metrics
from ..protocol import AgentId
from ..storage import queries
from ..storage.database import Database
from ..storage.models import ConversationRow, TurnRow
from ..wire import FinishReason, GenerationOptions, Usage
from . import rooms
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
    agent_id: str | None  # who spoke an assistant turn; None (sent as null) for the user's
    tool_calls: list[ToolCall] | None = None  # an assistant turn's calls (left out: none)
    tool_call_id: str | None = None  # a tool turn: the call it answers


class ConversationSummary(msgspec.Struct):
    id: str
    agent_id: str  # the first participant
    title: str
    created_at: str
    updated_at: str
    agent_ids: list[str] = []  # the participants in order: one, or several in a room


#: A room's participants: 1 to 16 distinct agents, in order.
AgentIds = Annotated[list[AgentId], Meta(min_length=1, max_length=rooms.MAX_PARTICIPANTS,
                                         extra_json_schema={"uniqueItems": True})]


class ConversationCreate(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /conversations``: a room of ``agent_ids`` (one agent: a plain conversation)."""

    agent_ids: AgentIds
    title: Annotated[str, Meta(max_length=200)] = ""


class ConversationPatch(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``PATCH /conversations/{id}``: what may change about a conversation — its title,
    its participants (the new list, in order: agents added, dropped, reordered)."""

    title: Annotated[str, Meta(min_length=1, max_length=200)] | msgspec.UnsetType = msgspec.UNSET
    agent_ids: AgentIds | msgspec.UnsetType = msgspec.UNSET


#: The body ``PATCH`` takes, as the OpenAPI document describes it: at least one field.
ConversationPatchBody = Annotated[ConversationPatch, Meta(extra_json_schema={"minProperties": 1})]


class ConversationView(msgspec.Struct):
    id: str
    agent_id: str
    title: str
    created_at: str
    updated_at: str
    turns: list[TurnView]
    agent_ids: list[str] = []


def _turn_view(row: TurnRow) -> TurnView:
    usage = msgspec.json.decode(row.usage) if row.usage else None
    return TurnView(row.id, row.seq, row.role, row.content, row.finish_reason, usage, row.created_at,
                    row.agent_id, list(calls_from_json(row.tool_calls)) or None, row.tool_call_id)


def _said(row: TurnRow) -> rooms.Said:
    """A stored turn as the transcript shows it, with its tool calls or call id."""
    return rooms.Said(row.role, row.agent_id, row.content, calls_from_json(row.tool_calls),
                      row.tool_call_id)


def _summary(row: ConversationRow, agent_ids: list[str]) -> ConversationSummary:
    return ConversationSummary(row.id, row.agent_id, row.title, row.created_at, row.updated_at,
                               agent_ids or [row.agent_id])


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
    agent_id: str = ""  # who answers (stored with the answer)
    speakers: list[str] = field(default_factory=list)  # the chat frame's, in order (rooms)
    room: bool = False  # the conversation has several agents

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
        def load(session: Session) -> list[ConversationSummary]:
            rows = queries.list_conversations(session, agent_id=agent_id, limit=limit,
                                              offset=offset, search=search)
            agents = queries.participants_of(session, [r.id for r in rows])
            return [_summary(r, agents[r.id]) for r in rows]

        return await self.db.read(load)

    async def rename(self, conversation_id: str, title: str) -> ConversationSummary:
        return await self.update(conversation_id, ConversationPatch(title=title))

    # rooms --------------------------------------------------------------------------------------
    async def create(self, body: ConversationCreate) -> ConversationSummary:
        """A new conversation of ``body.agent_ids``: a room when several (see :mod:`.rooms`)."""
        agent_ids = rooms.check_participants(body.agent_ids)

        def store(session: Session) -> ConversationSummary:
            _check_agents_exist(session, agent_ids)
            conversation_id = queries.create_conversation(session, agent_ids[0], body.title,
                                                          agent_ids=agent_ids)
            row = queries.get_conversation(session, conversation_id)
            assert row is not None
            return _summary(row, agent_ids)

        return await self.db.write(store)

    async def update(self, conversation_id: str, patch: ConversationPatch) -> ConversationSummary:
        """Rename and/or set the participants. A new list of participants makes the engine
        forget the conversation's caches (each agent's prompt in a room differs from its prompt
        alone); a participant removed keeps its past turns, shown to the others by its name."""
        check_conversation_id(conversation_id)
        title = None if isinstance(patch.title, msgspec.UnsetType) else patch.title
        asked = None if isinstance(patch.agent_ids, msgspec.UnsetType) else patch.agent_ids
        if title is None and asked is None:
            raise ValidationFailed("nothing to change: send title and/or agent_ids")
        agent_ids = None if asked is None else rooms.check_participants(asked)

        def store(session: Session) -> tuple[ConversationSummary, list[str]]:
            if not queries.touch_conversation(session, conversation_id):  # locks its row
                raise ConversationNotFound(f"conversation {conversation_id!r} not found")
            before = queries.list_participants(session, conversation_id)
            if agent_ids is not None and agent_ids != before:
                _check_agents_exist(session, [a for a in agent_ids if a not in before])
                queries.set_participants(session, conversation_id, agent_ids)
            if title is not None:
                queries.rename_conversation(session, conversation_id, title)
            row = queries.get_conversation(session, conversation_id)
            assert row is not None
            session.refresh(row)
            return _summary(row, agent_ids or before), before

        summary, before = await self.db.write(store)
        if agent_ids is not None and agent_ids != before:
            for key in rooms.cache_keys(conversation_id, {*before, *agent_ids}):
                self.engine.forget(key)
        return summary

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

        def load(session: Session) -> tuple[ConversationRow, list[TurnRow], list[str]]:
            row = queries.get_conversation(session, conversation_id)
            if row is None:
                raise ConversationNotFound(f"conversation {conversation_id!r} not found")
            return (row, queries.list_turns(session, conversation_id),
                    queries.list_participants(session, conversation_id))

        row, turns, agent_ids = await self.db.read(load)
        return ConversationView(row.id, row.agent_id, row.title, row.created_at, row.updated_at,
                                [_turn_view(t) for t in turns], agent_ids or [row.agent_id])

    async def delete(self, conversation_id: str) -> None:
        check_conversation_id(conversation_id)

        def store(session: Session) -> list[str] | None:
            participants = queries.list_participants(session, conversation_id)
            return participants if queries.delete_conversation(session, conversation_id) else None

        participants = await self.db.write(store)
        if participants is None:
            raise ConversationNotFound(f"conversation {conversation_id!r} not found")
        # Every participant's cache in a room; the conversation's own key otherwise.
        for key in ([conversation_id] if not rooms.is_room(participants)
                    else rooms.cache_keys(conversation_id, participants)[1:]):
            self.engine.forget(key)
        if self.transcripts is not None:
            await self.transcripts.remove(conversation_id)

    # chat ---------------------------------------------------------------------------------------
    async def begin(self, *, request_id: str, agent_id: str, message: str,
                    conversation_id: str | None, options: GenerationOptions,
                    agent_ids: Sequence[str] = (), follow_up: bool = False,
                    constraint: Constraint | None = None, tools: ToolUse | None = None,
                    tool_results: Sequence[ChatMessage] = (),
                    result_params: Sequence[str] = ()) -> TurnInProgress:
        """Validate, store the user turn, and build the engine request (history + new message).

        ``agent_id`` ("" for none) or ``agent_ids`` (a round) name who answers; in a room an
        ``@mention`` may (see :mod:`.rooms`), and the turn answers as the first of them.
        ``follow_up``: the answer of ``agent_id``, the next speaker of a round whose user turn
        is stored already; nothing is stored before its answer.

        ``tool_results`` (role ``tool``) are stored before the user turn and must answer calls
        of the last stored answer; ``message`` may then be "" (no user turn). ``tools``' own
        constraint replaces ``constraint``.
        """
        started = time.perf_counter()
        if conversation_id is not None:
            check_conversation_id(conversation_id)

        def load(session: Session) -> _Plan:
            # A read: on SQLite the history may be long, and the writer must not wait for it.
            named = list(agent_ids) if agent_ids else [agent_id] if agent_id else []
            for named_id in named:  # an unknown agent is that, whatever the conversation
                if queries.get_agent(session, named_id) is None:
                    raise AgentNotFound(f"agent {named_id!r} not found")
            transcript: list[rooms.Said] = []
            if conversation_id is None:
                if not named:
                    raise rooms.NoSpeaker("name agent_id or agent_ids to start a conversation")
                participants = speakers = rooms.check_participants(named)
            else:
                conversation = queries.get_conversation(session, conversation_id)
                if conversation is None:
                    raise ConversationNotFound(f"conversation {conversation_id!r} not found")
                participants = (queries.list_participants(session, conversation_id)
                                or [conversation.agent_id])
                speakers = rooms.pick_speakers(participants, conversation_id=conversation_id,
                                               agent_id=agent_id, agent_ids=agent_ids,
                                               message=message)
                transcript = [_said(t) for t in queries.list_turns(session, conversation_id)]
            speaker = queries.get_agent(session, speakers[0])
            if speaker is None:  # an @mentioned participant deleted since
                raise AgentNotFound(f"agent {speakers[0]!r} not found")
            names = {speaker.id: speaker.name}
            for other in {s.agent_id for s in transcript if s.agent_id} - names.keys():
                if (row := queries.get_agent(session, other)) is not None:
                    names[other] = row.name
            return _Plan(participants, speakers, system_message(speaker.system_prompt,
                                                                speaker.markdown_context),
                         names, transcript)

        def store(session: Session) -> tuple[str, str]:  # the writer queue, one transaction
            if conversation_id is None:
                conversation = queries.create_conversation(
                    session, plan.speakers[0], _title(message), agent_ids=plan.participants)
            elif queries.touch_conversation(session, conversation_id):
                conversation = conversation_id
                # The participants may have changed since the read (a PATCH): check again, in
                # the transaction that stores, so a speaker removed meanwhile stores nothing.
                now = queries.list_participants(session, conversation) or plan.participants
                for speaker in plan.speakers:
                    rooms.check_speaker(now, conversation, speaker)
            else:  # deleted since it was read
                raise ConversationNotFound(f"conversation {conversation_id!r} not found")
            if follow_up:
                return conversation, ""
            history = plan.transcript
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

        plan = await self.db.read(load)
        check_results([ChatMessage(s.role, s.content, s.tool_calls, s.tool_call_id)  # type: ignore[arg-type]
                       for s in plan.transcript], tool_results, params=result_params)
        if (refused := self.engine.refusal(plan.system)) is not None:
            raise refused  # e.g. the model failed to load: store no turn that cannot run
        stored_in, user_turn_id = await self.db.write(store)

        speaker = plan.speakers[0]
        said = list(plan.transcript)
        if not follow_up:
            said += [rooms.Said("tool", None, r.content, (), r.tool_call_id) for r in tool_results]
            if message or not tool_results:
                said.append(rooms.Said("user", None, message))
        messages = rooms.speaker_messages(speaker, plan.system, said, plan.names)
        request = EngineRequest(
            request_id=request_id,
            conversation_id=rooms.cache_key(stored_in, speaker, plan.participants),
            messages=messages, options=options,
            max_new_tokens=options.max_new_tokens or self.default_max_new_tokens,
            constraint=tools.constraint if tools is not None else constraint,
        )
        return TurnInProgress(request_id, stored_in, user_turn_id, request, started=started,
                              tools=tools, agent_id=speaker, speakers=plan.speakers,
                              room=rooms.is_room(plan.participants))

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
                  "tool_calls": calls_json(turn.tool_calls), "agent_id": turn.agent_id or None,
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


@dataclass(frozen=True)
class _Plan:
    """What :meth:`ConversationManager.begin` read: who takes part, who answers (the first of
    ``speakers``) with its system message, the names of the transcript's speakers."""

    participants: list[str]
    speakers: list[str]
    system: str
    names: dict[str, str]
    transcript: list[rooms.Said]


def _check_agents_exist(session: Session, agent_ids: Sequence[str]) -> None:
    for agent_id in agent_ids:
        if queries.get_agent(session, agent_id) is None:
            raise AgentNotFound(f"agent {agent_id!r} not found")


def _title(message: str) -> str:
    line = message.strip().splitlines()[0] if message.strip() else ""
    return line[:80]

