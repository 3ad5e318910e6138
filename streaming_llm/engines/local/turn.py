"""A chat turn as the scheduler runs it: the :class:`~..scheduler.Handler` of one request.

Every method runs on the scheduler's thread, in this order (:mod:`..scheduler` has the states):

``prepare``
    Render and tokenize the conversation (reusing the kept tokenization), and have
    :class:`~.caches.Caches` plan how the conversation's cache reaches exactly those ids (keep
    the longest common prefix, roll back what differs, or start afresh, from a copy of the
    agent's pinned prefix when one is kept). Returns the ids still to feed; the scheduler feeds
    them in chunks.
``consumed``
    Ids went into the cache; a fresh conversation whose pinned prefix has just gone in leaves a
    copy of it for the agent's next conversation.
``token``
    A token the scheduler sampled (every row of a step in one call, each with this turn's
    :class:`~..decoding.Sampler`): stream its text (UTF-8-safe, stop strings), time it; False at
    an end-of-sequence id, a stop string, or once the turn's constraint is complete (its
    :class:`~..constraints.ConstraintState`, which the runner advanced with this token).
``finished``
    Send :class:`~..base.Finished` with this turn's own usage (and the batch size it ran in), then
    return the ids that close the assistant turn the way the chat template writes it, so the next
    turn's prompt extends the kept ids (fed after ``done``: it costs the caller nothing).
``released`` / ``failed``
    Keep the conversation for the next turn (LRU), or report the error and drop it.

The turn knows its request, the prompts, the caches and the end-of-sequence ids: nothing of the
engine that made it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from ...errors import AgentContextTooLong, ContextTooLong, EngineError
from ..base import EngineRequest, Finished, PromptTokens, TextChunk, Usage
from ..constraints import ConstraintState
from ..detokenize import IncrementalDecoder, StopMatcher
from ..scheduler import Feed, Outcome
from .caches import Caches, Layout, Plan
from .prompts import Message, Prompts, Tools
from .store import Conversation

log = logging.getLogger("streaming_llm.engines.local")


class Turn:
    """One turn of one conversation; see the module docstring.

    ``emit`` hands an event (or an exception) to the event loop; ``submitted`` is when the
    request arrived (``perf_counter``), the start of its time to first token.
    """

    def __init__(self, request: EngineRequest, emit: Callable[[object], None], *,
                 caches: Caches, prompts: Prompts, tokenizer: Any, eos_ids: frozenset[int],
                 streaming: bool, context: int, submitted: float,
                 on_released: Callable[[], None],
                 constraint: ConstraintState | None = None) -> None:
        self.request, self.emit, self.submitted = request, emit, submitted
        self.caches, self.prompts, self.tokenizer = caches, prompts, tokenizer
        self.eos_ids, self.streaming, self.context = eos_ids, streaming, context
        self._on_released = on_released
        self.constraint = constraint
        self.state: Conversation | None = None
        self.messages: list[Message] = []
        self.tools: Tools = None  # described by a tool-aware chat template (else in the messages)
        self.prompt_text, self.prompt_ids = "", [0]
        self.max_new = request.max_new_tokens
        self.dropped: int | None = None
        self.reused = 0
        self.layout: Layout | None = None
        self._prefix_at = 0  # > 0: keep the pinned prefix once this many ids are in the cache
        self._closing_text: str | None = None
        self._closing_length = 0
        self._answer: list[str] = []
        self._completion = 0  # answer tokens (end-of-sequence ids not counted)
        self._first_at = self._last_at = 0.0
        self._reason: Literal["stop", "length"] = "length"
        self._decoder: IncrementalDecoder | None = None
        self._stops: StopMatcher | None = None
        self.source = "new"  # where the cache came from: memory, disk, rebuilt, new

    # -- the scheduler's calls ---------------------------------------------------------------------
    def prepare(self) -> Feed:
        request, prompts, caches = self.request, self.prompts, self.caches
        state = caches.take(self, request.conversation_id)
        self.state = state  # kept again on release whatever happens next
        self.messages, self.tools = prompts.chat(request.messages, request.constraint)
        known_text, known_ids = (state.text, state.ids) if state is not None else (None, [])
        if self.streaming:
            self.prompt_text = prompts.render(self.messages, generation_prompt=True,
                                              tools=self.tools)
            self.prompt_ids = prompts.encode_prompt(known_text, known_ids, self.prompt_text)
            self.layout = caches.layout(*caches.pinned(self.messages, self.prompt_text,
                                                       self.prompt_ids, self.tools))
            if state is not None and (state.cache.sink_tokens != self.layout.sinks
                                      or state.cache.window_tokens != self.layout.window):
                state = None  # the agent's prefix changed length: rebuild from the new one
        else:
            self.prompt_text, self.prompt_ids, self.max_new, self.dropped = prompts.fit_dense(
                known_text, known_ids, self.messages, self.max_new, self.context, self.tools)
        self.emit(PromptTokens(len(self.prompt_ids)))
        self._decoder = IncrementalDecoder(self.tokenizer)
        self._stops = StopMatcher(request.options.stop)
        found = state.source if state is not None else None
        plan = caches.plan(state, self.prompt_ids, self._fresh, need_logits=True,
                           reserve=self.max_new)
        self.state, self.reused = plan.state, plan.reused
        if self.layout is not None:
            plan.state.prefix = self.layout.prefix
        history = any(m.role == "assistant" for m in request.messages)
        self.source = ("rebuilt" if history else "new") if plan.fresh or found is None else found
        caches.counted(self.source)
        caches.hold(self, plan.state)
        return self._feed(plan, self.prompt_ids, reserve=self.max_new)

    def consumed(self, ids: Sequence[int]) -> None:
        assert self.state is not None
        self.state.ids.extend(ids)
        if self._prefix_at and len(self.state.ids) == self._prefix_at:
            assert self.layout is not None
            self.caches.share_prefix(self.layout, self.state)
            self._prefix_at = 0

    def token(self, token: int) -> bool:
        assert self.state is not None and self._decoder is not None and self._stops is not None
        self._last_at = time.perf_counter()
        if not self._first_at:
            self._first_at = self._last_at
            self.state.text = None  # from here on the cache holds generated ids
        if token in self.eos_ids:
            self._reason = "stop"
            return False
        self._completion += 1
        self._show(self._stops.push(self._decoder.push(token)))
        if self._stops.stopped or (self.constraint is not None and self.constraint.done):
            self._reason = "stop"  # a complete grammar allows nothing more: no run-on
            return False
        return True

    def finished(self, outcome: Outcome) -> Feed | None:
        if outcome.reason == "cancelled" or self.state is None:
            return None
        assert self._decoder is not None and self._stops is not None
        state = self.state
        self._show(self._stops.push(self._decoder.flush()))
        if self._stops.stopped:
            self._reason = "stop"
        else:
            self._show(self._stops.flush())
        n = self._completion
        self.emit(Finished(self._reason, Usage(
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=n,
            cached_tokens=self.reused,
            evicted_tokens=getattr(state.cache, "evicted_tokens", None),
            dropped_turns=self.dropped,
            time_to_first_token_ms=round((self._first_at - self.submitted) * 1000, 2),
            decode_tokens_per_s=_rate(n - 1, self._last_at - self._first_at
                                      - outcome.compile_seconds),
            batch_size=max(outcome.batch_size, 1),
            cache_source=self.source,
        )))
        # Close the assistant turn the way the chat template writes it.
        closed_text = self.prompts.render(
            [*self.messages, {"role": "assistant", "content": "".join(self._answer)}],
            generation_prompt=False, tools=self.tools)
        closed_ids = self.prompts.encode_after(self.prompt_text, self.prompt_ids, closed_text)
        plan = self.caches.plan(state, closed_ids, self._fresh, need_logits=False)
        self.state = plan.state
        self.caches.hold(self, plan.state)
        self._closing_text, self._closing_length = closed_text, len(closed_ids)
        return self._feed(plan, closed_ids)

    def released(self) -> None:
        if self.state is not None and self._closing_text is not None \
                and len(self.state.ids) == self._closing_length:
            # The closing ids all went in (a stopping scheduler releases without feeding them).
            self.state.text = self._closing_text
        self.caches.keep(self, self.state)
        self._on_released()

    def failed(self, error: Exception) -> None:
        if isinstance(error, (ContextTooLong, AgentContextTooLong)):
            self.emit(error)
        else:
            log.error("local engine: generation failed", exc_info=error)
            self.emit(EngineError(f"generation failed: {type(error).__name__}: {error}"))
        self.caches.keep(self, None)  # the cache is in an unknown state: dropped
        self._on_released()

    # -- helpers -----------------------------------------------------------------------------------
    def _fresh(self) -> Conversation:
        state, self._prefix_at = self.caches.fresh(self.layout)
        return state

    def _feed(self, plan: Plan, target: Sequence[int], reserve: int = 0) -> Feed:
        """What the scheduler feeds: the ids of ``target`` past ``plan.keep``, less a bounded
        rebuild's skip. A chunk must end at the pinned prefix when a copy of it is to be kept.
        """
        ids = list(target[plan.keep:])
        skip = plan.skip
        if skip is not None:
            offset, skipped = skip
            ids = ids[:offset] + ids[offset + len(skipped):]
        breaks = (self._prefix_at - plan.keep,) if self._prefix_at > plan.keep else ()
        return Feed(plan.state.cache, ids, reserve=reserve, breaks=breaks, skip=skip)

    def _show(self, text: str) -> None:
        if text:
            self._answer.append(text)
            self.emit(TextChunk(text))

    def __repr__(self) -> str:
        return f"Turn({self.request.conversation_id!r})"


def _rate(tokens: int, seconds: float) -> float | None:
    """Decode tokens/s, or None when there is nothing to divide (one token, no time)."""
    return round(tokens / seconds, 2) if tokens > 0 and seconds > 0 else None
