"""Many backends behind one engine: ``STREAMING_LLM_OLLAMA_URL=http://a:11434,http://b:11434``.

:class:`BackendPool` holds one :class:`~streaming_llm.engines.upstream.UpstreamEngine` per URL
and is itself an engine. Its rules, in the order a turn meets them:

1. **Sticky**: a conversation goes back to the backend that answered its last turn, while that
   backend is up: the backend holds the conversation's prompt in its cache (Ollama's loaded
   context, llama-server's slot, vLLM's prefix cache), so the next turn's prefill is cheap.
2. **Least busy**: otherwise the turn goes to the up backend with the fewest turns streaming
   now (ties: the one picked longest ago, so equal backends take turns).
3. **Down**: a backend that refuses connections, does not accept one in time, answers 503 or
   drops the connection is marked *down*. A probe (its health check, uncached) runs after
   ``backend_retry_s``, then after twice that, up to ``backend_retry_max_s``; the first probe
   that finds it ready marks it up again. A health report (``/health``, ``/metrics``) that finds
   an up backend not ready marks it down too.
4. **Failover**: a turn whose backend fails that way *before a text piece reached the client*
   moves to the next backend (sticky, then least busy, then the down ones as a last resort,
   soonest retry first, so a fleet that is all down still gets tried); a
   :class:`~streaming_llm.engines.base.PromptTokens` alone does not count (the first backend's is
   passed on, once; it neither sticks nor marks a backend up). After the first piece an error
   ends the turn as on one backend, since the client has seen the start of an answer.

Other errors (``model_not_found``, ``engine_timeout``, an error line) end the turn on the backend
that sent them: they say something about the turn, not about the backend's reachability.

Health: ready when at least one backend is up; ``extra["backends"]`` lists each backend's
``url``, ``state`` (``up``/``down``), ``active`` turns, ``turns`` started, ``failures`` (times
marked down) and ``detail``; ``/health`` shows it as ``engine_info`` and ``/metrics`` turns it into
``streaming_llm_backend_*`` series.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import cast

from ..errors import EngineError, EngineUnavailable
from .base import Chunk, Constraint, EngineHealth, EngineRequest, PromptTokens
from .upstream import ConnectionLost, UpstreamEngine

log = logging.getLogger(__name__)

STICKY_CONVERSATIONS = 100_000  # conversation → backend entries kept (least recently used go)
# What says "this backend cannot be reached" (rather than "this turn failed"):
BACKEND_FAILURES = (EngineUnavailable, ConnectionLost)


@dataclass(eq=False)
class Backend:
    engine: UpstreamEngine
    up: bool = True  # until a failure or a probe says otherwise
    active: int = 0  # turns streaming from it now
    turns: int = 0  # turns started on it
    failures: int = 0  # times it was marked down
    picked_at: float = 0.0
    retry_s: float = 0.0  # the wait before the next probe while down
    retry_at: float = 0.0  # monotonic time of the next probe while down
    detail: str | None = None
    recovery: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return self.engine.url

    def report(self) -> dict[str, object]:
        return {"url": self.url, "state": "up" if self.up else "down", "active": self.active,
                "turns": self.turns, "failures": self.failures, "detail": self.detail}


class BackendPool:
    """An engine that spreads turns over several upstream engines; see the module docstring."""

    def __init__(self, engines: Sequence[UpstreamEngine], *, retry_s: float,
                 retry_max_s: float) -> None:
        if not engines:
            raise ValueError("a backend pool needs at least one backend")
        self.name = engines[0].name
        self.backends = [Backend(e) for e in engines]
        self._retry_s, self._retry_max_s = retry_s, max(retry_s, retry_max_s)
        self._sticky: collections.OrderedDict[str, Backend] = collections.OrderedDict()
        self._closed = False

    # --- life cycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        await self.health()  # a first probe of every backend; never fails start-up

    async def close(self) -> None:
        self._closed = True
        tasks = [b.recovery for b in self.backends if b.recovery is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for backend in self.backends:
            await backend.engine.close()

    def forget(self, conversation_id: str) -> None:
        self._sticky.pop(conversation_id, None)
        for backend in self.backends:
            backend.engine.forget(conversation_id)

    def refusal(self, system: str | None = None) -> EngineError | None:
        return None  # even a pool that is all down gets tried: a backend may be back already

    def check_constraint(self, constraint: Constraint) -> None:
        self.backends[0].engine.check_constraint(constraint)  # the backends share one wire format

    def backend_of(self, conversation_id: str) -> str | None:
        """The URL a conversation sticks to, if any."""
        backend = self._sticky.get(conversation_id)
        return None if backend is None else backend.url

    # --- health ---------------------------------------------------------------------------------
    async def health(self) -> EngineHealth:
        reports = await asyncio.gather(*(b.engine.health() for b in self.backends))
        for backend, report in zip(self.backends, reports, strict=True):
            if backend.up and not report.ready:
                self._mark_down(backend, report.detail or "not ready")
        up = [b for b in self.backends if b.up]
        model = next((r.model for b, r in zip(self.backends, reports, strict=True) if b.up),
                     reports[0].model)
        detail = f"{len(up)} of {len(self.backends)} {self.name} backends up"
        down = [b for b in self.backends if not b.up]
        if down:
            detail += "; down: " + "; ".join(f"{b.url} ({b.detail})" for b in down)
        return EngineHealth(ready=bool(up), model=model, detail=detail,
                            extra={"backends": [b.report() for b in self.backends]})

    # --- routing --------------------------------------------------------------------------------
    def candidates(self, conversation_id: str) -> list[Backend]:
        """The order a turn tries the backends in: sticky, least busy up ones, then down ones."""
        up = sorted((b for b in self.backends if b.up), key=lambda b: (b.active, b.picked_at))
        sticky = self._sticky.get(conversation_id)
        if sticky is not None and sticky.up:
            up.remove(sticky)
            up.insert(0, sticky)
        down = sorted((b for b in self.backends if not b.up), key=lambda b: b.retry_at)
        return up + down

    async def stream(self, request: EngineRequest) -> AsyncIterator[Chunk]:
        failure: EngineError | None = None
        prompt_sent = False
        for backend in self.candidates(request.conversation_id):
            backend.active += 1
            backend.turns += 1
            backend.picked_at = time.monotonic()
            streamed = False  # a piece of the answer (or its end) was passed on
            try:
                chunks = cast(AsyncGenerator[Chunk, None], backend.engine.stream(request))
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        if isinstance(chunk, PromptTokens):
                            if prompt_sent:
                                continue  # the Protocol's one PromptTokens, before any text
                            prompt_sent = True
                        elif not streamed:
                            streamed = True
                            self._stick(request.conversation_id, backend)
                            if not backend.up:
                                self._mark_up(backend)
                        yield chunk
                return
            except BACKEND_FAILURES as exc:
                self._mark_down(backend, exc.message)
                if streamed:
                    raise
                if failure is not None:
                    log.info("turn %s: %s failed too, trying the next backend",
                             request.request_id, backend.url)
                else:
                    log.info("turn %s: %s failed before streaming (%s), trying the next backend",
                             request.request_id, backend.url, exc.message)
                failure = exc
            finally:
                backend.active -= 1
        assert failure is not None
        raise EngineUnavailable(f"no {self.name} backend could take the turn; last: "
                                f"{failure.message}") from failure

    def _stick(self, conversation_id: str, backend: Backend) -> None:
        self._sticky[conversation_id] = backend
        self._sticky.move_to_end(conversation_id)
        while len(self._sticky) > STICKY_CONVERSATIONS:
            self._sticky.popitem(last=False)

    # --- up and down ----------------------------------------------------------------------------
    def _mark_down(self, backend: Backend, detail: str) -> None:
        backend.detail = detail
        if not backend.up:
            return
        backend.up = False
        backend.failures += 1
        backend.retry_s = self._retry_s
        backend.retry_at = time.monotonic() + backend.retry_s
        log.warning("backend %s is down (%s); probing again in %g s", backend.url, detail,
                    backend.retry_s)
        if backend.recovery is None and not self._closed:
            backend.recovery = asyncio.create_task(self._recover(backend),
                                                   name=f"backend-recovery {backend.url}")

    def _mark_up(self, backend: Backend) -> None:
        if backend.up:
            return
        backend.up, backend.detail = True, None
        log.info("backend %s is up again", backend.url)
        task, backend.recovery = backend.recovery, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _recover(self, backend: Backend) -> None:
        """Probe a down backend with exponential backoff until it is ready again."""
        try:
            while not backend.up:
                await asyncio.sleep(max(0.0, backend.retry_at - time.monotonic()))
                if backend.up:  # a turn found it working meanwhile
                    return
                report = await backend.engine.probe()
                if report.ready:
                    self._mark_up(backend)
                    return
                backend.detail = report.detail or backend.detail
                backend.retry_s = min(backend.retry_s * 2, self._retry_max_s)
                backend.retry_at = time.monotonic() + backend.retry_s
        finally:
            if backend.recovery is asyncio.current_task():
                backend.recovery = None
