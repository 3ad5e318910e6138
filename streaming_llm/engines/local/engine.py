"""The local engine: one worker thread owns the model; the event loop streams its tokens.

Threading
    The model is not re-entrant, so everything that touches it runs in one worker thread (a
    single-thread executor); requests queue there in arrival order. Each request's tokens reach
    the event loop through an ``asyncio.Queue`` fed with ``loop.call_soon_threadsafe``, so the
    server keeps answering while a turn is generated. Closing the stream (``aclose()`` or task
    cancellation) sets the request's cancel flag, which the worker checks before every decode step
    and between prompt chunks.

A turn (:meth:`LocalEngine._turn`)
    1. Render and tokenize the conversation (:mod:`.prompts`), reusing the kept tokenization.
    2. Bring the conversation's cache to exactly those ids (:meth:`LocalEngine._advance`): keep
       the longest common prefix of the kept ids, roll back (``cache.crop(-n)``) what differs,
       feed the rest; when the cache cannot roll back that far, replay through a fresh cache.
    3. The decode loop (:meth:`LocalEngine._decode`): sample, stream text, one
       :func:`~streaming_llm.engines.decoding.decode_step` per token, until EOS, a stop string,
       ``max_new_tokens`` or cancel.
    4. After :class:`Finished`, close the assistant turn the way the chat template writes it, so
       the kept ids are *canonical* (the tokenization of the rendered conversation) and the next
       turn's prompt normally extends them (``cached_tokens`` in the usage).

    Streaming on: a :class:`~streaming_llm.engines.sink_cache.SinkCache` (attention sinks + recent
    window), so a conversation never outgrows the model; the kept ids are the logical sequence,
    evicted tokens included, and room for the prompt and ``max_new_tokens`` is made before each
    turn. Streaming off: a plain ``DynamicCache``; the oldest turns are left out of the prompt
    until prompt + ``max_new_tokens`` fit the model's context, reported as ``dropped_turns``.
    At most ``cached_conversations`` caches are kept (:mod:`.store`).

Pinned agent prefix (streaming, ``pin_agent_prefix``)
    The sink region of a conversation's cache is the whole rendered agent prefix: everything the
    chat template writes before the first user message (system prompt + Markdown context), and
    never fewer than ``sink_tokens``; it is never evicted, and the recent window follows it. The
    window is ``window_tokens``, clamped so that prefix + window stay inside the trained context;
    a prefix that leaves the window less than a quarter of the cache is refused
    (:class:`~streaming_llm.errors.AgentContextTooLong`, also through :meth:`LocalEngine.refusal`
    before a turn is stored). Without a system message the sinks are the first ``sink_tokens``
    tokens, as in the paper. A new conversation starts from a copy of the agent's prefix cache
    (:class:`~.store.PrefixStore`, ``shared_prefixes``) instead of prefilling it again. An edited
    agent renders a different prefix: the next turn's prompt departs from the kept ids inside the
    prefix, so the cache is rolled back there or rebuilt from the new prefix.

Sampling defaults (when a request leaves them unset)
    temperature :data:`DEFAULT_TEMPERATURE`, top-p :data:`DEFAULT_TOP_P`, top-k off, min-p
    :data:`DEFAULT_MIN_P`, repetition penalty :data:`DEFAULT_REPETITION_PENALTY` over the last
    :data:`~streaming_llm.engines.decoding.PENALTY_WINDOW` tokens of the answer (not the prompt:
    an agent must be free to quote its context), presence and frequency penalties 0;
    temperature 0 is greedy (after the penalties). Generation stops at an end-of-sequence id (the tokenizer's and the generation
    config's), at a stop string (never included in the text) or after ``max_new_tokens``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from ...errors import (
    AgentContextTooLong,
    ContextTooLong,
    EngineError,
    EngineNotReady,
    EngineUnavailable,
    ModelNotFound,
)
from ...settings import Settings
from .. import demo_model
from ..base import Chunk, EngineHealth, EngineRequest, Finished, PromptTokens, TextChunk, Usage
from ..detokenize import IncrementalDecoder, StopMatcher
from .loading import DEMO, LoadedModel, load_error, load_model, model_name, resolve_source
from .prompts import Message, Prompts
from .store import Conversation, ConversationStore, PrefixStore

log = logging.getLogger("streaming_llm.engines.local")

DEFAULT_TEMPERATURE = 0.2  # SmolLM2-135M answers "What is the capital of France?" wrong at 0.7 (README)
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 0
DEFAULT_MIN_P = 0.05  # llama.cpp's default
DEFAULT_REPETITION_PENALTY = 1.1  # Ollama's default; keeps SmolLM2-135M out of loops (README)
PREFILL_CHUNK = 512  # prompt tokens per forward call; the cancel flag is checked between chunks

_END = object()  # the worker finished with a request (sent after its last chunk)


@dataclass(frozen=True)
class _Layout:
    """How a streaming conversation's cache is laid out for the agent it talks to."""

    prefix: str  # the pinned agent prefix as rendered; "" when none is pinned
    prefix_ids: list[int]
    sinks: int  # max(sink_tokens, len(prefix_ids))
    window: int


