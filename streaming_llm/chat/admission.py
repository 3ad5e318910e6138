"""Admission: when a turn may generate. Each rule has one owner:

=============================  ==========================================  =====================
rule                           owner                                       when it cannot run
=============================  ==========================================  =====================
a socket's turns run in the    the chat socket (``http/routes/chat.py``),  waits on the socket;
order they were sent, at most  ``STREAMING_LLM_MAX_QUEUED_TURNS`` behind   past the bound
that many queued               the running one                             ``busy``
one turn at a time per         :class:`ConversationLocks`, across sockets, waits (no slot held)
conversation                   ``/v1`` and every engine
how many turns generate at     :class:`GenerationGate`: the engine's own   waits in the gate's
once, and how many of them     batch when it reports one (``max_batch``),  line; past
one client address may hold    else ``STREAMING_LLM_MAX_CONCURRENT_        ``STREAMING_LLM_MAX_
                               GENERATIONS``; ``..._PER_CLIENT``           WAITING_GENERATIONS``
                                                                           ``busy``
=============================  ==========================================  =====================

So a turn that holds a generation slot is one the engine is running (prefilling or decoding), and
every turn that waits, waits here, where the per-client cap and the ``busy`` bound apply; the
local engine's scheduler finds its batch full only for the moment a finished turn's closing ids
take a row. The gauges say which is which: ``streaming_llm_turns_active`` (holding a slot:
generating), ``streaming_llm_turns_waiting{on="slot"|"conversation"}`` and, per socket,
``streaming_llm_turns_queued``; ``streaming_llm_generation_slots`` is the bound in force.

:class:`GenerationGate` bounds the answers generated at once and, within that, the answers one
client address may hold, so one address that opens many sockets and stops reading cannot take
every slot. Turns beyond a bound wait in line, first come first served among those that may run:
a waiter whose address is at its cap does not hold up a waiter from another address. Past
``max_waiting`` waiters a new turn is refused at once with :class:`Busy`.

:class:`ConversationLocks` lets one turn at a time run in a conversation, across sockets and
``/v1`` calls alike: a second one waits (holding no generation slot) until the first answer is
stored, so two clients continuing one conversation never interleave its history. Truncating a
conversation (``DELETE /conversations/{id}/turns``) takes the same lock. The conversation
manager owns the locks; the turn runner and truncation hold them.

Both are used as ``async with``: leaving the block, however it is left (an answer, an error, a
cancel, a disconnect), gives the slot back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..errors import Busy
from ..metrics import Metrics

__all__ = ["Busy", "ConversationLocks", "GenerationGate"]


@dataclass(eq=False)
class _Waiter:
    client: str
    admitted: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class GenerationGate:
    """At most ``slots`` generations at once, at most ``per_client`` of them for one address."""

    def __init__(self, slots: int, max_waiting: int, per_client: int | None = None,
                 metrics: Metrics | None = None) -> None:
        self.slots = slots
        self.max_waiting = max_waiting
        self._per_client = per_client  # None: as many as there are slots
        self.per_client = per_client if per_client is not None else slots
        self.running = 0
        self.metrics = metrics
        self._by_client: collections.Counter[str] = collections.Counter()
        self._line: collections.deque[_Waiter] = collections.deque()
        self._report()

    @property
    def waiting(self) -> int:
        return len(self._line)

    def held_by(self, client: str) -> int:
        return self._by_client[client]

    def resize(self, slots: int) -> None:
        """Bound generations by ``slots`` from now on (the engine reported its batch); a larger
        bound admits waiters at once, a smaller one lets running turns finish."""
        self.slots = max(1, slots)
        if self._per_client is None:
            self.per_client = self.slots
        self._admit()
        self._report()

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.generation_slots.set(self.slots)
            self.metrics.turns_active.set(self.running)
            self.metrics.turns_waiting.labels("slot").set(len(self._line))

    def _may_run(self, client: str) -> bool:
        return self.running < self.slots and self._by_client[client] < self.per_client

    def _take(self, client: str) -> None:
        self.running += 1
        self._by_client[client] += 1

    def _give_back(self, client: str) -> None:
        self.running -= 1
        self._by_client[client] -= 1
        if not self._by_client[client]:
            del self._by_client[client]
        self._admit()

    def _admit(self) -> None:
        # Hand the free capacity to the first waiters that may use it; they own it on waking.
        for waiter in list(self._line):
            if self.running >= self.slots:
                break
            if not waiter.admitted.done() and self._may_run(waiter.client):
                self._line.remove(waiter)
                self._take(waiter.client)
                waiter.admitted.set_result(None)

    @contextlib.asynccontextmanager
    async def slot(self, client: str = "") -> AsyncIterator[None]:
        """Hold one generation slot for the block; wait for it first (cancellable)."""
        # Whoever waits in line cannot run now (a release admits those that can), so a turn
        # that may run does not queue behind them.
        if self._may_run(client):
            self._take(client)
        elif len(self._line) >= self.max_waiting:
            raise Busy(
                f"the server is busy: {self.running} answers are being generated, the most it "
                f"generates at once being {self.slots} ({self._by_client[client]} for this "
                f"client, of at most {self.per_client}), and {self.waiting} turns are waiting "
                "(STREAMING_LLM_MAX_CONCURRENT_GENERATIONS or the engine's batch, "
                "STREAMING_LLM_MAX_GENERATIONS_PER_CLIENT, STREAMING_LLM_MAX_WAITING_GENERATIONS); "
                "try again shortly")
        else:
            waiter = _Waiter(client)
            self._line.append(waiter)
            self._report()
            try:
                await waiter.admitted
            except asyncio.CancelledError:
                if waiter.admitted.done() and not waiter.admitted.cancelled():
                    self._give_back(client)  # admitted and cancelled in the same step
                else:
                    self._line.remove(waiter)
                self._report()
                raise
        self._report()
        try:
            yield
        finally:
            self._give_back(client)
            self._report()


class ConversationLocks:
    """One turn at a time per conversation id, server-wide: a second one waits its turn (first
    come, first served) and then reads the history the first one stored."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: collections.Counter[str] = collections.Counter()
        self._waiting = 0
        self.metrics = metrics

    def __len__(self) -> int:
        return len(self._locks)  # conversations with a turn running or waiting

    @property
    def waiting(self) -> int:
        """Turns waiting for their conversation's previous turn."""
        return self._waiting

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.turns_waiting.labels("conversation").set(self._waiting)

    @contextlib.asynccontextmanager
    async def hold(self, conversation_id: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(conversation_id, asyncio.Lock())
        self._users[conversation_id] += 1
        try:
            # Counted while acquiring: a free lock is taken without yielding, so only a turn
            # that really waits is ever seen in the gauge.
            self._waiting += 1
            try:
                if lock.locked():
                    self._report()
                await lock.acquire()
            finally:
                self._waiting -= 1
                self._report()
            try:
                yield
            finally:
                lock.release()
        finally:
            self._users[conversation_id] -= 1
            if not self._users[conversation_id]:
                del self._users[conversation_id], self._locks[conversation_id]
