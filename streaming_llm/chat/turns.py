"""The turn runner: one chat turn from the request to the stored answer, for every route.

A route (the chat socket, ``/v1/chat/completions``) describes the turn (:class:`TurnSpec`) and
hands a :class:`TurnWriter` that formats what the runner gives it in the route's wire format.
:meth:`TurnRunner.run` owns the rest, the same way for both, the order of what a client sees
included: ``start``, then every piece, then exactly one ending (``done`` or ``error``):

1. one turn at a time per conversation (:class:`~streaming_llm.chat.admission.ConversationLocks`):
   a second one waits for the first to be stored (cancellable), then reads the history;
2. a generation slot (:class:`~streaming_llm.chat.admission.GenerationGate`), waited for, held for the
   generation and given back however it ends;
3. the user turn stored and the engine request built (:class:`ConversationManager.begin`);
   :meth:`TurnWriter.start`;
4. the engine's pieces handed to :meth:`TurnWriter.piece` one at a time, each kept in the turn's
   answer (``TurnInProgress.pieces``, the one copy) unless handing it failed: a client that stops
   reading stalls its own turn, never the server's memory;
5. the ending classified, timed (:meth:`TurnInProgress.timed`, once) and stored, whatever it was,
   then :meth:`TurnWriter.end`:

   ===========================================  ===================  ============================
   how the turn ended                           stored reason        the writer gets
   ===========================================  ===================  ============================
   the engine's own finish                      ``stop``/``length``  ``end`` (done)
   :meth:`TurnControl.cancel` (client, shutdown)  ``cancelled``      ``end`` (done)
   the writer raised :class:`ClientGone`        ``cancelled``        nothing; run raises it
   the task was cancelled (disconnect)          ``cancelled``        nothing; CancelledError
   an engine failure, or any bug in between     ``error``            ``end`` (error)
   ===========================================  ===================  ============================

   The user turn is never left without its answer row: storing the user turn finishes even when
   the task is cancelled meanwhile, and then the cancelled answer is stored after it. If the
   answer cannot be stored (the disk filled mid-answer), the next turn of the conversation first
   stores an empty ``error`` answer in its place, so user and assistant turns keep alternating.

Errors before the user turn is stored (unknown agent, limits, ``busy``, the engine refusing, the
database refusing the write) are raised as :class:`~streaming_llm.errors.ServiceError` and leave
nothing behind (the route refuses the request in its own way); :class:`TurnCancelled` says the
turn was cancelled before it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..engines.base import ChatMessage, Constraint, ToolCall
from ..errors import EngineError, ServiceError
from ..wire import FinishReason, GenerationOptions, Usage
from .admission import GenerationGate
from .conversations import ConversationManager, TurnInProgress
from .tool_calls import ToolUse

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """Raised by a :class:`TurnWriter` whose client cannot be written to any more (it went away,
    or stopped reading past the send timeout)."""


class TurnCancelled(Exception):
    """The turn was cancelled before it started: nothing was stored."""


@dataclass(frozen=True)
class TurnSpec:
    """What a client asks for. ``history`` set: an unstored ``/v1`` turn whose history is the
    caller's messages (``conversation_id`` is then ignored)."""

    request_id: str
    agent_id: str
    message: str
    options: GenerationOptions
    conversation_id: str | None = None
    client: str = ""  # the client's address, for the per-client slot cap
    history: Sequence[ChatMessage] | None = None
    # Rooms (chat/rooms.py, chat/rounds.py): agent_id "" lets the room pick the speaker;
    # agent_ids asks several in turn; follow_up is a round's next answer (no user turn to store);
    # locked: the caller holds the conversation's lock already.
    agent_ids: tuple[str, ...] = ()
    follow_up: bool = False
    locked: bool = False
    constraint: Constraint | None = None  # what the answer must match (structured output)
    # tools: what the model may call (its constraint replaces ``constraint``; routes refuse
    # both at once); tool_results: role "tool" messages stored before ``message`` ("" then
    # means results only), each checked against the last answer's calls, a refusal naming its
    # field in result_params.
    tools: ToolUse | None = None
    tool_results: tuple[ChatMessage, ...] = ()
    result_params: tuple[str, ...] = ()

    @property
    def stored(self) -> bool:
        return self.history is None


@dataclass(frozen=True)
class Ending:
    """How a started turn ended. ``failure`` is the engine's error (reason ``error``) or why the
    answer could not be stored (then ``turn_id`` is None). ``pieces`` is the answer."""

    conversation_id: str
    reason: FinishReason
    usage: Usage
    turn_id: str | None
    failure: ServiceError | None = None
    pieces: Sequence[str] = ()
    tool_calls: tuple[ToolCall, ...] = ()  # the calls the answer made
    agent_id: str = ""  # who answered (rooms)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class TurnWriter(Protocol):
    """A route's side of a turn: it writes what the runner hands it in its own wire format."""

    async def start(self, turn: TurnInProgress) -> None:
        """The user turn is stored (``turn.conversation_id``, ``turn.user_turn_id``)."""

    async def piece(self, turn: TurnInProgress, text: str) -> None:
        """One piece of the answer, already the last of ``turn.pieces`` (it is dropped from there
        if this raises); raise :class:`ClientGone` when the client is gone."""

    async def end(self, turn: TurnInProgress, ending: Ending) -> None:
        """The ending, stored; the last call for the turn. Raise :class:`ClientGone` when the
        client is gone (:meth:`TurnRunner.run` then raises it)."""


