"""``local``: a Hugging Face model run in this process, with a KV cache kept per conversation.

Loading
    :meth:`LocalEngine.start` loads the tokenizer and model once (``STREAMING_LLM_MODEL``: a hub id
    or a local path; empty = the built-in demo model, see :mod:`.demo_model`), off the event loop,
    logging each step. ``device=auto`` is CUDA when torch sees one, else CPU; ``dtype=auto`` is
    bfloat16 on CUDA and float32 elsewhere. With streaming on, a model whose positions cannot be
    shifted is refused at start-up with a hint to use dense mode, and the recent window is clamped
    so that sinks + window stay inside the positions the model was trained on.

Threading
    The model is not re-entrant, so everything that touches it runs in one worker thread (a
    single-thread executor); requests queue there in arrival order. Each request's tokens reach
    the event loop through an ``asyncio.Queue`` fed with ``loop.call_soon_threadsafe``, so the
    server keeps answering while a turn is generated. Closing the stream (``aclose()`` or task
    cancellation) sets the request's cancel flag, which the worker checks before every decode step
    and between prompt chunks.

Per-conversation cache
    After a turn, the conversation keeps its KV cache and the ids of every token that cache has
    consumed, including the tokens that close the assistant turn in the chat template. The kept
    ids are *canonical*: the cache is brought to exactly the tokenization of the rendered
    conversation (the generated ids are rolled back to where they first differ from it), so the
    next turn's rendered prompt normally extends them and only the new tokens are prefilled
    (``cached_tokens`` in the usage); a cache served this way matches a replay from scratch. When
    the prompt departs from the kept ids (an edited agent, dropped turns), the cache is rolled back
    to the common prefix where possible, else the whole history is replayed through a fresh cache.
    At most ``cached_conversations`` caches are kept, least recently used dropped first.

    Streaming on: a :class:`~.sink_cache.SinkCache` (attention sinks + recent window), so a
    conversation never outgrows the model; the kept ids are the logical sequence, evicted tokens
    included, and room for the prompt and ``max_new_tokens`` is made before each turn. Streaming
    off: a plain ``DynamicCache``; the oldest turns are left out of the prompt until prompt +
    ``max_new_tokens`` fit the model's context, reported as ``dropped_turns``.

Sampling defaults (when a request leaves them unset)
    temperature :data:`DEFAULT_TEMPERATURE`, top-p :data:`DEFAULT_TOP_P`, top-k off; temperature 0
    is greedy. Generation stops at an end-of-sequence id (the tokenizer's and the generation
    config's), at a stop string (never included in the text) or after ``max_new_tokens``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import ContextTooLong, EngineError, EngineNotReady, EngineUnavailable, ModelNotFound
from ..settings import Settings
from . import demo_model
from .base import Chunk, EngineHealth, EngineRequest, Finished, PromptTokens, TextChunk, Usage
from .detokenize import IncrementalDecoder, StopMatcher

log = logging.getLogger(__name__)

DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 0
PREFILL_CHUNK = 512  # prompt tokens per forward call; the cancel flag is checked between chunks
# A sink cache never shows the model a position beyond sinks + window - 1, so the window only has
# to fit below the trained context; no extra headroom is needed.
HEADROOM = 0

# For tokenizers that ship without a chat template (base models).
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

_END = object()  # the worker finished with a request (sent after its last chunk)


@dataclass
class _Conversation:
    cache: Any  # SinkCache (streaming) or DynamicCache (dense)
    ids: list[int]  # every token the cache has consumed, oldest first (evicted ones included)
    # The rendered chat text whose tokenization ``ids`` is; None while they are not canonical
    # (mid-answer, after a cancel).
    text: str | None = None


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
        self._lock = threading.Lock()  # guards _conversations and _active
        self._conversations: OrderedDict[str, _Conversation] = OrderedDict()
        self._active: _Job | None = None
        self._active_state: _Conversation | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._ready = False
        self._closed = False
        self._error: str | None = None
        self._model_name = settings.model or demo_model.NAME
        self._detail: str | None = demo_model.NOTICE if not settings.model else None
        self._device = ""
        self._dtype = ""
        self._context = 0
        self._window = settings.window_tokens
        self._eos_ids: frozenset[int] = frozenset()
        self._boundaries: tuple[str, ...] = ()  # special tokens that start a fresh tokenization

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._load)
        except Exception as exc:
            self._error = self._load_error(exc)
            log.error("local engine: %s", self._error)
            kind = ModelNotFound if isinstance(exc, OSError) else EngineUnavailable
            raise kind(self._error) from exc
        self._ready = True

    async def close(self) -> None:
        self._closed = True
        self._ready = False
        with self._lock:
            if self._active is not None:
                self._active.cancel.set()
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        with self._lock:
            self._conversations.clear()
        self._model = None

    async def health(self) -> EngineHealth:
        if self._error is not None:
            return EngineHealth(ready=False, model=self._model_name, detail=self._error,
                                extra={"state": "failed"})
        if self._closed:
            return EngineHealth(ready=False, model=self._model_name, detail="shut down",
                                extra={"state": "closed"})
        if not self._ready:
            detail = f"loading {self._model_name}"
            if self._detail:
                detail += f"; {self._detail}"
            return EngineHealth(ready=False, model=self._model_name, detail=detail,
                                extra={"state": "loading"})
        with self._lock:
            states = list(self._conversations.values())
            if self._active_state is not None:
                states.append(self._active_state)
            kept = len(self._conversations)
        extra: dict[str, object] = {
            "state": "ready",
            "device": self._device,
            "dtype": self._dtype,
            "streaming": self.settings.streaming,
            "context_tokens": self._context,
            "cached_conversations": kept,
            "cached_conversations_limit": self.settings.cached_conversations,
            "kv_bytes": sum(_cache_nbytes(s.cache) for s in states),
        }
        if self.settings.streaming:
            extra["sink_tokens"] = self.settings.sink_tokens
            extra["window_tokens"] = self._window
        return EngineHealth(ready=True, model=self._model_name, detail=self._detail, extra=extra)

    async def idle(self) -> None:
        """Wait until the worker has done everything submitted so far (tests, benchmarks).

        After a turn's :class:`Finished` the worker still closes the assistant turn in the
        conversation's cache; this waits for that too.
        """
        await asyncio.get_running_loop().run_in_executor(self._executor, lambda: None)

    def forget(self, conversation_id: str) -> None:
        with self._lock:
            self._conversations.pop(conversation_id, None)
            job = self._active
            if job is not None and job.request.conversation_id == conversation_id:
                job.forgotten = True

    # --- loading (worker thread) ----------------------------------------------------------------
    def _load(self) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        started = time.perf_counter()
        s = self.settings
        if s.model:
            source = s.model
        else:
            # The notice itself is logged once the engine is ready (app._start_engine).
            source = str(demo_model.ensure_demo_model(s.data_dir))
        device = _resolve_device(s.device, torch)
        dtype = _resolve_dtype(s.dtype, device, torch)
        self._device, self._dtype = device, str(dtype).removeprefix("torch.")
        log.info("local engine: loading %s (device %s, dtype %s)", self._model_name, device,
                 self._dtype)

        config = AutoConfig.from_pretrained(source)
        if s.streaming:
            from .sink_cache import check_streaming_support

            check_streaming_support(config)  # before the weights: fail fast
        self._context = _context_length(config)

        tokenizer = AutoTokenizer.from_pretrained(source)
        if tokenizer.chat_template is None:
            log.warning("local engine: %s has no chat template; using a plain one", source)
            tokenizer.chat_template = FALLBACK_TEMPLATE
        log.info("local engine: tokenizer ready (%d tokens)", len(tokenizer))

        kwargs: dict[str, Any] = {"dtype": dtype}
        if device.startswith("cuda"):
            kwargs["device_map"] = device  # load the weights straight onto the GPU
        model: Any = AutoModelForCausalLM.from_pretrained(source, config=config, **kwargs)
        model.to(device).eval()
        n_params = sum(p.numel() for p in model.parameters())
        log.info("local engine: model ready in %.1f s (%s, %.1fM parameters, %d positions)",
                 time.perf_counter() - started, config.model_type, n_params / 1e6, self._context)

        if s.streaming:
            limit = self._context - s.sink_tokens - HEADROOM
            if limit < 1:
                raise ValueError(f"the model's context ({self._context} positions) is too short "
                                 f"for {s.sink_tokens} sink tokens")
            self._window = min(s.window_tokens, limit)
            if self._window < s.window_tokens:
                log.warning("local engine: window clamped from %d to %d tokens (the model was "
                            "trained on %d positions; %d are sinks)", s.window_tokens,
                            self._window, self._context, s.sink_tokens)
            log.info("local engine: streaming cache, %d sink + %d recent tokens", s.sink_tokens,
                     self._window)
        else:
            log.info("local engine: dense cache; oldest turns are dropped beyond %d tokens",
                     self._context)

        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(model.generation_config, "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self._eos_ids = frozenset(i for i in eos if i is not None)
        added = getattr(tokenizer, "added_tokens_decoder", {}).values()
        self._boundaries = tuple(t.content for t in added if t.special and not t.lstrip)
        self._tokenizer, self._model = tokenizer, model

    def _load_error(self, exc: Exception) -> str:
        from .sink_cache import UnsupportedModel

        if isinstance(exc, UnsupportedModel):
            message = f"{self._model_name}: {exc}"
            if "STREAMING_LLM_STREAMING=false" not in message:
                message += ("; set STREAMING_LLM_STREAMING=false to serve it with a dense cache "
                            "(the oldest turns are dropped to fit its context)")
            return message
        return f"could not load model {self._model_name!r}: {type(exc).__name__}: {exc}"

    # --- streaming (event loop) -----------------------------------------------------------------
    def stream(self, request: EngineRequest) -> AsyncIterator[Chunk]:
        return self._stream(request)

    def refusal(self) -> EngineError | None:
        if self._ready:
            return None
        if self._error is not None:
            return EngineUnavailable(self._error)
        if self._closed:
            return EngineUnavailable("the local engine has shut down")
        return EngineNotReady(f"the model {self._model_name} is still loading")

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

    # --- generation (worker thread) -------------------------------------------------------------
    def _run(self, job: _Job) -> None:
        job.started = True
        if job.cancel.is_set() or self._closed:
            return
        import torch

        cid = job.request.conversation_id
        with self._lock:
            self._active = job
            state = self._conversations.pop(cid, None)
        try:
            with torch.inference_mode():
                self._turn(job, state)
        except ContextTooLong as exc:
            job.emit(exc)
        except Exception as exc:
            log.exception("local engine: generation failed")
            job.emit(EngineError(f"generation failed: {type(exc).__name__}: {exc}"))
        finally:
            with self._lock:
                self._active = None
                self._active_state = None

    def _turn(self, job: _Job, state: _Conversation | None) -> None:
        from .decoding import Sampler, eviction_chunk, forward_tokens

        request, cancel = job.request, job.cancel
        opts = request.options
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        max_new = request.max_new_tokens
        dropped: int | None = None
        if self.settings.streaming:
            prompt_text = self._render(messages, generation_prompt=True)
            prompt_ids = self._encode_prompt(state, prompt_text)
        else:
            prompt_text, prompt_ids, max_new, dropped = self._fit_dense(state, messages, max_new)
        job.emit(PromptTokens(len(prompt_ids)))

        state, reused, logits = self._advance(state, prompt_ids, prompt_text, reserve=max_new,
                                              cancel=cancel)
        self._active_state = state
        if logits is None:  # cancelled during the prompt
            self._keep(job, state)
            return
        state.text = None  # from here on the cache holds generated ids

        sampler = Sampler(
            temperature=DEFAULT_TEMPERATURE if opts.temperature is None else opts.temperature,
            top_p=DEFAULT_TOP_P if opts.top_p is None else opts.top_p,
            top_k=DEFAULT_TOP_K if opts.top_k is None else opts.top_k,
            seed=opts.seed,
        )
        decoder = IncrementalDecoder(self._tokenizer)
        stops = StopMatcher(opts.stop)
        answer: list[str] = []
        generated: list[int] = []
        reason: Literal["stop", "length"] = "length"
        first_at = last_at = 0.0

        def full(cache: Any) -> bool:
            return self.settings.streaming and cache.get_seq_length() >= cache.capacity

        def show(text: str) -> None:
            if text:
                answer.append(text)
                job.emit(TextChunk(text))

        while not cancel.is_set():
            token = sampler(logits)
            last_at = time.perf_counter()
            if not generated and not first_at:
                first_at = last_at
            if token in self._eos_ids:
                reason = "stop"
                break
            generated.append(token)
            show(stops.push(decoder.push(token)))
            if stops.stopped:
                reason = "stop"
                break
            if len(generated) >= max_new:
                break
            if full(state.cache):
                state.cache.make_room(eviction_chunk(state.cache.window_tokens))
            logits = forward_tokens(self._model, state.cache, [token])
            state.ids.append(token)
        if cancel.is_set():
            self._keep(job, state)
            return
        show(stops.push(decoder.flush()))
        if stops.stopped:
            reason = "stop"
        else:
            show(stops.flush())

        n = len(generated)
        job.emit(Finished(reason, Usage(
            prompt_tokens=len(prompt_ids),
            completion_tokens=n,
            cached_tokens=reused,
            evicted_tokens=getattr(state.cache, "evicted_tokens", None),
            dropped_turns=dropped,
            time_to_first_token_ms=round((first_at - job.submitted) * 1000, 2),
            decode_tokens_per_s=(round((n - 1) / (last_at - first_at), 2)
                                 if n > 1 and last_at > first_at else None),
        )))

        # Close the assistant turn the way the chat template writes it, so the next turn's prompt
        # extends the kept ids. Done after Finished: it costs the caller nothing now.
        closed_text = self._render(
            [*messages, {"role": "assistant", "content": "".join(answer)}],
            generation_prompt=False,
        )
        closed_ids = self._encode_after(prompt_text, prompt_ids, closed_text)
        state, _, _ = self._advance(state, closed_ids, closed_text, reserve=0, cancel=cancel,
                                    need_logits=False)
        self._keep(job, state)

    # --- cache bookkeeping (worker thread) ------------------------------------------------------
    def _new_conversation(self) -> _Conversation:
        if self.settings.streaming:
            from .sink_cache import SinkCache

            cache: Any = SinkCache.from_model(self._model, self.settings.sink_tokens, self._window)
        else:
            from transformers import DynamicCache

            cache = DynamicCache()
        return _Conversation(cache=cache, ids=[])

    def _advance(self, state: _Conversation | None, target: Sequence[int], text: str, *,
                 reserve: int, cancel: threading.Event, need_logits: bool = True,
                 ) -> tuple[_Conversation, int, Any]:
        """Bring ``state`` to have consumed exactly ``target`` (the tokenization of ``text``);
        return it, the ids reused and the next-token logits (None when cancelled or not needed).

        Reuses the longest common prefix of the kept ids and ``target`` when the cache can be
        rolled back to it, else starts a fresh cache and replays ``target``.
        """
        if state is None:
            state = self._new_conversation()
        keep = _common_prefix(state.ids, target)
        if need_logits and keep == len(target):
            keep -= 1  # the last token must go through the model again to give logits
        state.text = None
        if keep < len(state.ids) and not self._rollback(state, keep):
            state = self._new_conversation()
            keep = 0
        logits = self._feed(state, target[keep:], reserve=reserve, cancel=cancel)
        if not cancel.is_set():
            state.text = text
        return state, keep, logits

    def _rollback(self, state: _Conversation, keep: int) -> bool:
        """Drop the cache's newest tokens so that it holds ``state.ids[:keep]``, if it can."""
        drop = len(state.ids) - keep
        if self.settings.streaming:
            if not state.cache.can_rollback(drop):  # some of them were evicted
                return False
            state.cache.rollback(drop)
        else:
            # A negative argument removes that many tokens in every transformers 5.x release.
            state.cache.crop(-drop)
        del state.ids[keep:]
        return True

    def _feed(self, state: _Conversation, ids: Sequence[int], *, reserve: int,
              cancel: threading.Event) -> Any:
        from .decoding import forward_tokens

        if not ids:
            return None
        if self.settings.streaming:
            # Make room for the prompt and the answer now, so that a normal answer needs no
            # eviction while it streams; at most half the window is set aside for the answer,
            # so a large max_new_tokens does not throw the conversation's recent past away.
            window = state.cache.window_tokens
            state.cache.make_room(min(len(ids) + min(reserve, window // 2), window))
        logits = None
        for start in range(0, len(ids), PREFILL_CHUNK):
            if cancel.is_set():
                return None
            chunk = list(ids[start:start + PREFILL_CHUNK])
            logits = forward_tokens(self._model, state.cache, chunk)
            state.ids.extend(chunk)
        return logits

    def _keep(self, job: _Job, state: _Conversation) -> None:
        limit = self.settings.cached_conversations
        with self._lock:
            if job.forgotten or self._closed or limit == 0:
                return
            cid = job.request.conversation_id
            self._conversations[cid] = state
            self._conversations.move_to_end(cid)
            while len(self._conversations) > limit:
                self._conversations.popitem(last=False)

    # --- prompts --------------------------------------------------------------------------------
    def _render(self, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
        return self._tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=False
        )

    def _encode_text(self, text: str) -> list[int]:
        # verbose=False: a long conversation is no mistake in streaming mode, so no warning that
        # it is longer than the model's maximum length.
        return list(self._tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def _encode_prompt(self, state: _Conversation | None, text: str) -> list[int]:
        """Tokenize ``text``, the whole rendered conversation, reusing the kept tokenization."""
        if state is not None and state.text:
            return self._encode_after(state.text, state.ids, text)
        return self._encode_text(text)

    def _encode_after(self, known_text: str, known_ids: list[int], text: str) -> list[int]:
        """Tokenize ``text`` given that ``known_ids`` is the tokenization of ``known_text``.

        Tokenizers split text at special tokens before anything else, so the ids of a text cut
        just before a special token are the ids of the two parts. When ``text`` extends
        ``known_text``, only the part from the last special token on is tokenized (normally the
        new turn, or the assistant marker and the answer), so a long conversation's turn does not
        pay for its whole history again.
        """
        if not text.startswith(known_text):
            return self._encode_text(text)
        rest = text[len(known_text):]
        if rest.startswith(self._boundaries):
            return [*known_ids, *self._encode_text(rest)]
        cut = max((known_text.rfind(b) for b in self._boundaries), default=-1)
        if cut > 0:
            tail = self._encode_text(known_text[cut:])
            if 0 < len(tail) <= len(known_ids) and known_ids[-len(tail):] == tail:
                return [*known_ids[:-len(tail)], *self._encode_text(text[cut:])]
        return self._encode_text(text)

    def _fit_dense(self, state: _Conversation | None, messages: list[dict[str, str]],
                   max_new: int) -> tuple[str, list[int], int, int]:
        """Leave out the oldest turns until prompt + ``max_new`` fit the model's context.

        A turn is a user message with the replies that follow it; the system message and the new
        message always stay. Returns the prompt ids, ``max_new`` (shortened only when even the
        shortest prompt leaves less room) and the number of turns left out; and the text.
        """
        head = messages[:1] if messages and messages[0]["role"] == "system" else []
        history, new = messages[len(head):-1], messages[-1:]
        turns: list[list[dict[str, str]]] = []
        for m in history:
            if m["role"] == "user" or not turns:
                turns.append([m])
            else:
                turns[-1].append(m)

        def encode(drop: int) -> tuple[str, list[int]]:
            kept = [m for turn in turns[drop:] for m in turn]
            text = self._render([*head, *kept, *new], generation_prompt=True)
            return text, self._encode_prompt(state, text)

        def fits(ids: list[int]) -> bool:
            return len(ids) + max_new <= self._context

        text, ids = encode(0)
        if fits(ids):
            return text, ids, max_new, 0
        lo, hi = 1, len(turns)  # find the fewest dropped turns that fit
        best: tuple[int, str, list[int]] | None = None
        while lo <= hi:
            mid = (lo + hi) // 2
            text, ids = encode(mid)
            if fits(ids):
                best, hi = (mid, text, ids), mid - 1
            else:
                lo = mid + 1
        if best is not None:
            return best[1], best[2], max_new, best[0]
        text, ids = encode(len(turns))
        if len(ids) >= self._context:
            raise ContextTooLong(
                f"the system prompt and the new message take {len(ids)} tokens; the model's "
                f"context is {self._context} (set STREAMING_LLM_STREAMING=true to stream past it)"
            )
        return text, ids, self._context - len(ids), len(turns)


# --- helpers ------------------------------------------------------------------------------------
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


def _context_length(config: Any) -> int:
    config = getattr(config, "text_config", None) or config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _resolve_device(setting: str, torch: Any) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("STREAMING_LLM_DEVICE=cuda but torch sees no CUDA device")
    if setting == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("STREAMING_LLM_DEVICE=mps but torch sees no MPS device")
    return setting


def _resolve_dtype(setting: str, device: str, torch: Any) -> Any:
    if setting == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, setting)
