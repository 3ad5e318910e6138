"""The model runner: executes the scheduler's plan for one step. The scheduler decides; this runs.

A :class:`StepPlan` names at most one prompt chunk to feed (batch 1, through the conversation's
own cache), the rows of the batch to decode (one forward pass over a
:class:`~.batch_cache.BatchSinkCache`) and the dense rows to step one by one. The runner makes
room in full rows, runs the forwards, and samples the next token of every row that needs one in
**one call** (:func:`~.decoding.sample_rows`: one device-to-host copy per step, whatever the
number of rows), a constrained row through its token mask
(:func:`~.constraints.fill_masks`: one ``(rows, vocab)`` mask for the step, none at all when no
row is constrained), whose matcher then takes the sampled token. It returns a :class:`StepOutput`; it never calls a request's handler, never
chooses a row and never changes a request's state: :mod:`.scheduler` does all of that.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import torch

from . import constraints
from .batch_cache import BatchSinkCache
from .constraints import ConstraintState
from .decoding import (
    PENALTY_WINDOW,
    Sampler,
    decode_step,
    eviction_chunk,
    forward_tokens,
    sample_rows,
)
from .sink_cache import SinkCache
from .step import Step

__all__ = ["ModelRunner", "Row", "Runner", "StepOutput", "StepPlan", "sample"]


class Row(Protocol):
    """What the runner reads of a request (the scheduler's ``Request``): its cache, the token it
    feeds next, its sampler and the tokens sampled so far (the penalties' history)."""

    cache: Any
    next_token: int
    sampler: Sampler
    tokens: list[int]
    constraint: ConstraintState | None  # its token mask and matcher (constrained decoding)


R = TypeVar("R", bound=Row)

log = logging.getLogger(__name__)


@dataclass
class StepPlan(Generic[R]):
    """What one step runs, as the scheduler decided it."""

    feed: R | None = None  # the request whose next chunk goes in
    chunk: list[int] = field(default_factory=list)  # its ids for this step
    sample_feed: bool = False  # the chunk ends a prompt: sample the first token from its logits
    rows: Sequence[R] = field(default_factory=list)  # batch rows: rows[b] is row b
    solo: Sequence[R] = field(default_factory=list)  # dense caches, stepped one by one

    @property
    def empty(self) -> bool:
        return self.feed is None and not self.rows and not self.solo


@dataclass
class StepOutput(Generic[R]):
    """What one step produced: a token for every request that was sampled, the failures."""

    tokens: dict[R, int] = field(default_factory=dict)
    failed: dict[R, Exception] = field(default_factory=dict)
    batch_failed: Exception | None = None  # the batched forward failed: every row failed
    compile_seconds: float = 0.0  # spent compiling a new shape of the step during this one


def sample(scores: torch.Tensor, rows: Sequence[Row]) -> list[int]:
    """The next token of every row of ``scores`` ``(rows, vocab)``, in one call: each row's
    sampler and penalties, a constrained row through its token mask (whose matcher then takes
    the token). Every runner ends its step here."""
    states = [r.constraint for r in rows]  # None for an unconstrained row
    masks = constraints.fill_masks(states, scores.shape[-1], scores.device)
    tokens = sample_rows(scores, [r.sampler for r in rows],
                         [r.tokens[-PENALTY_WINDOW:] for r in rows], masks)
    if any(s is not None for s in states):  # a lazy state waiting for its trigger
        constraints.advance(states, tokens)  # reads the free text too (no mask yet)
    return tokens


class Runner(Protocol):
    """What the scheduler has a runner do: this module's :class:`ModelRunner` (torch), or
    :class:`~.llamacpp.runner.LlamaCppRunner`. Every method runs on the scheduler's thread."""

    step: Any  # ``name`` and ``compile_seconds`` (health, usage)

    def batched(self, cache: Any) -> bool:
        """Whether a row with this cache decodes in the batch (else alone: a dense cache)."""

    def chunk_limit(self, cache: Any) -> int | None:
        """The most ids one prompt chunk may feed into this cache (a sink cache's window)."""

    def join(self, cache: Any) -> None: ...

    def leave(self, b: int, cache: Any) -> None: ...

    def clear(self) -> None: ...

    def reserve(self, cache: Any, incoming: int, answer: int) -> None: ...

    def execute(self, plan: StepPlan[R]) -> StepOutput[R]: ...

    def nbytes(self) -> int: ...


class ModelRunner:
    """Owns the model's forward passes and the batch buffers (on the scheduler's thread)."""

    def __init__(self, model: Any, step: Step, rows: int) -> None:
        self.model, self.step = model, step
        self.batch = BatchSinkCache(rows)

    def batched(self, cache: Any) -> bool:
        return isinstance(cache, SinkCache)

    def chunk_limit(self, cache: Any) -> int | None:
        return cache.window_tokens if isinstance(cache, SinkCache) else None

    # -- rows in and out of the batch (copies the scheduler asks for) ---------------------------
    def join(self, cache: SinkCache) -> None:
        self.batch.join(cache)

    def leave(self, b: int, cache: SinkCache) -> None:
        """Row ``b`` back into its cache; the last row takes its place (the scheduler mirrors
        that in its own list)."""
        self.batch.leave(b, cache)

    def clear(self) -> None:
        self.batch.clear()

    @staticmethod
    def reserve(cache: Any, incoming: int, answer: int) -> None:
        """Before feeding ``incoming`` ids to a sink cache: evict so that they and up to half the
        window of answer fit (a large ``max_new_tokens`` does not throw the recent past away)."""
        if isinstance(cache, SinkCache) and incoming:
            window = cache.window_tokens
            cache.make_room(min(incoming + min(answer, window // 2), window))

    # -- one step ---------------------------------------------------------------------------------
    def execute(self, plan: StepPlan[R]) -> StepOutput[R]:
        out: StepOutput[R] = StepOutput()
        logits: list[torch.Tensor] = []  # (n, vocab) blocks, in the order of ``sampled``
        sampled: list[R] = []
        if plan.feed is not None and plan.chunk:
            r = plan.feed
            try:
                last = forward_tokens(self.model, r.cache, plan.chunk)
            except Exception as exc:  # noqa: BLE001 - reported to its handler
                out.failed[r] = exc
            else:
                if plan.sample_feed:
                    assert last is not None
                    logits.append(last[None])
                    sampled.append(r)
        if plan.rows:
            batch = self.batch
            for b, r in enumerate(plan.rows):
                if batch.full(b):  # this row evicts; the others are untouched
                    batch.make_room(b, eviction_chunk(r.cache.window_tokens))
            compiling = self.step.compile_seconds
            try:
                logits.append(self.step(batch, [r.next_token for r in plan.rows]))  # (rows, vocab)
                sampled.extend(plan.rows)
            except Exception as exc:
                log.exception("scheduler: a batched decode step failed")
                batch.clear()
                out.batch_failed = exc
            out.compile_seconds = self.step.compile_seconds - compiling
        for r in plan.solo:
            try:
                logits.append(decode_step(self.model, r.cache, r.next_token)[None])
                sampled.append(r)
            except Exception as exc:  # noqa: BLE001 - reported to its handler
                out.failed[r] = exc
        if sampled:
            out.tokens = dict(zip(sampled, sample(torch.cat(logits), sampled), strict=True))
        return out

    def nbytes(self) -> int:
        """Bytes of the batch buffers (on top of the conversations' own caches)."""
        return self.batch.nbytes()
