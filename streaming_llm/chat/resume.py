"""Resume after reconnect: the chat socket's turns, kept by request id, so that a client whose
socket dropped can pick its answer up on a new one (``{"type": "resume", "request_id", "after_seq"}``).

Every started turn of the chat socket is kept here (:class:`ResumableTurns`) as a
:class:`ResumableTurn`, which owns what the socket side of a turn needs: the answer streamed so
far (the runner's own list of pieces, not a copy; piece ``seq`` is its index), how far the live
writer got (``delivered``), the ending frame once there is one (``done`` or ``error``), and the
socket it is written to now (its :class:`Listener`, None while no client is attached). When the
listener goes away mid-answer the turn is *detached*: it keeps generating into its pieces for
``STREAMING_LLM_RESUME_GRACE_S`` seconds, then it is cancelled as a client's cancel would be
(stored ``cancelled``). It holds its generation slot meanwhile.

A ``resume`` replays the pieces after ``after_seq`` and then, if the turn still generates,
attaches the new socket so the rest goes out live; if it ended, the ending frame follows the
replay. A turn is kept for the grace period after it ended (a client that lost the ``done`` can
still get it), then forgotten: its resume is ``unknown_request``. When API keys are configured a
turn belongs to the key that started it, and another key's resume is ``unknown_request`` too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, overload

import msgspec

from ..protocol import Token
from .turns import ClientGone

log = logging.getLogger(__name__)

REPLAY_BATCH = 256  # pieces per replayed ``token`` frame
#: Pieces that may wait for the socket (and go out in one ``token`` frame) before the turn waits.
MAX_PENDING = 256


class Listener(Protocol):
    """A chat socket that frames of a resumable turn can be written to."""

    attached: set[ResumableTurn]
    closed: bool  # nothing more can be sent to it

    async def send(self, frame: msgspec.Struct) -> None:
        """Send one frame; raise :class:`~.turns.ClientGone` when it cannot go out."""


class RoundPieces(Sequence[str]):
    """A round's answers as one run of pieces, so that ``seq`` runs on across the round (see
    :mod:`.rounds`). Each answer's list is the runner's own, not a copy: the last one grows as
    it is generated."""

    def __init__(self, answers: list[Sequence[str]]) -> None:
        self.answers = answers

    def __len__(self) -> int:
        return sum(map(len, self.answers))

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, int):
            found = self[index:index + 1] if index >= 0 else self[len(self) + index:][:1]
            if not found:
                raise IndexError(index)
            return found[0]
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise ValueError("a round's pieces are read in runs")
        out: list[str] = []
        for answer in self.answers:
            if start < len(answer) and stop > 0:
                out.extend(answer[max(start, 0):stop])
            start, stop = start - len(answer), stop - len(answer)
        return out


@dataclass(eq=False)
class ResumableTurn:
    """One started turn of the chat socket: what was streamed, how it ended, where it goes now,
    and the live writer that sends new pieces to whichever socket listens."""

    request_id: str
    owner: str  # the API key's id, "" without keys
    cancel: Callable[[], None]  # the turn's soft cancel (TurnControl.cancel)
    registry: ResumableTurns
    origin: Listener | None = None  # the socket it was started on
    # The runner's answer (shared, not copied); a round's answers, one after the other.
    pieces: Sequence[str] = field(default_factory=list)
    may_detach: Callable[[], bool] = lambda: False  # may a gone listener leave it generating?
    delivered: int = 0  # pieces handed to the listener (the live writer's cursor)
    final: msgspec.Struct | None = None  # done / error, once the turn ended
    listener: Listener | None = None
    expired: bool = False  # cancelled because nobody resumed it in time
    lost: ClientGone | None = None  # the live writer could not write and may not detach
    agent_id: str | None = None  # in a room: whose answer the live pieces are (on each token)
    _timer: asyncio.TimerHandle | None = None
    _attach: int = 0  # bumped by every resume: an older replay stops
    _sender: asyncio.Task[None] | None = None  # writes the pieces (see :meth:`wake`)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)  # pieces to write
    _drained: asyncio.Event = field(default_factory=asyncio.Event)  # nothing left to write

    @property
    def detached(self) -> bool:
        """Still generating with nobody to write to."""
        return self.final is None and self.listener is None

    @property
    def pending(self) -> int:
        """Pieces not yet handed to the listener."""
        return len(self.pieces) - self.delivered

    # attaching ----------------------------------------------------------------------------------
    def attach(self, listener: Listener) -> None:
        self._stop_timer()
        if self.listener is not None:
            self.listener.attached.discard(self)
        self.listener = listener
        listener.attached.add(self)

    def detach(self) -> None:
        """The listener's client is gone: generate on, for the grace period."""
        if self.listener is not None:
            self.listener.attached.discard(self)
            self.listener = None
        if self.final is None and self._timer is None and self.registry.enabled:
            log.info("turn %s: client gone, kept generating for %gs for a resume",
                     self.request_id, self.registry.grace_s)
            self._timer = asyncio.get_running_loop().call_later(self.registry.grace_s,
                                                                self._expire)

    def _expire(self) -> None:
        self._timer = None
        if self.detached:
            log.info("turn %s: no resume within %gs; cancelling it", self.request_id,
                     self.registry.grace_s)
            self.expired = True
            self.registry.forget(self)
            self.cancel()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # the live writer ----------------------------------------------------------------------------
    async def send(self, frame: msgspec.Struct) -> None:
        """Write a frame to the listener; a gone client detaches the turn (when it may)."""
        listener = self.listener
        if listener is None:
            return  # detached: the frame is kept for a resume
        try:
            await listener.send(frame)
        except ClientGone:
            if not self.may_detach():
                raise
            if self.listener is listener:
                self.detach()

    async def wrote(self) -> None:
        """The runner added a piece to :attr:`pieces`: hand it to the sender.

        A client that keeps up gets every piece in a frame of its own as soon as the engine
        waits for its next one; only pieces that came while the previous frame was being
        written share a frame (``count`` > 1). At most :data:`MAX_PENDING` pieces wait: then
        the turn waits for the client, and the send timeout still ends it. Raises what the
        listener raised when it is gone and the turn may not detach.
        """
        if self.lost is not None:
            raise self.lost
        self._wake.set()
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_pieces(),
                                               name=f"send-{self.request_id}")
        if self.pending >= MAX_PENDING:
            await self._flush()
            if self.lost is not None:
                raise self.lost

    async def _send_pieces(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while (listener := self.listener) is not None and self.delivered < len(self.pieces):
                first = self.delivered
                batch = self.pieces[first:first + MAX_PENDING]
                self.delivered = first + len(batch)
                text = batch[0] if len(batch) == 1 else "".join(batch)
                try:
                    await listener.send(Token(self.request_id, text, first, len(batch),
                                              self.agent_id))
                except ClientGone as exc:
                    if not self.may_detach():
                        self.lost = exc
                        self._drained.set()
                        return
                    if self.listener is listener:
                        self.detach()
            self._drained.set()

    async def _flush(self) -> None:
        """Wait until the waiting pieces are written (or the client is gone)."""
        while (self._sender is not None and not self._sender.done()
               and self.listener is not None and self.delivered < len(self.pieces)):
            self._drained.clear()
            self._wake.set()
            await self._drained.wait()

    async def answered(self, frame: msgspec.Struct) -> None:
        """A round's answer ended and another follows: its ``done``, after its pieces. (Not kept
        for a resume: a resume replays the pieces and the round's final ending.)"""
        await self._flush()
        await self.send(frame)

    def next_answer(self, pieces: Sequence[str], agent_id: str | None) -> None:
        """A round's next answer: its pieces (the runner's) follow the earlier answers'."""
        earlier = self.pieces.answers if isinstance(self.pieces, RoundPieces) else [self.pieces]
        self.pieces = RoundPieces([*earlier, pieces])
        self.agent_id = agent_id

    def stop(self) -> None:
        """The turn's task is over: no more pieces to write."""
        if self._sender is not None:
            self._sender.cancel()

    async def end(self, frame: msgspec.Struct) -> None:
        """The ending (``done``/``error``), after the pieces: kept for a resume, written if a
        client is there."""
        await self._flush()
        self.stop()
        self.ended(frame)
        await self.send(frame)

    def ended(self, frame: msgspec.Struct) -> None:
        """The turn's ending frame; the turn stays resumable for the grace period."""
        self.final = frame
        self._stop_timer()
        if self.expired or not self.registry.enabled:
            self.registry.forget(self)
        else:
            self._timer = asyncio.get_running_loop().call_later(
                self.registry.grace_s, self.registry.forget, self)
            self.registry.hold(self)

    def abandon(self) -> None:
        """The turn's task is over without an ending frame (its client went away and it could
        not wait for a resume, or it was cancelled): nothing to resume."""
        self.stop()
        if self.final is None:
            self._stop_timer()
            self.registry.forget(self)

    # resume -------------------------------------------------------------------------------------
    async def replay(self, listener: Listener, after_seq: int) -> None:
        """Send the pieces after ``after_seq`` to ``listener``, then the ending or the live rest.

        Raises what the listener raises (``turns.ClientGone``) when it goes away meanwhile; the
        turn is then detached again.
        """
        if self.final is None:  # running: it is attached now, no longer cancelled for want of one
            self._stop_timer()  # (an ended one keeps its forget timer: replays do not extend it)
        if self.listener is not None:  # another socket had it (a resume before its drop was seen)
            self.listener.attached.discard(self)
            self.listener = None
        self._attach += 1
        mine = self._attach
        sent = max(after_seq + 1, 0)
        try:
            while True:
                while sent < len(self.pieces):
                    batch = self.pieces[sent:sent + REPLAY_BATCH]
                    await listener.send(Token(self.request_id, "".join(batch), sent, len(batch)))
                    sent += len(batch)
                    if self._attach != mine:
                        return  # a newer resume took over
                # No await from here on: a piece or the ending arriving now waits for the listener.
                if self.final is not None:
                    await listener.send(self.final)
                else:
                    self.delivered = sent
                    self.attach(listener)
                return
        except BaseException:
            if self._attach == mine and self.listener is None:
                self.detach()
            raise


class ResumableTurns:
    """The resumable turns of one app, by owner and request id.

    It is drained on shutdown like a chat socket (:class:`~streaming_llm.http.shutdown.LiveSockets`):
    a detached turn counts as running and is cancelled with the rest after the grace.
    """

    def __init__(self, grace_s: float, max_chars: int = 16_000_000) -> None:
        self.grace_s = grace_s
        self.max_chars = max_chars
        self._turns: dict[tuple[str, str], ResumableTurn] = {}
        # Ended turns in the order they ended, with the characters of their answers: running
        # ones hold a generation slot each, ended ones only this bound.
        self._ended: dict[ResumableTurn, int] = {}
        self.held_chars = 0

    def __len__(self) -> int:
        return len(self._turns)

    def __iter__(self) -> Iterator[ResumableTurn]:
        return iter(list(self._turns.values()))

    @property
    def enabled(self) -> bool:
        return self.grace_s > 0

    def keep(self, request_id: str, owner: str, cancel: Callable[[], None], origin: Listener,
             pieces: list[str], may_detach: Callable[[], bool],
             agent_id: str | None = None) -> ResumableTurn:
        """Keep a turn started on ``origin`` (a later one with the same owner and id replaces
        it), attached to it; ``pieces`` is the runner's answer, appended to as it grows;
        ``agent_id`` (in a room) names the speaker on its tokens."""
        turn = ResumableTurn(request_id, owner, cancel, self, origin, pieces, may_detach,
                             agent_id=agent_id)
        if self.enabled:
            self._turns[owner, request_id] = turn
        turn.attach(origin)
        return turn

    def get(self, owner: str, request_id: str) -> ResumableTurn | None:
        return self._turns.get((owner, request_id))

    def forget(self, turn: ResumableTurn) -> None:
        if self._turns.get((turn.owner, turn.request_id)) is turn:
            del self._turns[turn.owner, turn.request_id]
        self.held_chars -= self._ended.pop(turn, 0)

    def hold(self, turn: ResumableTurn) -> None:
        """Keep an ended turn's answer for its grace, within :attr:`max_chars` in all: the
        oldest ended answers are forgotten first."""
        if self._turns.get((turn.owner, turn.request_id)) is not turn:
            return
        size = sum(map(len, turn.pieces))
        self._ended[turn] = size
        self.held_chars += size
        while self.held_chars > self.max_chars and self._ended:
            oldest = next(iter(self._ended))
            log.info("turn %s: forgotten before its grace, %d characters of ended answers are "
                     "kept for a resume (STREAMING_LLM_RESUME_MAX_CHARS)", oldest.request_id,
                     self.max_chars)
            self.forget(oldest)

    # Drainable (shutdown) ------------------------------------------------------------------------
    def _drained(self) -> list[ResumableTurn]:
        # Running turns no socket drains: detached ones, and those resumed on another socket.
        return [t for t in self._turns.values() if t.final is None and t.listener is not t.origin]

    @property
    def busy(self) -> bool:
        return bool(self._drained())

    async def cancel(self, request_id: str | None) -> None:
        for turn in self._drained():
            turn.cancel()

    async def close(self, code: int, reason: str) -> None:
        """Nothing to close: detached turns have no socket."""
