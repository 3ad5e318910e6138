"""The local engine: one scheduler thread owns the model; the event loop streams its tokens.

Runtimes
    ``STREAMING_LLM_RUNTIME`` (:func:`.loading.choose_runtime`): torch (transformers; the
    scheduler's :class:`~..runner.ModelRunner`, the step of :mod:`..step`, a SinkCache per
    conversation) or llama.cpp (a GGUF file in llama.cpp's library; :mod:`..llamacpp`'s runner and
    SeqCache). Everything below holds for both; what is torch-only says so.

Threading and batching
    The model is not re-entrant, so everything that touches it runs on the thread of one
    :class:`~streaming_llm.engines.scheduler.Scheduler` (the model is loaded before, on a
    single-thread executor). Every turn is a request of that scheduler, which steps all decoding
    conversations together, one forward pass per token for up to ``max_batch`` of them
    (``STREAMING_LLM_MAX_BATCH``; more wait in arrival order), and prefills a joining prompt in
    chunks of :data:`~..scheduler.PREFILL_CHUNK` tokens between decode steps. Each request's
    tokens reach the event loop through an ``asyncio.Queue`` fed with ``loop.call_soon_threadsafe``, so neither
    the server nor the other conversations wait for a slow client. Closing the stream
    (``aclose()`` or task cancellation) sets the request's cancel flag, which the scheduler
    checks before every step: the turn stops within one step, the others go on.

A turn (:class:`~.turn.Turn`, on the scheduler's thread)
    1. Render and tokenize the conversation (:mod:`.prompts`), reusing the kept tokenization.
    2. Plan how the conversation's cache reaches exactly those ids (:meth:`.caches.Caches.plan`):
       keep the longest common prefix of the kept ids, roll back (``cache.crop(-n)``) what
       differs, feed the rest; when the cache cannot roll back that far, replay through a fresh
       cache. The scheduler feeds the rest in chunks.
    3. Decode in the batch: sample, stream text, until EOS, a stop string, ``max_new_tokens``
       or cancel. ``usage`` is the turn's own, plus ``batch_size``, the most conversations that
       were decoded together with it.
    4. After :class:`Finished`, close the assistant turn the way the chat template writes it, so
       the kept ids are *canonical* (the tokenization of the rendered conversation) and the next
       turn's prompt normally extends them (``cached_tokens`` in the usage).

    Streaming on: a :class:`~streaming_llm.engines.sink_cache.SinkCache` (attention sinks + recent
    window), so a conversation never outgrows the model; the kept ids are the logical sequence,
    evicted tokens included, and room for the prompt and ``max_new_tokens`` is made before each
    turn. Streaming off: a plain ``DynamicCache``; the oldest turns are left out of the prompt
    until prompt + ``max_new_tokens`` fit the model's context, reported as ``dropped_turns``.
    At most ``cached_conversations`` caches are kept (:mod:`.caches`, :mod:`.store`).

Pinned agent prefix (streaming, ``pin_agent_prefix``)
    The sink region of a conversation's cache is the whole rendered agent prefix: everything the
    chat template writes before the first user message (system prompt + Markdown context), and
    never fewer than ``sink_tokens``; it is never evicted, and the recent window follows it. The
    window is ``window_tokens``, clamped so that prefix + window stay inside the trained context;
    a prefix that leaves the window less than a quarter of the cache is refused
    (:class:`~streaming_llm.errors.AgentContextTooLong`, also through :meth:`LocalEngine.refusal`
    before a turn is stored). Without a system message the sinks are the first ``sink_tokens``
    tokens, as in the paper. A new conversation starts from a copy of the agent's prefix cache
    (:class:`~.store.PrefixStore`, ``shared_prefixes``) instead of prefilling it again. All of
    this is :class:`~.caches.Caches`'; the engine keeps the lifecycle, health and the thread bridge. An edited
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
import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ...errors import (
    AgentContextTooLong,
    EngineError,
    EngineNotReady,
    EngineUnavailable,
    ModelNotFound,
)
from ...settings import Settings
from .. import demo_model
from ..base import (
    ChatMessage,
    Chunk,
    Constraint,
    EngineHealth,
    EngineRequest,
    Finished,
    PromptTokens,
    TextChunk,
)
from ..constraints import ConstraintState, Grammars
from ..decoding import Sampler
from ..precompile import Precompiler, folder_key, wanted_shapes
from ..scheduler import Request, Scheduler
from ..sink_cache import SinkCache
from ..step import LlamaStep, Step, build_step, llama_step_support
from .caches import Caches
from .disk import DiskTier, model_fingerprint
from .loading import (
    DEMO,
    LoadedModel,
    ModelFileError,
    choose_runtime,
    gguf_file,
    load_error,
    load_llama_cpp,
    load_model,
    model_name,
    resolve_source,
)
from .prompts import Prompts
from .turn import Turn

log = logging.getLogger("streaming_llm.engines.local")

DEFAULT_TEMPERATURE = 0.2  # SmolLM2-135M answers "What is the capital of France?" wrong at 0.7 (docs/engines.md)
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 0
DEFAULT_MIN_P = 0.05  # llama.cpp's default
DEFAULT_REPETITION_PENALTY = 1.1  # Ollama's default; keeps SmolLM2-135M out of loops (docs/engines.md)
MAX_BATCH_CPU, MAX_BATCH_CUDA = 8, 32  # STREAMING_LLM_MAX_BATCH=0: conversations decoded together

_END = object()  # the scheduler released the turn (sent after its last chunk)


class LocalEngine:
    name = "local"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-engine")
        self._refusals: dict[str, EngineError | None] = {}  # by system message (event loop)
        self._scheduler: Scheduler | None = None
        self._precompiler: Precompiler | None = None  # the compiled step's graphs, ahead of use
        self._loaded: LoadedModel | None = None
        self.prompts: Prompts | None = None  # once loaded
        self.caches: Caches | None = None  # once loaded
        self.grammars: Grammars | None = None  # once loaded: constrained decoding
        self._ready = False
        self._closed = False
        self._error: str | None = None
        self._model_name = model_name(settings.model)
        self._detail: str | None = demo_model.NOTICE if settings.model == DEMO else None
        self._progress: str | None = None  # what loading does now (health while loading)
        self.runtime = "torch"  # or "llama.cpp" (STREAMING_LLM_RUNTIME, resolved at load)

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
        finally:
            # The loading thread ends now, so that the scheduler's thread is the only one with
            # an OpenMP team: while two threads have one, libgomp counts more threads than CPUs
            # and puts its workers to sleep after every parallel region, which made every
            # decode step 1.5x slower (measured: 30.7 -> 19.8 tokens/s on 2 cores).
            await asyncio.to_thread(self._executor.shutdown, wait=True)
        self._ready = True

    def _load(self) -> None:
        # The demo model's notice is logged once the engine is ready (app._start_engine).
        self.runtime, why = choose_runtime(self.settings)
        log.info("local engine: runtime %s (%s)", self.runtime, why)
        if self.runtime == "llama.cpp":
            self._load_llama_cpp()
            return
        source = resolve_source(self.settings, self._report)
        self._progress = None
        self._loaded = load_model(self.settings, source, self._model_name)
        self.prompts = Prompts(self._loaded.tokenizer, self._loaded.boundaries)
        fingerprint = model_fingerprint(self._loaded.model, self._model_name)
        self.caches = Caches(self.settings, self.prompts, self._sink_cache,
                             context=self._loaded.context, window=self._loaded.window,
                             memory_bytes=_memory_budget(self.settings),
                             disk=self._disk_tier(fingerprint, self._sink_cache))
        vocab = getattr(self._loaded.model.config, "vocab_size", None) or len(
            self._loaded.tokenizer)
        self.grammars = Grammars(self._loaded.tokenizer, self._loaded.eos_ids, int(vocab))
        rows = self.settings.max_batch or (
            MAX_BATCH_CUDA if self._loaded.device.startswith("cuda") else MAX_BATCH_CPU)
        quantize = self._quantize()
        step = build_step(self._loaded.model, quantize=quantize, compile=self.settings.compile,
                          ahead=True)
        self._precompiler = self._precompile(step, source, rows, quantize, fingerprint)
        self._scheduler = Scheduler(self._loaded.model, max_batch=rows, step=step,
                                    name="local-engine-scheduler",
                                    idle=self._precompiler.idle if self._precompiler else None)
        log.info("local engine: decoding up to %d conversations in one batch (step %s)", rows,
                 step.name)

    def _load_llama_cpp(self) -> None:
        """The GGUF file in llama.cpp (:mod:`..llamacpp`): the same scheduler, caches and turns,
        with llama.cpp's caches and runner."""
        from ..llamacpp.cache import SeqCache
        from ..llamacpp.runner import LlamaCppRunner

        path = gguf_file(self.settings.model)
        if path is None:
            raise ModelFileError("STREAMING_LLM_RUNTIME=llama.cpp needs a GGUF model "
                                 "(STREAMING_LLM_MODEL empty or a .gguf file)")
        rows = self.settings.max_batch or MAX_BATCH_CPU
        loaded = self._loaded = load_llama_cpp(self.settings, path, self._model_name, rows,
                                               self._report)
        self._progress = None
        model = loaded.model
        self.prompts = Prompts(loaded.tokenizer, loaded.boundaries)

        def new_cache(sinks: int, window: int) -> SeqCache:
            return SeqCache(model, sinks, window)

        self.caches = Caches(self.settings, self.prompts, new_cache, context=loaded.context,
                             window=loaded.window, memory_bytes=_memory_budget(self.settings),
                             disk=self._disk_tier(model.fingerprint(), new_cache))
        self.grammars = Grammars(loaded.tokenizer, loaded.eos_ids, model.vocab_size)
        runner = LlamaCppRunner(model)
        runner.warm_up()  # on this thread, before the scheduler's exists: nothing else runs
        self._scheduler = Scheduler(model, max_batch=rows, runner=runner,
                                    name="local-engine-scheduler")
        log.info("local engine: decoding up to %d conversations in one batch (llama.cpp, %s)",
                 rows, model.description)

    def _quantize(self) -> str:
        """``quantize=auto``: fp16 products for a float32 Llama-family step on CPU (half the
        bytes per token, perplexity unchanged: docs/performance.md), else the model's weights."""
        chosen = self.settings.quantize
        if chosen != "auto":
            return chosen
        assert self._loaded is not None
        fits = (self._loaded.device == "cpu" and self._loaded.dtype == "float32"
                and llama_step_support(self._loaded.model) is None)
        return "fp16" if fits else "none"

    def _precompile(self, step: Step, source: str, rows: int, quantize: str,
                    fingerprint: str) -> Precompiler | None:
        """The compiled step's graphs, built ahead of use (:mod:`..precompile`)."""
        import torch

        if not isinstance(step, LlamaStep) or not self.settings.compile:
            return None
        assert self._loaded is not None and self.caches is not None
        loaded = self._loaded
        key = folder_key(fingerprint=fingerprint, quantize=quantize, dtype=loaded.dtype,
                         rows=rows, device=loaded.device)
        folder = self.settings.data_dir / "compile" / key
        # The serving process loads what the child built from the same cache (process-wide).
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
        capacity = self.settings.sink_tokens + loaded.window if self.settings.streaming else (
            loaded.context)
        spec = {"source": source, "dtype": loaded.dtype, "device": loaded.device,
                "quantize": quantize, "rows": rows, "threads": torch.get_num_threads()}
        return Precompiler(step, folder, spec, wanted_shapes(rows, capacity))

    def _sink_cache(self, sinks: int, window: int) -> SinkCache:
        assert self._loaded is not None
        return SinkCache.from_model(self._loaded.model, sinks, window)

    def _disk_tier(self, fingerprint: str, new_cache: Callable[[int, int], Any],
                   ) -> DiskTier | None:
        """The disk tier of the caches (streaming only: a dense prompt is already bounded by the
        model's context, which is what a rebuild costs)."""
        budget = _disk_budget(self.settings)
        if not self.settings.streaming or budget == 0:
            return None
        tier = DiskTier(self.settings.kv_path, budget,
                        fingerprint, new_cache)
        tier.start()
        if tier.enabled:
            log.info("local engine: KV cache files in %s (at most %.1f GiB)", tier.folder,
                     budget / 2**30)
        return tier

    def _report(self, step: str) -> None:
        self._progress = step
        log.info("local engine: %s", step)

    async def close(self) -> None:
        self._closed = True
        self._ready = False
        if self._scheduler is not None:  # cancels every turn; each stops within one step
            await asyncio.to_thread(self._scheduler.close)
        if self._precompiler is not None:
            self._precompiler.close()
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        if self.caches is not None:  # a graceful stop writes the cached conversations to disk
            await asyncio.to_thread(self.caches.close)
        if self._loaded is not None and self.runtime == "llama.cpp":
            self._loaded.model.close()  # its context and weights (the caches are written)
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
        loaded, scheduler, caches = self._loaded, self._scheduler, self.caches
        assert scheduler is not None and caches is not None
        held = caches.health()
        extra: dict[str, object] = {
            "state": "ready",
            "runtime": self.runtime,
            "device": loaded.device,
            "dtype": loaded.dtype,
            "streaming": self.settings.streaming,
            "context_tokens": loaded.context,
            "cached_conversations": held["cached_conversations"],
            "cached_conversations_limit": self.settings.cached_conversations,
            "kv_bytes": held["kv_bytes"],
            "max_batch": scheduler.max_batch,
            "decode_step": scheduler.step.name,
            "compile_seconds": round(scheduler.step.compile_seconds, 1),
            "compile": self._precompiler.status() if self._precompiler else {"state": "off"},
            "decoding": scheduler.decoding,
            "waiting": scheduler.waiting,
            "batch_kv_bytes": scheduler.batch_nbytes(),
        }
        extra.update((k, v) for k, v in held.items() if k not in extra and k != "shared_prefixes")
        if self.settings.streaming:
            extra["sink_tokens"] = self.settings.sink_tokens
            extra["window_tokens"] = loaded.window
            extra["pin_agent_prefix"] = self.settings.pin_agent_prefix
            extra["shared_prefixes"] = held["shared_prefixes"]
        return EngineHealth(ready=True, model=self._model_name, detail=self._detail, extra=extra)

    async def idle(self) -> None:
        """Wait until the scheduler has done everything submitted so far (tests, benchmarks).

        After a turn's :class:`Finished` the scheduler still closes the assistant turn in the
        conversation's cache; this waits for that too.
        """
        if self._scheduler is not None:
            await asyncio.to_thread(self._scheduler.wait_idle)

    def forget(self, conversation_id: str) -> None:
        if self.caches is not None:
            self.caches.forget(conversation_id)

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

    def check_constraint(self, constraint: Constraint) -> None:
        """Compile ``constraint`` (cached) or raise InvalidConstraint. Before the model has
        loaded nothing can be checked (and :meth:`refusal` refuses the turn anyway). The first
        call builds the grammar library's view of the vocabulary (about 1.5 s for 49k tokens):
        call it off the event loop."""
        if self.grammars is not None:
            self.grammars.check(constraint)

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int | None:
        """The rendered prompt's tokens (``/v1``'s prompt limit); None while the model loads.

        Runs on the caller's thread, beside the scheduler's: encoding with a fast tokenizer that
        is never reconfigured (no truncation or padding set) is safe to share, as refusal() does.
        """
        if not self._ready or self.prompts is None:
            return None
        text = self.prompts.render_chat(messages)
        return len(self.prompts.encode_text(text))

    def _agent_refusal(self, system: str) -> EngineError | None:
        """AgentContextTooLong when this system message, pinned, leaves too small a window."""
        if not (self.settings.streaming and self.settings.pin_agent_prefix):
            return None
        if system not in self._refusals:
            assert self.prompts is not None and self.caches is not None
            prefix = self.prompts.agent_prefix([{"role": "system", "content": system}])
            try:
                self.caches.layout(prefix, self.prompts.encode_text(prefix) if prefix else [])
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
        scheduler = self._scheduler
        assert scheduler is not None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        released = loop.create_future()

        cancel = threading.Event()

        def emit(item: object) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                cancel.set()

        def on_released() -> None:
            def settle() -> None:
                if not released.done():
                    released.set_result(None)
                queue.put_nowait(_END)

            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(settle)

        loaded, prompts, caches = self._loaded, self.prompts, self.caches
        assert loaded is not None and prompts is not None and caches is not None
        submitted = time.perf_counter()
        if caches.disk is not None and request.conversation_id not in caches.conversations:
            # The disk tier reads on its own thread, not the scheduler's.
            await asyncio.to_thread(caches.preload, request.conversation_id)
        constraint: ConstraintState | None = None
        if request.constraint is not None:
            assert self.grammars is not None
            constraint = await asyncio.to_thread(self.grammars.state, request.constraint)
        turn = Turn(request, emit, caches=caches, prompts=prompts, tokenizer=loaded.tokenizer,
                    eos_ids=loaded.eos_ids, streaming=self.settings.streaming,
                    context=loaded.context, submitted=submitted,
                    on_released=on_released, constraint=constraint)
        try:
            scheduler.submit(Request(key=request.conversation_id, handler=turn,
                                     sampler=self._sampler(request),
                                     max_new_tokens=request.max_new_tokens, cancel=cancel,
                                     constraint=constraint))
        except RuntimeError as exc:  # closed meanwhile
            raise EngineUnavailable("the local engine has shut down") from exc
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
                cancel.set()
                scheduler.wake()
                # Stops within one decode step (a queued turn never starts); waiting keeps the
                # conversation's cache consistent for whatever the caller does next.
                await released

    def _sampler(self, request: EngineRequest) -> Sampler:
        opts = request.options
        return Sampler(
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


def _memory_budget(settings: Settings) -> int:
    """``STREAMING_LLM_KV_MEMORY_BYTES``, or a quarter of the machine's memory."""
    if settings.kv_memory_bytes:
        return settings.kv_memory_bytes
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError):
        return 4 * 2**30


def _disk_budget(settings: Settings) -> int:
    """``STREAMING_LLM_KV_DISK_BYTES``, or a quarter of the free disk under the data dir (at
    most 64 GiB); 0 = no disk tier."""
    if settings.kv_disk_bytes >= 0:
        return settings.kv_disk_bytes
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(settings.data_dir).free
    except OSError:
        return 0
    return min(free // 4, 64 * 2**30)
