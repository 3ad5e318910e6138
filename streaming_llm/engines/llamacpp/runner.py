"""The llama.cpp runner: the scheduler's plan for one step as one ``llama_decode``.

The torch runner (:class:`~..runner.ModelRunner`) feeds a prompt chunk through the model's
forward and steps the rows through a batch of copied caches. Here every cache already lives in
the model's KV memory (a sequence each, :mod:`.model`), so one batch carries both: the joining
prompt's chunk, then one token per decoding row, each entry tagged with its sequence and
position, logits asked only where a token is sampled. Joining and leaving the batch copy
nothing. Sampling is the torch runner's, one call over all rows (:func:`~..runner.sample`).

Order within a step: room is made first (a full row evicts a chunk, a prompt chunk makes room
for itself), then every cache of the step is placed in a sequence (none of them parked for
another), then the batch runs. A failed decode fails every request of the step, and their
caches are dropped (their cells may be half written), as a failed batched step does in torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from ..decoding import Sampler, eviction_chunk
from ..runner import R, StepOutput, StepPlan, sample
from .cache import SeqCache
from .model import LlamaCppModel

__all__ = ["LlamaCppRunner", "LlamaCppStep", "ScratchRow"]

log = logging.getLogger("streaming_llm.engines.llamacpp")


@dataclass(eq=False)
class ScratchRow:
    """A greedy request outside the scheduler (the warm-up, ``bench speed``): what the runner
    reads of one."""

    cache: SeqCache
    next_token: int = 0
    tokens: list[int] = field(default_factory=list)
    constraint: Any = None
    sampler: Sampler = field(default_factory=lambda: Sampler(temperature=0.0,
                                                             repetition_penalty=1.0))


@dataclass
class LlamaCppStep:
    """What health reports of the decode step (no compile here: llama.cpp's kernels are built)."""

    name: str = "llama.cpp"
    compile_seconds: float = 0.0


class LlamaCppRunner:
    """Executes :class:`~..runner.StepPlan` on a :class:`~.model.LlamaCppModel`."""

    def __init__(self, model: LlamaCppModel) -> None:
        self.model = model
        self.step = LlamaCppStep()

    def batched(self, cache: Any) -> bool:
        return True

    def chunk_limit(self, cache: Any) -> int | None:
        return int(cache.window_tokens)

    # The rows stay in their sequences: nothing to copy in or out.
    def join(self, cache: Any) -> None:
        pass

    def leave(self, b: int, cache: Any) -> None:
        pass

    def clear(self) -> None:
        pass

    @staticmethod
    def reserve(cache: SeqCache, incoming: int, answer: int) -> None:
        """As the torch runner: room for the prompt and up to half the window of answer."""
        if incoming:
            window = cache.window_tokens
            cache.make_room(min(incoming + min(answer, window // 2), window))

    def execute(self, plan: StepPlan[R]) -> StepOutput[R]:
        out: StepOutput[R] = StepOutput()
        feed = plan.feed if plan.feed is not None and plan.chunk else None
        requests = ([feed] if feed is not None else []) + list(plan.rows)
        try:
            with self.model.lock:  # nothing moves a cache of this step until it has run
                logits = self._run(plan, feed, requests)
        except Exception as exc:
            log.exception("llama.cpp: a step failed")
            if feed is not None:
                out.failed[feed] = exc
            if plan.rows:
                out.batch_failed = exc
            return out
        if feed is not None:
            feed.cache.fed(len(plan.chunk))
        for r in plan.rows:
            r.cache.fed(1)
        sampled = ([feed] if feed is not None and plan.sample_feed else []) + list(plan.rows)
        if sampled:
            tokens = sample(torch.from_numpy(logits), sampled)
            out.tokens = dict(zip(sampled, tokens, strict=True))
        return out

    def _run(self, plan: StepPlan[R], feed: R | None, requests: list[R]) -> Any:
        """Make room, place every cache of the step, decode: the logits of the sampled."""
        if feed is not None:
            feed.cache.make_room(len(plan.chunk))
        for r in plan.rows:
            if r.cache.length >= r.cache.capacity:  # this row evicts; the others do not
                r.cache.make_room(eviction_chunk(r.cache.window_tokens))
        busy: set[int] = set()
        seqs = []
        for r in requests:
            seqs.append(r.cache.seq(busy))
            busy.add(seqs[-1])
        entries: list[tuple[int, int, int, bool]] = []
        if feed is not None:
            at, last = feed.cache.length, len(plan.chunk) - 1
            entries.extend((token, at + i, seqs[0], plan.sample_feed and i == last)
                           for i, token in enumerate(plan.chunk))
        for r, seq in zip(plan.rows, seqs[len(requests) - len(plan.rows):], strict=True):
            entries.append((r.next_token, r.cache.length, seq, True))
        return self.model.decode(entries)

    def warm_up(self) -> None:
        """A short prompt and two decode steps in a scratch cache, before the first chat: the
        first ``llama_decode`` of each batch shape builds llama.cpp's graph and the first
        sample warms torch, which would otherwise land on the first answer's first token."""
        row = ScratchRow(SeqCache(self.model, 0, 64))
        out = self.execute(StepPlan(feed=row, chunk=[1, 2, 3, 4, 5, 6, 7, 8], sample_feed=True))
        for _ in range(2):
            row.next_token = out.tokens[row]
            out = self.execute(StepPlan(rows=[row]))
        if out.failed or out.batch_failed:
            raise RuntimeError(f"llama.cpp's warm-up step failed: {out.batch_failed}")

    def nbytes(self) -> int:
        return 0  # no batch buffers: the rows stay in their sequences
