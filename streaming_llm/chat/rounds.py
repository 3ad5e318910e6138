"""A chat frame's answers: one speaker's turn, or a round of several speakers in a room.

:func:`run_answers` runs the first speaker's turn through the
:class:`~streaming_llm.chat.turns.TurnRunner` (it stores the user's message and the answer),
then each further speaker the frame asked for (``agent_ids``, or several ``@mentions``; see
:mod:`.rooms`) as a *follow-up*: no user turn, its prompt the room's transcript including the
answers just given. The room's lock is held for the whole round, so another client's message
cannot land between two answers.

The runner owns each answer's frames (start, pieces, one ending); the round decides which
:class:`RoundWriter` call each of them is: the frame's ``start`` once (a later answer is a
:meth:`RoundWriter.next_answer`), and every answer's ending an :meth:`RoundWriter.answered`
except the round's last, which is the writer's one :meth:`~.turns.TurnWriter.end`.

A round stops early, storing nothing more, when an answer did not end normally (cancelled,
failed, not stored); then that answer's ending is the ``end``. When a later speaker cannot
answer any more (removed from the room, deleted: its ``begin`` raises, nothing of its answer is
stored, the answers before it stay; or the round was cancelled while it waited for its slot),
:class:`SpeakerRefused` is raised for the route to write as the round's last frame.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Protocol

from ..errors import ServiceError
from .conversations import TurnInProgress
from .turns import Ending, TurnCancelled, TurnControl, TurnRunner, TurnSpec, TurnWriter


class SpeakerRefused(ServiceError):
    """A round's later speaker could not answer (its ``begin`` refused it, or the round was
    cancelled before it started): the refusal's code and message, ``agent_id`` naming that
    speaker, in ``conversation_id``."""

    def __init__(self, cause: ServiceError, agent_id: str, conversation_id: str) -> None:
        super().__init__(cause.message, code=cause.code, status=cause.status)
        self.agent_id = agent_id
        self.conversation_id = conversation_id


class RoundWriter(TurnWriter, Protocol):
    """A route's writer that can take a round: the runner's calls plus the two a round adds."""

    async def next_answer(self, turn: TurnInProgress) -> None:
        """A round's next answer began (``turn.agent_id`` answers; no new ``start``): its
        pieces follow the earlier answers' pieces."""

    async def answered(self, turn: TurnInProgress, ending: Ending) -> None:
        """A round's answer ended, stored, and the next speaker follows: its ending (``done``),
        not the last call for the frame."""


class _RoundAnswer:
    """One answer of a round, as the runner's writer: routes its start and ending to the
    :class:`RoundWriter` call that this place in the round needs."""

    def __init__(self, writer: RoundWriter, control: TurnControl, first: bool,
                 later: list[str] | None = None) -> None:
        self.writer = writer
        self.control = control
        self.first = first
        self.later = later  # the speakers after this one; None until the first answer starts
        self.goes_on = False  # the round continues after this answer

    async def start(self, turn: TurnInProgress) -> None:
        if self.first:
            self.later = list(turn.speakers[1:])
            await self.writer.start(turn)
        else:
            await self.writer.next_answer(turn)

    async def piece(self, turn: TurnInProgress, text: str) -> None:
        await self.writer.piece(turn, text)

    async def end(self, turn: TurnInProgress, ending: Ending) -> None:
        self.goes_on = bool(self.later) and not self.control.cancelled and (
            ending.failure is None and ending.turn_id is not None
            and ending.reason in ("stop", "length"))
        await (self.writer.answered(turn, ending) if self.goes_on
               else self.writer.end(turn, ending))


async def run_answers(runner: TurnRunner, spec: TurnSpec, writer: RoundWriter,
                      control: TurnControl) -> Ending:
    """Run every answer the frame asks for and return the last one's ending. Raises what
    :meth:`TurnRunner.run` raises for the first answer; for a later one refused before it
    started, :class:`SpeakerRefused` (the route writes it as the round's last frame)."""
    if not spec.stored:
        return await runner.run(spec, writer, control)
    async with contextlib.AsyncExitStack() as held:
        if spec.conversation_id is not None:
            async with control.cancellable():  # a cancel while waiting: nothing was stored
                await held.enter_async_context(runner.locks.hold(spec.conversation_id))
            spec = dataclasses.replace(spec, locked=True)
        answer = _RoundAnswer(writer, control, first=True)
        ending = await runner.run(spec, answer, control)
        later = answer.later or []
        if later and spec.conversation_id is None:  # a room the first answer created
            await held.enter_async_context(runner.locks.hold(ending.conversation_id))
        for i, agent_id in enumerate(later):
            if not answer.goes_on:
                break
            follow = dataclasses.replace(spec, agent_id=agent_id, agent_ids=(),
                                         conversation_id=ending.conversation_id,
                                         follow_up=True, locked=True, tool_results=(),
                                         result_params=())  # the first answer took the results
            answer = _RoundAnswer(writer, control, first=False, later=later[i + 1:])
            try:
                ending = await runner.run(follow, answer, control)
            except ServiceError as exc:
                raise SpeakerRefused(exc, agent_id, ending.conversation_id) from exc
            except TurnCancelled:
                raise SpeakerRefused(ServiceError("the round was cancelled before this speaker "
                                                  "started", code="cancelled"),
                                     agent_id, ending.conversation_id) from None
    return ending
