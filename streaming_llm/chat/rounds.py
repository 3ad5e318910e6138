"""A chat frame's answers: one speaker's turn, or a round of several speakers in a room.

:func:`run_answers` runs the first speaker's turn through the
:class:`~streaming_llm.chat.turns.TurnRunner` (it stores the user's message and the answer, and
the writer's ``start`` goes out once), then each further speaker the frame asked for
(``agent_ids``, or several ``@mentions``; see :mod:`.rooms`) as a *follow-up*: no user turn, the
same writer, its prompt the room's transcript including the answers just given. The room's lock
is held for the whole round, so another client's message cannot land between two answers.

A round stops early, storing nothing more, when an answer did not end normally (cancelled,
failed, not stored) or a later speaker cannot answer any more (removed from the room, deleted:
its ``begin`` raises, nothing of its answer is stored, the answers before it stay).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Awaitable, Callable

from ..errors import ServiceError
from .conversations import Turn
from .turns import Ending, TurnControl, TurnRunner, TurnSpec, TurnWriter


class SpeakerRefused(ServiceError):
    """A round's later speaker could not answer (its ``begin`` refused it): the refusal's code
    and message, and ``agent_id`` naming that speaker."""

    def __init__(self, cause: ServiceError, agent_id: str) -> None:
        super().__init__(cause.message, code=cause.code, status=cause.status)
        self.agent_id = agent_id


class _Speakers:
    """The route's writer, noting who the frame's speakers are when the user turn is stored."""

    def __init__(self, writer: TurnWriter) -> None:
        self.writer = writer
        self.speakers: list[str] = []

    async def start(self, turn: Turn) -> None:
        self.speakers = list(turn.speakers)
        await self.writer.start(turn)

    async def piece(self, turn: Turn, text: str) -> None:
        await self.writer.piece(turn, text)


async def run_answers(runner: TurnRunner, spec: TurnSpec, writer: TurnWriter,
                      control: TurnControl,
                      answered: Callable[[Ending], Awaitable[None]]) -> Ending:
    """Run every answer the frame asks for and return the last one's ending; each earlier
    ending goes to ``answered`` (the route writes its ``done``) before the next speaker starts.
    Raises what :meth:`TurnRunner.run` raises for the first answer; for a later one refused
    before it started, :class:`SpeakerRefused` (the route writes it as the round's ``error``)."""
    if not spec.stored:
        return await runner.run(spec, writer, control)
    noted = _Speakers(writer)
    async with contextlib.AsyncExitStack() as held:
        if spec.conversation_id is not None:
            async with control.cancellable():  # a cancel while waiting: nothing was stored
                await held.enter_async_context(runner.locks.hold(spec.conversation_id))
            spec = dataclasses.replace(spec, locked=True)
        ending = await runner.run(spec, noted, control)
        later = noted.speakers[1:]
        if later and spec.conversation_id is None:  # a room the first answer created
            await held.enter_async_context(runner.locks.hold(ending.conversation_id))
        for agent_id in later:
            if (ending.failure is not None or ending.turn_id is None or control.cancelled
                    or ending.reason not in ("stop", "length")):
                break
            await answered(ending)
            follow = dataclasses.replace(spec, agent_id=agent_id, agent_ids=(),
                                         conversation_id=ending.conversation_id,
                                         follow_up=True, locked=True)
            try:
                ending = await runner.run(follow, writer, control)
            except ServiceError as exc:
                raise SpeakerRefused(exc, agent_id) from exc
    return ending
