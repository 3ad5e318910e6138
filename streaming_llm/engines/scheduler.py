"""One loop that owns the model and advances every live request: continuous batching.

No HTTP, database or event loop here: the local engine submits :class:`Request` objects from the
event loop and the scheduler's own thread runs them, calling back the request's
:class:`Handler` (on that thread) for everything that happens.

The loop
--------
Each request is a small state machine that the loop moves::

    WAITING ──admit──▶ PREFILLING ──first token──▶ DECODING ──stop / length──▶ CLOSING ──▶ FINISHED
       │                   │                          │
       └──── cancel ───────┴──────── cancel ──────────┴──────▶ CANCELLED

One iteration of the loop:

1. *cancel*: requests whose cancel flag is set leave now (a decoding row is copied back into its
   conversation's cache first), so a cancel takes effect within one step;
2. *admit*: waiting requests, oldest first, while fewer than ``max_batch`` are prefilling or
   decoding; a request waits while another request with the same ``key`` (its conversation) is
   live, so one conversation's turns never touch its cache at the same time. That is the cache's
   ownership, not the admission of turns (the chat layer admits, docs/architecture.md): a turn's
   closing ids are fed after its caller has the ``done``, so the next turn of the conversation,
   already admitted by the chat layer, may arrive while they go in.
   :meth:`Handler.prepare` runs now and says which cache to feed with which ids;
3. *prefill*: one chunk (at most ``prefill_chunk`` tokens) of the oldest prefilling or closing
   request, through the conversation's own cache (batch 1, the path a lone turn takes). A
   finished prompt gives the first token at once and the request joins the batch;
4. *decode*: one forward pass over every decoding row (:mod:`.batch_cache`), one token each.

So rows that are decoding wait at most one prompt chunk per step for a joining prompt (the
*stall bound*: one forward call of ``prefill_chunk`` tokens), and a joining prompt advances one
chunk per step. The chunk size is the same whatever else runs, so a prompt's logits do not depend
on the load. No request starves: admission is first come, first served, a prefilling request is
served oldest first, and every decoding row advances every step.

Rows of a dense cache (a ``DynamicCache``, streaming off) cannot share preallocated buffers; they
are stepped one by one in the same iteration, interleaved fairly but not batched.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from .constraints import ConstraintState
from .decoding import Sampler
from .runner import ModelRunner, Runner, StepOutput, StepPlan
from .step import ModelStep, Step

__all__ = [
    "PREFILL_CHUNK",
    "Feed",
    "Handler",
    "Outcome",
    "Request",
    "RequestState",
    "Scheduler",
]

log = logging.getLogger(__name__)

# Prompt tokens per forward call: the stall a joining prompt adds to the rows that decode (one
# such chunk per step), and where a cancel is seen during a prompt. The one definition.
PREFILL_CHUNK = 256
IDLE_POLL_S = 0.5  # how often idle work runs while it has more to do


class RequestState(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    CLOSING = "closing"
    FINISHED = "finished"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Feed:
    """Ids to feed into a conversation's cache: a prompt, or what closes a turn.

    ``reserve``: answer tokens to make room for before the prompt (sink cache; at most half the
    window is set aside, so a large ``max_new_tokens`` does not throw the recent past away).
    ``breaks``: offsets into ``ids`` where a chunk must end, so that :meth:`Handler.consumed`
    sees the cache holding exactly ``ids[:offset]`` (e.g. an agent's prefix, to keep a copy).
    """

    cache: Any  # SinkCache (streaming) or DynamicCache (dense)
    ids: Sequence[int]
    reserve: int = 0
    breaks: tuple[int, ...] = ()
    # A bounded rebuild: once ``skip[0]`` of ``ids`` are fed, the ids ``skip[1]`` (which come
    # next in the conversation, before the rest of ``ids``) are counted as evicted, not fed
    # (SinkCache.skip), and handed to Handler.consumed like fed ones.
    skip: tuple[int, tuple[int, ...]] | None = None


@dataclass(frozen=True)
class Outcome:
    """How a request's answer ended.

    ``reason``: ``stop`` (the handler stopped it), ``length`` (``max_new_tokens``) or
    ``cancelled``; ``tokens``: every sampled token, the last one included; ``batch_size``: the
    most rows its decode steps ran with (0 if it never decoded); ``evicted_tokens``: its cache's
    count after the answer; ``prepared``: whether :meth:`Handler.prepare` ran.
    """

    reason: Literal["stop", "length", "cancelled"]
    tokens: list[int]
    batch_size: int
    evicted_tokens: int | None
    prepared: bool
    compile_seconds: float = 0.0  # spent compiling the step while it decoded (not decode time)


class Handler(Protocol):
    """What a request's owner does at each step; every method runs on the scheduler's thread."""

    def prepare(self) -> Feed:
        """At admission: the cache to use and the prompt ids to feed (at least one)."""

    def consumed(self, ids: Sequence[int]) -> None:
        """``ids`` went into the cache (a prompt chunk, a decoded token, a closing chunk)."""

    def token(self, token: int) -> bool:
        """A sampled token; return False to stop here (end of sequence, a stop string)."""

    def finished(self, outcome: Outcome) -> Feed | None:
        """The answer ended and the cache is the conversation's own again; return ids that close
        the turn (fed before :meth:`released`), or None."""

    def released(self) -> None:
        """The request left the scheduler (after its closing ids, if any)."""

    def failed(self, error: Exception) -> None:
        """The model failed for this request; its cache is in an unknown state."""


@dataclass(eq=False)
class Request:
    key: str  # requests with the same key (a conversation) run one after another
    handler: Handler
    sampler: Sampler  # picks each token; all rows of a step are sampled in one call
    max_new_tokens: int
    constraint: ConstraintState | None = None  # its token mask and matcher (constrained decoding)
    cancel: threading.Event = field(default_factory=threading.Event)
    state: RequestState = RequestState.WAITING
    # -- the loop's own bookkeeping ------------------------------------------------------------
    cache: Any = None
    pending: list[int] = field(default_factory=list)  # ids still to feed (prompt or closing)
    fed: int = 0  # ids of the current Feed fed so far
    breaks: tuple[int, ...] = ()
    skip: tuple[int, tuple[int, ...]] | None = None
    tokens: list[int] = field(default_factory=list)
    next_token: int = -1  # the sampled token the next decode step feeds
    ending: Literal["stop", "length", "cancelled"] = "length"
    batch_size: int = 0
    compile_seconds: float = 0.0
    failed: bool = False  # the handler was told (failed()); nothing more is called


class Scheduler:
    """Owns ``model`` on one thread; :meth:`submit` requests from any thread.

    Each iteration *plans* a step (:meth:`_schedule`: cancel, admit, pick the prompt chunk and
    the rows), has the :class:`~.runner.ModelRunner` *execute* it, and *applies* the output
    (:meth:`_apply`: the handlers' callbacks, rows joining and leaving).
    """

    def __init__(self, model: Any, *, max_batch: int, step: Step | None = None,
                 prefill_chunk: int = PREFILL_CHUNK, name: str = "scheduler",
                 idle: Callable[[], bool] | None = None, runner: Runner | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model = model
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        if runner is None:  # torch: the model's forward and a batched decode step
            runner = ModelRunner(model, step if step is not None else ModelStep(model), max_batch)
        self._runner: Runner = runner
        self.step = runner.step  # the batched decode step (its name and compile time: health)
        self._rows: list[Request] = []  # decoding in the batch; self._rows[b] is batch row b
        self._solo: list[Request] = []  # decoding with a dense cache, stepped one by one
        self._feeding: list[Request] = []  # prefilling or closing, oldest first
        self._waiting: deque[Request] = deque()
        self._held: set[Request] = set()  # admitted and not yet released (any live state)
        self._cond = threading.Condition()
        self._closed = False
        self._steps = 0
        # Work for the loop's thread while nothing is live (the precompiler's loads): called
        # every IDLE_POLL_S while it says more is pending, again after the next busy spell.
        self._idle = idle
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- any thread ------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._waiting.append(request)
            self._cond.notify_all()

    def wake(self) -> None:
        """Make the loop look at the requests now (after a cancel flag was set)."""
        with self._cond:
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no request is waiting or live (tests, benchmarks); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._busy(), timeout)

    def close(self, timeout: float | None = None) -> None:
        """Cancel everything, stop the loop and wait for it."""
        with self._cond:
            self._closed = True
            for r in [*self._waiting, *self._feeding, *self._rows, *self._solo]:
                r.cancel.set()
            self._cond.notify_all()
        self._thread.join(timeout)

    @property
    def live(self) -> int:
        """Requests prefilling, decoding or closing now."""
        return len(self._feeding) + len(self._rows) + len(self._solo)

    @property
    def decoding(self) -> int:
        return len(self._rows) + len(self._solo)

    @property
    def waiting(self) -> int:
        """Requests submitted and not admitted yet (over ``max_batch``, or their conversation's
        previous turn is still live)."""
        with self._cond:
            return len(self._waiting)

    def admitted(self) -> list[Request]:
        """Requests admitted and not yet released, in any live state."""
        with self._cond:
            return list(self._held)

    def batch_nbytes(self) -> int:
        """Bytes of the batch buffers (on top of the conversations' own caches)."""
        return self._runner.nbytes()

    # -- the loop (scheduler thread) -----------------------------------------------------------
    def _busy(self) -> bool:
        return bool(self._waiting or self._held)

    def _run(self) -> None:
        with torch.inference_mode():
            pending = self._idle is not None
            while True:
                with self._cond:
                    self._cond.notify_all()  # wait_idle() callers look again
                    self._cond.wait_for(lambda: self._closed or self._busy(),
                                        IDLE_POLL_S if pending else None)
                    if self._closed and not self._busy():
                        return
                    idle = not self._busy()
                if idle:
                    pending = self._idle_work()
                    continue
                pending = self._idle is not None
                try:
                    plan = self._schedule()
                    if not plan.empty:
                        self._apply(plan, self._runner.execute(plan))
                except Exception as exc:  # a bug in the loop itself: fail everyone, keep serving
                    log.exception("scheduler: the loop failed")
                    self._fail_all(exc)

    def _idle_work(self) -> bool:
        assert self._idle is not None
        try:
            return self._idle()
        except Exception:
            log.exception("scheduler: idle work failed; not retried")
            self._idle = None
            return False

    def _fail_all(self, exc: Exception) -> None:
        rows = [*self._feeding, *self._rows, *self._solo]
        self._feeding, self._rows, self._solo = [], [], []
        self._runner.clear()
        for r in rows:
            self._fail(r, exc)

    # -- deciding ---------------------------------------------------------------------------------
    def _schedule(self) -> StepPlan[Request]:
        """Cancel, admit, then plan this step: the oldest feeding request's next chunk (the
        stall bound) and every decoding row."""
        self._cancel()
        self._admit()
        plan: StepPlan[Request] = StepPlan(rows=list(self._rows), solo=list(self._solo))
        if self._feeding:
            r = self._feeding[0]
            size = self.prefill_chunk
            if (limit := self._runner.chunk_limit(r.cache)) is not None:
                size = min(size, limit)
            size = min([size, *(b - r.fed for b in r.breaks if b > r.fed)])
            plan.feed, plan.chunk = r, r.pending[:size]
            plan.sample_feed = (r.state is RequestState.PREFILLING
                                and len(plan.chunk) == len(r.pending))
        return plan

    def _cancel(self) -> None:
        with self._cond:
            never_started = [r for r in self._waiting if r.cancel.is_set()]
            for r in never_started:
                self._waiting.remove(r)
        for r in never_started:
            self._end(r, "cancelled")
        for r in [r for r in self._feeding
                  if r.cancel.is_set() and r.state is RequestState.PREFILLING]:
            self._feeding.remove(r)
            self._end(r, "cancelled")
        for b in reversed(range(len(self._rows))):
            if self._rows[b].cancel.is_set():
                self._leave_row(b, "cancelled")
        for r in [r for r in self._solo if r.cancel.is_set()]:
            self._solo.remove(r)
            self._end(r, "cancelled")

    def _admit(self) -> None:
        with self._cond:
            live_keys = {r.key for r in self._held}
            admitted: list[Request] = []
            for r in list(self._waiting):
                if len(self._feeding) + len(admitted) + self.decoding >= self.max_batch:
                    break
                if r.key in live_keys:
                    continue  # its conversation's previous turn is still live
                self._waiting.remove(r)
                live_keys.add(r.key)
                admitted.append(r)
                self._held.add(r)
        for r in admitted:
            try:
                work = r.handler.prepare()
            except Exception as exc:  # noqa: BLE001 - reported to its handler
                self._fail(r, exc)
                continue
            self._start_feeding(r, work, RequestState.PREFILLING)

    def _start_feeding(self, r: Request, work: Feed, state: RequestState) -> None:
        r.cache, r.pending, r.state = work.cache, list(work.ids), state
        r.fed, r.breaks, r.skip = 0, work.breaks, work.skip
        if r.skip is not None:
            r.breaks = (*r.breaks, r.skip[0])
        if state is RequestState.PREFILLING and not r.pending:
            self._fail(r, ValueError("a prompt needs at least one token"))
            return
        if not self._skip(r):
            return
        try:
            self._runner.reserve(r.cache, len(r.pending), work.reserve)
        except Exception as exc:  # noqa: BLE001 - reported to its handler
            self._fail(r, exc)
            return
        self._feeding.append(r)

    # -- applying a step's output -------------------------------------------------------------------
    def _apply(self, plan: StepPlan[Request], out: StepOutput[Request]) -> None:
        # The batch's rows first: a prompt that ends now joins the batch after them.
        if plan.rows:
            self._decoded(plan.rows, out)
        if plan.feed is not None:
            self._fed(plan.feed, plan.chunk, out)
        for r in plan.solo:
            if r in out.failed:
                self._solo.remove(r)
                self._fail(r, out.failed[r])
                continue
            self._call(r, lambda r=r: r.handler.consumed([r.next_token]))
            if not self._sample(r, out.tokens[r], batch_size=1):
                self._solo.remove(r)
                self._end(r, r.ending)

    def _fed(self, r: Request, chunk: list[int], out: StepOutput[Request]) -> None:
        """A prompt or closing chunk went in; a finished prompt's first token joins the batch."""
        if r in out.failed:
            self._feeding.remove(r)
            self._fail(r, out.failed[r])
            return
        r.pending, r.fed = r.pending[len(chunk):], r.fed + len(chunk)
        self._call(r, lambda: r.handler.consumed(chunk))
        if not r.failed and not self._skip(r):
            return
        if r.pending and not r.failed:
            return
        self._feeding.remove(r)
        if r.failed:
            return
        if r.state is RequestState.CLOSING:
            self._release(r, RequestState.FINISHED)
            return
        if self._sample(r, out.tokens[r], batch_size=0):
            self._join(r)

    def _skip(self, r: Request) -> bool:
        """A bounded rebuild's skip, when its place in the prompt is reached; False: failed."""
        if r.skip is None or r.skip[0] != r.fed:
            return True
        skipped, r.skip = r.skip[1], None
        try:
            r.cache.skip(len(skipped))
        except Exception as exc:  # noqa: BLE001 - reported to its handler
            if r in self._feeding:
                self._feeding.remove(r)
            self._fail(r, exc)
            return False
        self._call(r, lambda: r.handler.consumed(list(skipped)))
        return not r.failed

    def _join(self, r: Request) -> None:
        r.state = RequestState.DECODING
        if self._runner.batched(r.cache):
            self._runner.join(r.cache)
            self._rows.append(r)
        else:
            self._solo.append(r)

    def _decoded(self, rows: Sequence[Request], out: StepOutput[Request]) -> None:
        """The batch advanced one token: hand each row its next token; rows that end leave."""
        if out.batch_failed is not None:
            self._rows = [r for r in self._rows if r not in rows]
            for r in rows:
                self._fail(r, out.batch_failed)
            return
        self._steps += 1
        if out.compile_seconds:  # a new shape compiled in this step: not decode time
            for r in rows:
                r.compile_seconds += out.compile_seconds
        n = len(rows)
        for r in rows:
            self._call(r, lambda r=r: r.handler.consumed([r.next_token]))
            if not self._sample(r, out.tokens[r], batch_size=n) and not r.failed:
                r.state = RequestState.CLOSING  # marked; it leaves below
        for b in reversed(range(len(self._rows))):  # from the end: the last row takes the place
            r = self._rows[b]
            if r.failed:
                self._runner.leave(b, r.cache)
                self._pop_row(b)
            elif r.state is RequestState.CLOSING:
                self._leave_row(b, r.ending)

    def _sample(self, r: Request, token: int, *, batch_size: int) -> bool:
        """Hand ``r`` its sampled token; True when it goes on decoding."""
        if r.failed:
            return False
        r.batch_size = max(r.batch_size, batch_size)
        r.tokens.append(token)
        go = self._call(r, lambda: r.handler.token(token))
        if r.failed:
            return False
        if not go:
            r.ending = "stop"
        elif len(r.tokens) >= r.max_new_tokens:
            r.ending = "length"
        else:
            r.next_token = token
            return True
        if r.state is RequestState.PREFILLING:
            self._end(r, r.ending)
        return False

    # -- leaving --------------------------------------------------------------------------------
    def _pop_row(self, b: int) -> None:
        """Mirror the batch: row ``b``'s place is taken by the last row."""
        last = self._rows.pop()
        if b < len(self._rows):
            self._rows[b] = last

    def _leave_row(self, b: int, reason: Literal["stop", "length", "cancelled"]) -> None:
        r = self._rows[b]
        self._runner.leave(b, r.cache)
        self._pop_row(b)
        self._end(r, reason)

    def _end(self, r: Request, reason: Literal["stop", "length", "cancelled"]) -> None:
        """The answer ended; the cache is the conversation's own. Close the turn, or release."""
        if r.failed:
            return
        r.state = RequestState.CANCELLED if reason == "cancelled" else RequestState.CLOSING
        closing = self._call(r, lambda: r.handler.finished(self._outcome(r, reason)))
        if r.failed:
            return
        # Closing ids are fed even while the scheduler stops: a graceful stop writes the
        # conversation's cache to disk, which must hold the turn as the chat template closes it.
        if r.state is RequestState.CLOSING and closing is not None and closing.ids:
            self._start_feeding(r, closing, RequestState.CLOSING)
            return
        self._release(r, RequestState.FINISHED if r.state is RequestState.CLOSING else r.state)

    def _release(self, r: Request, state: RequestState) -> None:
        r.state = state
        self._call(r, r.handler.released)
        self._let_go(r)

    def _let_go(self, r: Request) -> None:
        """``r`` has left: its key is free, and wait_idle() may look again."""
        with self._cond:
            self._held.discard(r)
            self._cond.notify_all()

    def _fail(self, r: Request, exc: Exception) -> None:
        if r.failed:
            return
        r.failed = True
        r.state = RequestState.CANCELLED
        try:
            r.handler.failed(exc)
        except Exception:
            log.exception("scheduler: a request's failure handler raised")
        self._let_go(r)

    def _call(self, r: Request, fn: Any) -> Any:
        """Call a handler method; a handler that raises fails its own request, nobody else's."""
        try:
            return fn()
        except Exception as exc:
            log.exception("scheduler: a request's handler raised")
            self._fail(r, exc)
            return None

    def _outcome(self, r: Request, reason: Literal["stop", "length", "cancelled"]) -> Outcome:
        evicted = getattr(r.cache, "evicted_tokens", None) if r.cache is not None else None
        return Outcome(reason=reason, tokens=list(r.tokens), batch_size=r.batch_size,
                       evicted_tokens=evicted, prepared=r.cache is not None,
                       compile_seconds=r.compile_seconds)
