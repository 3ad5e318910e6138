"""Admission: who may generate now. The server-wide generation slots and one turn per conversation.

:class:`GenerationGate` bounds the answers generated at once (``STREAMING_LLM_MAX_CONCURRENT_
GENERATIONS``) and, within that, the answers one client address may hold
(``STREAMING_LLM_MAX_GENERATIONS_PER_CLIENT``), so one address that opens many sockets and stops
reading cannot take every slot. Turns beyond a bound wait in line, first come first served among
those that may run: a waiter whose address is at its cap does not hold up a waiter from another
address. Past ``max_waiting`` waiters a new turn is refused at once with :class:`Busy`.

:class:`ConversationLocks` lets one turn at a time run in a conversation, across sockets and
``/v1`` calls alike: a second one waits (holding no generation slot) until the first answer is
stored, so two clients continuing one conversation never interleave its history.

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

__all__ = ["Busy", "ConversationLocks", "GenerationGate"]


@dataclass(eq=False)
class _Waiter:
    client: str
    admitted: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class GenerationGate:
    """At most ``slots`` generations at once, at most ``per_client`` of them for one address."""

    def __init__(self, slots: int, max_waiting: int, per_client: int | None = None) -> None:
        self.slots = slots
        self.max_waiting = max_waiting
        self.per_client = per_client if per_client is not None else slots
        self.running = 0
        self._by_client: collections.Counter[str] = collections.Counter()
        self._line: collections.deque[_Waiter] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._line)

    def held_by(self, client: str) -> int:
        return self._by_client[client]

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
        # Hand the freed capacity to the first waiters that may use it; they own it on waking.
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
                f"the server is busy: {self.running} answers are being generated "
                f"({self._by_client[client]} for this client) and {self.waiting} turns are waiting "
                "(STREAMING_LLM_MAX_CONCURRENT_GENERATIONS, STREAMING_LLM_MAX_GENERATIONS_PER_CLIENT, "
                "STREAMING_LLM_MAX_WAITING_GENERATIONS); try again shortly")
        else:
            waiter = _Waiter(client)
            self._line.append(waiter)
            try:
                await waiter.admitted
            except asyncio.CancelledError:
                if waiter.admitted.done() and not waiter.admitted.cancelled():
                    self._give_back(client)  # admitted and cancelled in the same step
                else:
                    self._line.remove(waiter)
                raise
        try:
            yield
        finally:
            self._give_back(client)


class ConversationLocks:
    """One turn at a time per conversation id, server-wide: a second one waits its turn (first
    come, first served) and then reads the history the first one stored."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self._locks)  # conversations with a turn running or waiting

    @contextlib.asynccontextmanager
    async def hold(self, conversation_id: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(conversation_id, asyncio.Lock())
        self._users[conversation_id] += 1
        try:
            async with lock:
                yield
        finally:
            self._users[conversation_id] -= 1
            if not self._users[conversation_id]:
                del self._users[conversation_id], self._locks[conversation_id]