@dataclass
class _Job:
    request: EngineRequest
    emit: Callable[[object], None]
    submitted: float
    cancel: threading.Event = field(default_factory=threading.Event)
    started: bool = False
    forgotten: bool = False  # forget() was called while this job held the conversation


class LocalEngine:
    name = "local"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-engine")
        self._lock = threading.Lock()  # guards _active and _active_state
        self._conversations = ConversationStore(settings.cached_conversations)
        self._prefixes = PrefixStore(settings.shared_prefixes)  # worker thread only
        self._refusals: dict[str, EngineError | None] = {}  # by system message (event loop)
        self._active: _Job | None = None
        self._active_state: Conversation | None = None
        self._loaded: LoadedModel | None = None
        self._prompts: Prompts | None = None
        self._ready = False
        self._closed = False
        self._error: str | None = None
        self._model_name = model_name(settings.model)
        self._detail: str | None = demo_model.NOTICE if settings.model == DEMO else None
        self._progress: str | None = None  # what loading does now (health while loading)

    @property
    def _model(self) -> Any:
        assert self._loaded is not None
        return self._loaded.model

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._load)
        except Exception as exc:
            self._error = load_error(self._model_name, exc)
            log.error("local engine: %s", self._error)
            kind = ModelNotFound if isinstance(exc, OSError) else EngineUnavailable
            raise kind(self._error) from exc
        self._ready = True

    def _load(self) -> None:
        # The demo model's notice is logged once the engine is ready (app._start_engine).
        source = resolve_source(self.settings, self._report)
        self._progress = None
        self._loaded = load_model(self.settings, source, self._model_name)
        self._prompts = Prompts(self._loaded.tokenizer, self._loaded.boundaries)

    def _report(self, step: str) -> None:
        self._progress = step
        log.info("local engine: %s", step)

    async def close(self) -> None:
        self._closed = True
        self._ready = False
        with self._lock:
            if self._active is not None:
                self._active.cancel.set()
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        self._conversations.clear()
        self._prefixes.clear()
        self._loaded = None

    async def health(self) -> EngineHealth:
        if self._error is not None:
            return EngineHealth(ready=False, model=self._model_name, detail=self._error,
                                extra={"state": "failed"})
        if self._closed:
            return EngineHealth(ready=False, model=self._model_name, detail="shut down",
                                extra={"state": "closed"})
        if not self._ready or self._loaded is None:
            detail = f"loading {self._model_name}"
            if self._progress:
                detail += f"; {self._progress}"
            if self._detail:
                detail += f"; {self._detail}"
            return EngineHealth(ready=False, model=self._model_name, detail=detail,
                                extra={"state": "loading"})
        states = self._conversations.states() + self._prefixes.states()
        with self._lock:
            if self._active_state is not None:
                states.append(self._active_state)
        loaded = self._loaded
        extra: dict[str, object] = {
            "state": "ready",
            "device": loaded.device,
            "dtype": loaded.dtype,
            "streaming": self.settings.streaming,
            "context_tokens": loaded.context,
            "cached_conversations": len(self._conversations),
            "cached_conversations_limit": self.settings.cached_conversations,
            "kv_bytes": sum(_cache_nbytes(s.cache) for s in states),
        }
        if self.settings.streaming:
            extra["sink_tokens"] = self.settings.sink_tokens
            extra["window_tokens"] = loaded.window
            extra["pin_agent_prefix"] = self.settings.pin_agent_prefix
            extra["shared_prefixes"] = len(self._prefixes.states())
        return EngineHealth(ready=True, model=self._model_name, detail=self._detail, extra=extra)

    async def idle(self) -> None:
        """Wait until the worker has done everything submitted so far (tests, benchmarks).

        After a turn's :class:`Finished` the worker still closes the assistant turn in the
        conversation's cache; this waits for that too.
        """
        await asyncio.get_running_loop().run_in_executor(self._executor, lambda: None)

    def forget(self, conversation_id: str) -> None:
        self._conversations.forget(conversation_id)
        with self._lock:
            job = self._active
            if job is not None and job.request.conversation_id == conversation_id:
                job.forgotten = True

    # --- the thread bridge (event loop) ---------------------------------------------------------
    def stream(self, request: EngineRequest) -> AsyncIterator[Chunk]:
        return self._stream(request)

    def refusal(self, system: str | None = None) -> EngineError | None:
        if self._ready:
            return self._agent_refusal(system) if system else None
        if self._error is not None:
            return EngineUnavailable(self._error)
        if self._closed:
            return EngineUnavailable("the local engine has shut down")
        return EngineNotReady(f"the model {self._model_name} is still loading")

    def _agent_refusal(self, system: str) -> EngineError | None:
        """AgentContextTooLong when this system message, pinned, leaves too small a window."""
        if not (self.settings.streaming and self.settings.pin_agent_prefix):
            return None
        if system not in self._refusals:
            assert self._prompts is not None
            prefix = self._prompts.agent_prefix([{"role": "system", "content": system}])
            try:
                self._layout(prefix, self._prompts.encode_text(prefix) if prefix else [])
                refused = None
            except AgentContextTooLong as exc:
                refused = exc
            if len(self._refusals) >= 256:
                self._refusals.clear()
            self._refusals[system] = refused
        return self._refusals[system]

    async def _stream(self, request: EngineRequest) -> AsyncIterator[Chunk]:
        if (refused := self.refusal()) is not None:
            raise refused
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()

        def emit(item: object) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                job.cancel.set()

        job = _Job(request=request, emit=emit, submitted=time.perf_counter())
        future = loop.run_in_executor(self._executor, self._run, job)
        future.add_done_callback(lambda _: queue.put_nowait(_END))
        finished = False
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    raise EngineUnavailable("the local engine stopped before the answer ended")
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, (PromptTokens, TextChunk, Finished))
                if isinstance(item, Finished):
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                job.cancel.set()
                if not job.started:
                    future.cancel()  # still queued behind another request: never runs
                else:
                    # Stops within one decode step; waiting keeps the conversation's cache
                    # consistent for whatever the caller does next.
                    await asyncio.gather(future, return_exceptions=True)

    # --- a turn (worker thread) -----------------------------------------------------------------
    def _run(self, job: _Job) -> None:
        job.started = True
        if job.cancel.is_set() or self._closed:
            return
        import torch

        with self._lock:
            self._active = job
        state = self._conversations.take(job.request.conversation_id)
        try:
            with torch.inference_mode():
                self._turn(job, state)
        except (ContextTooLong, AgentContextTooLong) as exc:
            job.emit(exc)
        except Exception as exc:
            log.exception("local engine: generation failed")
            job.emit(EngineError(f"generation failed: {type(exc).__name__}: {exc}"))
        finally:
            with self._lock:
                self._active = None
                self._active_state = None

    def _turn(self, job: _Job, state: Conversation | None) -> None:
        assert self._prompts is not None and self._loaded is not None
        prompts, request = self._prompts, job.request
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        known_text, known_ids = (state.text, state.ids) if state is not None else (None, [])
        max_new, dropped = request.max_new_tokens, None
        layout: _Layout | None = None
        if self.settings.streaming:
            prompt_text = prompts.render(messages, generation_prompt=True)
            prompt_ids = prompts.encode_prompt(known_text, known_ids, prompt_text)
            layout = self._layout(*self._pinned(messages, prompt_text, prompt_ids))
            if state is not None and state.cache.sink_tokens != layout.sinks:
                state = None  # the agent's prefix changed length: rebuild from the new one
        else:
            prompt_text, prompt_ids, max_new, dropped = prompts.fit_dense(
                known_text, known_ids, messages, max_new, self._loaded.context)
        job.emit(PromptTokens(len(prompt_ids)))

        def fresh() -> Conversation:
            return self._new_conversation(layout, job.cancel)

        state, reused, logits = self._advance(state, prompt_ids, prompt_text, fresh=fresh,
                                              reserve=max_new, cancel=job.cancel)
        self._active_state = state
        if logits is not None:  # else cancelled during the prompt
            state.text = None  # from here on the cache holds generated ids
            answer = self._decode(job, state, logits, max_new, len(prompt_ids), reused, dropped)
            if answer is not None:
                self._close_turn(job, state, messages, prompt_text, prompt_ids, answer, fresh)
        self._keep(job, state)

    def _decode(self, job: _Job, state: Conversation, logits: Any, max_new: int,
                prompt_tokens: int, reused: int, dropped: int | None) -> str | None:
        """The decode loop: stream the answer, emit :class:`Finished`; return the answer's text,
        or None when cancelled."""
        from ..decoding import PENALTY_WINDOW, Sampler, decode_step

        assert self._loaded is not None
        opts, cancel, model = job.request.options, job.cancel, self._loaded.model
        sampler = Sampler(
            temperature=DEFAULT_TEMPERATURE if opts.temperature is None else opts.temperature,
            top_p=DEFAULT_TOP_P if opts.top_p is None else opts.top_p,
            top_k=DEFAULT_TOP_K if opts.top_k is None else opts.top_k,
            seed=opts.seed,
            min_p=DEFAULT_MIN_P if opts.min_p is None else opts.min_p,
            repetition_penalty=(DEFAULT_REPETITION_PENALTY if opts.repetition_penalty is None
                                else opts.repetition_penalty),
            presence_penalty=opts.presence_penalty or 0.0,
            frequency_penalty=opts.frequency_penalty or 0.0,
        )
        decoder = IncrementalDecoder(self._loaded.tokenizer)
        stops = StopMatcher(opts.stop)
        answer: list[str] = []
        generated: list[int] = []
        reason: Literal["stop", "length"] = "length"
        first_at = last_at = 0.0

        def show(text: str) -> None:
            if text:
                answer.append(text)
                job.emit(TextChunk(text))

        while not cancel.is_set():
            token = sampler(logits, generated[-PENALTY_WINDOW:])
            last_at = time.perf_counter()
            if not generated and not first_at:
                first_at = last_at
            if token in self._loaded.eos_ids:
                reason = "stop"
                break
            generated.append(token)
            show(stops.push(decoder.push(token)))
            if stops.stopped:
                reason = "stop"
                break
            if len(generated) >= max_new:
                break
            logits = decode_step(model, state.cache, token)
            state.ids.append(token)
        if cancel.is_set():
            return None
        show(stops.push(decoder.flush()))
        if stops.stopped:
            reason = "stop"
        else:
            show(stops.flush())

        n = len(generated)
        job.emit(Finished(reason, Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=n,
            cached_tokens=reused,
            evicted_tokens=getattr(state.cache, "evicted_tokens", None),
            dropped_turns=dropped,
            time_to_first_token_ms=round((first_at - job.submitted) * 1000, 2),
            decode_tokens_per_s=(round((n - 1) / (last_at - first_at), 2)
                                 if n > 1 and last_at > first_at else None),
        )))
        return "".join(answer)

    def _close_turn(self, job: _Job, state: Conversation, messages: list[Message],
                    prompt_text: str, prompt_ids: list[int], answer: str,
                    fresh: Callable[[], Conversation]) -> None:
        """Close the assistant turn the way the chat template writes it, so the next turn's
        prompt extends the kept ids. Done after Finished: it costs the caller nothing now."""
        assert self._prompts is not None
        closed_text = self._prompts.render(
            [*messages, {"role": "assistant", "content": answer}], generation_prompt=False)
        closed_ids = self._prompts.encode_after(prompt_text, prompt_ids, closed_text)
        self._advance(state, closed_ids, closed_text, fresh=fresh, reserve=0, cancel=job.cancel,
                      need_logits=False)

    # --- the pinned agent prefix ----------------------------------------------------------------
    def _pinned(self, messages: list[Message], prompt_text: str, prompt_ids: list[int],
                ) -> tuple[str, list[int]]:
        """The agent prefix to pin and its ids (a prefix of ``prompt_ids``), or ("", [])."""
        assert self._prompts is not None
        if not self.settings.pin_agent_prefix:
            return "", []
        prefix = self._prompts.agent_prefix(messages)
        if not prefix or not prompt_text.startswith(prefix):
            return "", []
        ids = self._prompts.encode_text(prefix)
        if prompt_ids[:len(ids)] != ids:  # the template tokenizes across the boundary
            return "", []
        return prefix, ids

    def _layout(self, prefix: str, prefix_ids: list[int]) -> _Layout:
        """Sinks = the pinned prefix (at least ``sink_tokens``), then as much window as fits."""
        assert self._loaded is not None
        sinks = max(self.settings.sink_tokens, len(prefix_ids))
        window = min(self._loaded.window, self._loaded.context - sinks)
        if 3 * window < sinks:  # the window would be less than a quarter of sinks + window
            raise AgentContextTooLong(
                f"the agent's system prompt and Markdown context take {len(prefix_ids)} tokens, "
                f"which leaves {max(window, 0)} tokens of a {sinks + max(window, 0)}-token cache "
                f"for the conversation (at least a quarter is needed; the model was trained on "
                f"{self._loaded.context} positions): shorten the agent's context, or raise "
                "STREAMING_LLM_WINDOW_TOKENS")
        return _Layout(prefix, prefix_ids, sinks, window)

    # --- cache bookkeeping (worker thread) ------------------------------------------------------
    def _new_conversation(self, layout: _Layout | None, cancel: threading.Event) -> Conversation:
        """A fresh cache; for a pinned prefix, a copy of the agent's kept prefix cache (built and
        kept on first use), so the prefix is prefilled once per agent version."""
        assert self._loaded is not None
        if layout is None or not self.settings.streaming:
            from transformers import DynamicCache

            return Conversation(cache=DynamicCache(), ids=[])
        if layout.prefix_ids and (shared := self._prefixes.get(layout.prefix)) is not None:
            return shared
        from ..sink_cache import SinkCache

        state = Conversation(cache=SinkCache.from_model(self._loaded.model, layout.sinks,
                                                        layout.window), ids=[])
        if layout.prefix_ids:
            self._feed(state, layout.prefix_ids, reserve=0, cancel=cancel)
            if len(state.ids) == len(layout.prefix_ids):  # not cancelled half-way
                self._prefixes.put(layout.prefix, state)
        return state

    def _advance(self, state: Conversation | None, target: Sequence[int], text: str, *,
                 fresh: Callable[[], Conversation], reserve: int, cancel: threading.Event,
                 need_logits: bool = True) -> tuple[Conversation, int, Any]:
        """Bring ``state`` to have consumed exactly ``target`` (the tokenization of ``text``);
        return it, the ids reused from a kept cache and the next-token logits (None when cancelled or not needed).

        Reuses the longest common prefix of the kept ids and ``target`` when the cache can be
        rolled back to it, else starts a fresh cache and replays ``target``.
        """
        copied: int | None = None  # for a fresh cache: the tokens it got from a kept one
        if state is None:
            state = fresh()
            copied = state.copied
        keep = _common_prefix(state.ids, target)
        if need_logits and keep == len(target):
            keep -= 1  # the last token must go through the model again to give logits
        state.text = None
        if keep < len(state.ids) and not _rollback(state, keep):
            state = fresh()
            # A fresh conversation holds nothing or the pinned prefix, a prefix of every target.
            keep, copied = len(state.ids), state.copied
            assert list(target[:keep]) == state.ids and keep < len(target)
        logits = self._feed(state, target[keep:], reserve=reserve, cancel=cancel)
        if not cancel.is_set():
            state.text = text
        return state, keep if copied is None else min(keep, copied), logits

    def _feed(self, state: Conversation, ids: Sequence[int], *, reserve: int,
              cancel: threading.Event) -> Any:
        from ..decoding import forward_tokens

        if not ids:
            return None
        cache = state.cache
        if hasattr(cache, "make_room"):
            # Make room for the prompt and the answer now, so that a normal answer needs no
            # eviction while it streams; at most half the window is set aside for the answer,
            # so a large max_new_tokens does not throw the conversation's recent past away.
            window = cache.window_tokens
            cache.make_room(min(len(ids) + min(reserve, window // 2), window))
        before = _seen(cache)
        logits = forward_tokens(self._model, cache, ids, chunk_size=PREFILL_CHUNK,
                                should_stop=cancel.is_set)
        state.ids.extend(ids[:_seen(cache) - before])  # all of them unless cancelled
        return logits

    def _keep(self, job: _Job, state: Conversation) -> None:
        if job.forgotten or self._closed:
            return
        self._conversations.keep(job.request.conversation_id, state)


# --- helpers ------------------------------------------------------------------------------------
def _rollback(state: Conversation, keep: int) -> bool:
    """Drop the cache's newest tokens so that it holds ``state.ids[:keep]``, if it can.

    ``crop(-n)`` removes the newest ``n`` tokens from a ``DynamicCache`` (every transformers 5.x
    release) and from a :class:`~streaming_llm.engines.sink_cache.SinkCache`, which refuses when
    some of them were evicted.
    """
    try:
        state.cache.crop(keep - len(state.ids))
    except ValueError:
        return False
    del state.ids[keep:]
    return True


def _seen(cache: Any) -> int:
    """Tokens a cache has consumed: stored + evicted for a sink cache, stored for a dense one."""
    from ..sink_cache import SinkCache

    return cache.seen_tokens if isinstance(cache, SinkCache) else int(cache.get_seq_length())


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    if len(a) <= len(b) and list(a) == list(b[:len(a)]):  # the usual case, compared in C
        return len(a)
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _cache_nbytes(cache: Any) -> int:
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    total = 0
    for layer in getattr(cache, "layers", ()):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if tensor is not None and hasattr(tensor, "nbytes"):
                total += tensor.nbytes
    return total
