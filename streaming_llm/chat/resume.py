"""Resume after reconnect: the chat socket's turns, kept by request id, so that a client whose
socket dropped can pick its answer up on a new one (``{"type": "resume", "request_id", "after_seq"}``).

Every started turn of the chat socket is kept here (:class:`ResumableTurns`) as a
:class:`Replayable`: the pieces streamed so far (piece ``seq`` is its index), the ending frame once
there is one (``done`` or ``error``), and the socket it is written to now (its *sink*, None while
no client is attached). When the sink's client goes away mid-answer the turn is *detached*: it
keeps generating into its pieces for ``STREAMING_LLM_RESUME_GRACE_S`` seconds, then it is cancelled
as a client's cancel would be (stored ``cancelled``). It holds its generation slot meanwhile.

A ``resume`` replays the pieces after ``after_seq`` and then, if the turn still generates,
attaches the new socket so the rest goes out live; if it ended, the ending frame follows the
replay. A turn is kept for the grace period after it ended (a client that lost the ``done`` can
still get it), then forgotten: its resume is ``unknown_request``. When API keys are configured a
turn belongs to the key that started it, and another key's resume is ``unknown_request`` too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from ..protocol import Token

log = logging.getLogger(__name__)

REPLAY_BATCH = 256  # pieces per replayed ``token`` frame


class Sink(Protocol):
    """A chat socket that frames of a resumable turn can be written to."""

    attached: set[Replayable]

    async def send(self, frame: msgspec.Struct) -> None: ...


@dataclass(eq=False)
class Replayable:
    """One started turn: what was streamed, how it ended, and where it goes now."""

    request_id: str
    owner: str  # the API key's id, "" without keys
    cancel: Callable[[], None]  # the turn's soft cancel (TurnControl.cancel)
    registry: ResumableTurns
    origin: Sink | None = None  # the socket it was started on
    pieces: list[str] = field(default_factory=list)
    delivered: int = 0  # pieces handed to the sink (the live writer's cursor)
    final: msgspec.Struct | None = None  # done / error, once the turn ended
    sink: Sink | None = None
    expired: bool = False  # cancelled because nobody resumed it in time
    _timer: asyncio.TimerHandle | None = None
    _attach: int = 0  # bumped by every resume: an older replay stops

    @property
    def detached(self) -> bool:
        """Still generating with nobody to write to."""
        return self.final is None and self.sink is None

    def attach(self, sink: Sink) -> None:
        self._stop_timer()
        if self.sink is not None:
            self.sink.attached.discard(self)
        self.sink = sink
        sink.attached.add(self)

    def detach(self) -> None:
        """The sink's client is gone: generate on, for the grace period."""
        if self.sink is not None:
            self.sink.attached.discard(self)
            self.sink = None
        if self.final is None and self._timer is None and self.registry.enabled:
            log.info("turn %s: client gone, kept generating for %gs for a resume",
                     self.request_id, self.registry.grace_s)
            self._timer = asyncio.get_running_loop().call_later(self.registry.grace_s,
                                                                self._expire)

    def ended(self, frame: msgspec.Struct) -> None:
        """The turn's ending frame; the turn stays resumable for the grace period."""
        self.final = frame
        self._stop_timer()
        if self.expired or not self.registry.enabled:
            self.registry.forget(self)
        else:
            self._timer = asyncio.get_running_loop().call_later(
                self.registry.grace_s, self.registry.forget, self)

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

    async def replay(self, sink: Sink, after_seq: int) -> None:
        """Send the pieces after ``after_seq`` to ``sink``, then the ending or the live rest.

        Raises what the sink raises (``turns.ClientGone``) when it goes away meanwhile; the turn
        is then detached again.
        """
        self._stop_timer()
        if self.sink is not None:  # another socket had it (a resume before its drop was seen)
            self.sink.attached.discard(self)
            self.sink = None
        self._attach += 1
        mine = self._attach
        sent = max(after_seq + 1, 0)
        try:
            while True:
                while sent < len(self.pieces):
                    batch = self.pieces[sent:sent + REPLAY_BATCH]
                    await sink.send(Token(self.request_id, "".join(batch), sent, len(batch)))
                    sent += len(batch)
                    if self._attach != mine:
                        return  # a newer resume took over
                # No await from here on: a piece or the ending arriving now waits for the sink.
                if self.final is not None:
                    await sink.send(self.final)
                else:
                    self.delivered = sent
                    self.attach(sink)
                return
        except BaseException:
            if self._attach == mine and self.sink is None:
                self.detach()
            raise


class ResumableTurns:
    """The resumable turns of one app, by owner and request id.

    It is drained on shutdown like a chat socket (:class:`~streaming_llm.http.shutdown.LiveSockets`):
    a detached turn counts as running and is cancelled with the rest after the grace.
    """

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._turns: dict[tuple[str, str], Replayable] = {}

    def __len__(self) -> int:
        return len(self._turns)

    def __iter__(self) -> Iterator[Replayable]:
        return iter(list(self._turns.values()))

    @property
    def enabled(self) -> bool:
        return self.grace_s > 0

    def keep(self, request_id: str, owner: str, cancel: Callable[[], None],
             origin: Sink) -> Replayable:
        """Keep a turn started on ``origin`` (a later one with the same owner and id replaces
        it), attached to it."""
        turn = Replayable(request_id, owner, cancel, self, origin)
        if self.enabled:
            self._turns[owner, request_id] = turn
        turn.attach(origin)
        return turn

    def get(self, owner: str, request_id: str) -> Replayable | None:
        return self._turns.get((owner, request_id))

    def forget(self, turn: Replayable) -> None:
        if self._turns.get((turn.owner, turn.request_id)) is turn:
            del self._turns[turn.owner, turn.request_id]

    # Drainable (shutdown) ------------------------------------------------------------------------
    def _drained(self) -> list[Replayable]:
        # Running turns no socket drains: detached ones, and those resumed on another socket.
        return [t for t in self._turns.values() if t.final is None and t.sink is not t.origin]

    @property
    def busy(self) -> bool:
        return bool(self._drained())

    async def cancel(self, request_id: str | None) -> None:
        for turn in self._drained():
            turn.cancel()

    async def close(self, code: int, reason: str) -> None:
        """Nothing to close: detached turns have no socket."""
