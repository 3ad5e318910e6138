"""Graceful shutdown: drain the chat sockets before the server goes away.

On SIGTERM uvicorn stops listening, then closes every open WebSocket at once with code 1012 and
only afterwards runs the lifespan shutdown: too late for a turn in the middle of its answer. So
:class:`Server` runs :meth:`LiveSockets.drain` first, while the database and the engine are still
open:

1. the listening sockets are closed: new connections are refused;
2. new chat frames are answered with ``shutting_down``, and turns queued behind the running one
   are refused the same way (nothing of theirs was stored);
3. running turns may finish for up to ``STREAMING_LLM_SHUTDOWN_GRACE_S`` seconds;
4. those still running are cancelled: each stores its partial answer with finish reason
   ``cancelled`` and sends its ``done``, as a client's ``cancel`` would;
5. every chat socket is closed with 1001 (going away);
6. connections whose client stopped reading (data still waiting in the write buffer) are
   aborted: ``close()`` would wait for that buffer to drain, for ever, and uvicorn would then
   wait out its own timeout (:data:`GRACEFUL_SHUTDOWN_S`) before cancelling their tasks.

Then uvicorn's own shutdown runs (idle HTTP connections, the lifespan) and the process exits 0,
SIGTERM being how systemd and compose ask a service to stop. The whole stop takes at most
``STREAMING_LLM_SHUTDOWN_GRACE_S`` + :func:`stop_budget_s` seconds, stalled clients included
(the systemd unit's ``TimeoutStopSec`` is set above that).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol

import uvicorn

log = logging.getLogger(__name__)

GOING_AWAY = 1001
POLL_S = 0.05
#: uvicorn's ``timeout_graceful_shutdown``: what it waits for requests still running after the
#: drain (a long ``/v1`` answer, say) before it cancels them.
GRACEFUL_SHUTDOWN_S = 5


class Drainable(Protocol):
    """What the drain needs from a chat socket (``routes.chat.ChatSocket``)."""

    @property
    def busy(self) -> bool:
        """A turn is running."""
        ...

    async def cancel(self, request_id: str | None) -> None:
        """Cancel the running turn (``None``) the way a client's ``cancel`` frame does."""
        ...

    async def close(self, code: int, reason: str) -> None: ...


class LiveSockets:
    """The open chat sockets of one app, so that shutdown can drain them."""

    def __init__(self, *, cancel_timeout_s: float = 5.0, close_timeout_s: float = 2.0) -> None:
        self._open: set[Drainable] = set()
        self.draining = False
        self.cancel_timeout_s = cancel_timeout_s  # to store partial answers after the cancel
        self.close_timeout_s = close_timeout_s  # for the sockets' handlers to return after 1001

    def __len__(self) -> int:
        return len(self._open)

    @contextlib.contextmanager
    def track(self, sock: Drainable) -> Iterator[None]:
        self._open.add(sock)
        try:
            yield
        finally:
            self._open.discard(sock)

    def running(self) -> int:
        return sum(1 for s in self._open if s.busy)

    async def drain(self, grace_s: float) -> None:
        """Refuse new turns, let running ones finish for ``grace_s``, cancel the rest, close."""
        self.draining = True
        started = time.monotonic()
        log.info("shutdown: no new turns; %d running on %d chat socket(s), grace %.1fs",
                 self.running(), len(self), grace_s)
        if not await self._until(lambda: not self.running(), grace_s):
            late = [s for s in self._open if s.busy]
            log.warning("shutdown: grace of %.1fs is over, cancelling %d turn(s)", grace_s,
                        len(late))
            for sock in late:
                await sock.cancel(None)
            if not await self._until(lambda: not self.running(), self.cancel_timeout_s):
                log.error("shutdown: %d turn(s) did not stop within %.1fs of the cancel",
                          self.running(), self.cancel_timeout_s)
        # Concurrently and bounded: a client that stopped reading must not hold the others up.
        closing = [asyncio.ensure_future(s.close(GOING_AWAY, "server shutting down"))
                   for s in self._open]
        if closing:
            _, stuck = await asyncio.wait(closing, timeout=self.close_timeout_s)
            for task in stuck:
                task.cancel()
            if stuck:
                await asyncio.wait(stuck)
                log.warning("shutdown: %d socket(s) did not take the close; dropping them",
                            len(stuck))
        await self._until(lambda: not self._open, self.close_timeout_s)
        log.info("shutdown: chat sockets drained in %.2fs", time.monotonic() - started)

    @staticmethod
    async def _until(done: Callable[[], bool], timeout_s: float) -> bool:
        # Polling: a turn ends in many ways (done, error, disconnect, cancel) and a 50 ms look at
        # a property keeps every one of them free of shutdown hooks.
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(POLL_S)
        return True


def stop_budget_s(sockets: LiveSockets | None = None) -> float:
    """Seconds a stop may take beyond the grace: the drain's own waits plus uvicorn's timeout."""
    sockets = sockets or LiveSockets()
    return sockets.cancel_timeout_s + 2 * sockets.close_timeout_s + GRACEFUL_SHUTDOWN_S


class Server(uvicorn.Server):
    """uvicorn's server with a drain step before its shutdown and a clean exit on SIGTERM."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self.drain = drain

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:  # stop accepting first; uvicorn's close below is a no-op
            server.close()
        for sock in sockets or []:
            sock.close()
        task = asyncio.ensure_future(self.drain())
        # A second Ctrl-C sets force_exit: stop draining and let uvicorn close everything now.
        while not task.done() and not self.force_exit:
            await asyncio.wait({task}, timeout=0.1)
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
        elif task.exception() is not None:  # logged, and uvicorn's shutdown still runs
            log.error("shutdown: draining the chat sockets failed", exc_info=task.exception())
        self._abort_stalled()
        await super().shutdown(sockets)

    def _abort_stalled(self) -> None:
        """Drop connections whose client stopped reading: their close would never finish."""
        stalled = 0
        for connection in list(self.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None and transport.get_write_buffer_size():
                transport.abort()  # closing or not: a close waits for the buffer to drain
                stalled += 1
        if stalled:
            log.warning("shutdown: dropped %d connection(s) whose client stopped reading", stalled)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            # uvicorn re-raises the signal it stopped on, so SIGTERM would exit with -15. After a
            # graceful shutdown that is a clean exit: status 0.
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]