class TurnControl:
    """Cancels one turn softly: its partial answer is stored as ``cancelled`` and the route still
    writes the ending (a client's ``cancel`` frame, the shutdown's cancel)."""

    def __init__(self) -> None:
        self.cancelled = False
        self._scope: asyncio.Timeout | None = None

    def cancel(self) -> None:
        self.cancelled = True
        if self._scope is not None and not self._scope.expired():
            self._scope.reschedule(-1)  # now: asyncio's cancel scope, converted on leaving it

    @contextlib.asynccontextmanager
    async def cancellable(self) -> AsyncIterator[None]:
        """The block stops at :meth:`cancel`, which then raises :class:`TurnCancelled` here."""
        if self.cancelled:
            raise TurnCancelled
        try:
            async with asyncio.timeout(None) as scope:
                self._scope = scope
                yield
        except TimeoutError:
            if self._scope is not None and self._scope.expired():
                raise TurnCancelled from None
            raise
        finally:
            self._scope = None


class TurnRunner:
    def __init__(self, manager: ConversationManager, gate: GenerationGate) -> None:
        self.manager = manager
        self.gate = gate
        self.locks = manager.locks  # shared with truncation

    async def run(self, spec: TurnSpec, writer: TurnWriter,
                  control: TurnControl | None = None) -> Ending:
        """Run the turn (see the module docstring); the ending is stored when this returns."""
        control = control or TurnControl()
        async with contextlib.AsyncExitStack() as held:
            begin: asyncio.Future[TurnInProgress] | None = None
            turn: TurnInProgress | None = None
            started = False
            failure: ServiceError | None = None
            try:
                async with control.cancellable():
                    # Its turn, then a slot.
                    if spec.stored and spec.conversation_id is not None and not spec.locked:
                        await held.enter_async_context(self.locks.hold(spec.conversation_id))
                    async with self.gate.slot(spec.client):
                        begin = asyncio.ensure_future(self._begin(spec))
                        turn = await asyncio.shield(begin)  # a cancel must not lose the turn
                        if spec.stored and spec.conversation_id is None:  # free: nobody knows it
                            await held.enter_async_context(self.locks.hold(turn.conversation_id))
                        log.info("turn %s started: conversation %s", spec.request_id,
                                 turn.conversation_id)
                        started = True
                        await writer.start(turn)
                        async with contextlib.aclosing(self.manager.generate(turn)) as pieces:
                            async for piece in pieces:
                                # Part of the answer once handed over: a piece whose sending
                                # failed or was cancelled is not (it is neither stored nor
                                # replayed to a resuming client).
                                turn.pieces.append(piece)
                                try:
                                    await writer.piece(turn, piece)
                                except BaseException:
                                    del turn.pieces[-1]
                                    raise
            except TurnCancelled:
                turn = turn or await _landed(begin)
                if turn is None:
                    raise
                if not started:  # cancelled while the user turn was being stored
                    try:
                        await writer.start(turn)
                    except ClientGone:
                        await self._end(turn, None)
                        raise
            except (ClientGone, asyncio.CancelledError):
                # Gone, or the task is being cancelled (disconnect): keep what was streamed.
                turn = turn or await _landed(begin)
                if turn is not None:
                    ending = await self._end(turn, None)
                    log.info("turn %s ended: %s (the client went away)", spec.request_id,
                             ending.reason)
                raise
            except ServiceError as exc:  # EngineError and the storage's errors included
                if turn is None:
                    raise
                failure = exc
            except Exception as exc:  # an engine bug must not kill the route
                if turn is None:
                    raise
                log.exception("turn %s failed", spec.request_id)
                failure = EngineError(f"generation failed: {exc.__class__.__name__}")
            ending = await self._end(turn, failure)
        await writer.end(turn, ending)
        return ending

    async def _begin(self, spec: TurnSpec) -> TurnInProgress:
        if spec.history is not None:
            return await self.manager.begin_unstored(
                request_id=spec.request_id, agent_id=spec.agent_id, messages=spec.history,
                options=spec.options, constraint=spec.constraint, tools=spec.tools)
        return await self.manager.begin(
            request_id=spec.request_id, agent_id=spec.agent_id, message=spec.message,
            conversation_id=spec.conversation_id, options=spec.options,
            agent_ids=spec.agent_ids, follow_up=spec.follow_up, constraint=spec.constraint,
            tools=spec.tools, tool_results=spec.tool_results, result_params=spec.result_params)

    async def _end(self, turn: TurnInProgress, failure: ServiceError | None) -> Ending:
        """Classify and store the ending; runs to completion even while the task is cancelled."""
        reason: FinishReason
        if failure is not None:
            reason, usage = "error", turn.partial_usage()
        elif turn.finished is None:
            reason, usage = "cancelled", turn.partial_usage()
        else:
            reason, usage = turn.finished.reason, turn.timed(turn.finished.usage)
        work = (self.manager.finish(turn, reason, usage) if turn.stored
                else self.manager.discard(turn, reason, usage))
        try:
            turn_id = await asyncio.shield(work)
        except ServiceError as exc:  # storage_unavailable, storage_conflict, deleted meanwhile
            return Ending(turn.conversation_id, reason, usage, None, exc, turn.pieces,
                          turn.tool_calls, turn.agent_id)
        log.info("turn %s finished: %s, %d pieces in %.2fs", turn.request_id, reason,
                 len(turn.pieces), time.perf_counter() - turn.started)
        return Ending(turn.conversation_id, reason, usage, turn_id or None, failure, turn.pieces,
                      turn.tool_calls, turn.agent_id)


async def _landed(begin: asyncio.Future[TurnInProgress] | None) -> TurnInProgress | None:
    """The turn ``begin`` stored, waiting for it to finish even while being cancelled (its
    write is already on the writer thread); None when it stored nothing."""
    if begin is None:
        return None
    while not begin.done():
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.shield(begin)
    if begin.cancelled() or begin.exception() is not None:
        return None
    return begin.result()
