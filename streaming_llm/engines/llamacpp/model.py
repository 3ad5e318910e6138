"""A GGUF model in llama.cpp: the weights, one context, and which sequence holds which cache.

The context
    One ``llama_context`` whose KV memory is split into ``seqs`` sequences of ``seq_capacity``
    cells each (``kv_unified`` off: a step attends only to its own row's cells, so a row's cost
    does not grow with the other conversations' lengths). A sequence holds one conversation's
    cache while it is *resident*; ``seqs`` is the batch plus two, so every row of a step, the
    joining prompt and a copy being made are resident together.

Residency (:class:`SeqPool`)
    Conversations outnumber sequences: the caches kept between turns, the agents' prefixes.
    A cache that is not resident is *parked*: its sequence state as
    ``llama_state_seq_get_data`` wrote it (bytes; tokens, positions, keys and values). The pool
    places a cache before a step touches it, taking a free sequence or parking the least
    recently used cache that this step does not use, and restores it there. A dead cache's
    sequence is cleared the next time the pool runs (a cache may be dropped on any thread; only
    the model's thread calls llama.cpp).

Threads
    The scheduler's thread runs the steps; the disk tier may read a cache that left memory and
    the event loop's threads may spill one. Every call into llama.cpp holds :attr:`lock` (a
    step holds it from placing its caches to the end of its decode), so a cache is never moved
    while a step uses it.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = ["LlamaCppError", "LlamaCppModel", "SeqPool", "llama_cpp_available"]

log = logging.getLogger("streaming_llm.engines.llamacpp")

class _Backend:
    """llama.cpp's process-wide state: initialized once, its log callback kept alive (llama.cpp
    calls it for as long as the process runs)."""

    lock = threading.Lock()
    ready = False
    log_callback: Any = None


class LlamaCppError(RuntimeError):
    """llama.cpp refused something (a file, a context, a decode): the message says what."""


def llama_cpp_available() -> str | None:
    """None when ``llama_cpp`` imports, else why not (for ``backend=auto`` and its log line)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a library that fails to load
        return f"{type(exc).__name__}: {exc}"
    return None


def _init_backend() -> Any:
    """Import llama.cpp once per process, its log routed to ours (at debug: it is chatty)."""
    import llama_cpp as lib

    with _Backend.lock:
        if not _Backend.ready:
            @lib.llama_log_callback  # type: ignore[misc]
            def route(level: int, text: bytes, user_data: Any) -> None:
                message = text.decode("utf-8", "replace").rstrip()
                if message:
                    log.debug("llama.cpp: %s", message)

            _Backend.log_callback = route
            lib.llama_log_set(route, ctypes.c_void_p(0))
            lib.llama_backend_init()
            _Backend.ready = True
    return lib


class LlamaCppModel:
    """``path`` (a GGUF file) loaded by llama.cpp. :meth:`open` makes the context: ``seqs``
    sequences of ``seq_capacity`` cells, batches of up to ``batch`` tokens (a prompt chunk +
    every row), ``threads`` threads."""

    def __init__(self, path: Path, digest: str | None = None) -> None:
        lib = self.lib = _init_backend()
        self.path = path
        self._digest = digest  # the file's SHA-256, when the caller has it (fingerprint)
        self.lock = threading.RLock()
        self._ctx: Any = None
        self._batch: Any = None
        self._threads: _ThreadPool | None = None
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        self._model = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise LlamaCppError(f"llama.cpp cannot load {path}")
        vocab = lib.llama_model_get_vocab(self._model)
        self.vocab_size = int(lib.llama_vocab_n_tokens(vocab))
        self.eos_ids = frozenset(int(t) for t in (lib.llama_vocab_eos(vocab),
                                                  lib.llama_vocab_eot(vocab)) if t >= 0)
        self.context = int(lib.llama_model_n_ctx_train(self._model))
        self.layers = int(lib.llama_model_n_layer(self._model))
        heads, kv_heads = lib.llama_model_n_head(self._model), lib.llama_model_n_head_kv(self._model)
        head_dim = lib.llama_model_n_embd(self._model) // max(heads, 1)
        # f16 keys and values of every layer: what one cached token costs (nbytes, health)
        self.bytes_per_token = 2 * 2 * self.layers * kv_heads * head_dim
        desc = ctypes.create_string_buffer(256)
        lib.llama_model_desc(self._model, desc, len(desc))
        self.description = desc.value.decode("utf-8", "replace")  # e.g. "llama 135M Q4_1"
        self.seqs = self.seq_capacity = self.batch_tokens = self.threads = 0

    def fingerprint(self) -> str:
        """What a cache file must have been written by (:mod:`..local.disk`): llama.cpp's
        version (its state format), the GGUF file's content and the KV cells' type."""
        import hashlib

        import llama_cpp

        if self._digest is None:
            digest = hashlib.sha256()
            with self.path.open("rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
            self._digest = digest.hexdigest()
        return hashlib.sha256(f"llama.cpp {llama_cpp.__version__}\0{self._digest}\0"
                              f"f16 cells\0{self.description}".encode()).hexdigest()

    def open(self, *, seqs: int, seq_capacity: int, batch: int, threads: int) -> None:
        lib = self.lib
        self.seqs, self.seq_capacity, self.batch_tokens = seqs, seq_capacity, batch
        self.threads = threads
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = seqs * seq_capacity
        cparams.n_batch = cparams.n_ubatch = batch
        cparams.n_seq_max = seqs
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.kv_unified = False
        cparams.no_perf = True
        self._ctx = lib.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            raise LlamaCppError(f"llama.cpp cannot make a context of {seqs} x {seq_capacity} "
                                f"cells for {self.path.name}")
        self.memory = lib.llama_get_memory(self._ctx)
        if not lib.llama_memory_can_shift(self.memory):
            raise LlamaCppError(f"{self.path.name}: llama.cpp cannot shift this model's "
                                "positions, which the sink cache's eviction needs")
        self._threads = _ThreadPool(threads)
        self._threads.attach(self._ctx)
        self._batch = lib.llama_batch_init(batch, 0, 1)
        self.pool = SeqPool(self)

    # -- forward -----------------------------------------------------------------------------------
    def decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> np.ndarray:
        """One ``llama_decode`` of ``(token, position, sequence, wants_logits)`` entries; the
        float32 logits of the entries that want them, in order, as ``(n, vocab)``."""
        lib, batch = self.lib, self._batch
        n = len(entries)
        if not 0 < n <= self.batch_tokens:
            raise ValueError(f"a batch of {n} tokens (1..{self.batch_tokens})")
        outputs = []
        for i, (token, pos, seq, wants) in enumerate(entries):
            batch.token[i], batch.pos[i] = token, pos
            batch.n_seq_id[i], batch.seq_id[i][0] = 1, seq
            batch.logits[i] = wants
            if wants:
                outputs.append(i)
        batch.n_tokens = n
        status = lib.llama_decode(self._ctx, batch)
        if status != 0:
            raise LlamaCppError(f"llama_decode failed with status {status} on a batch of {n}")
        if not outputs:
            return np.empty((0, self.vocab_size), dtype=np.float32)
        # llama.cpp keeps the outputs' logits side by side, in batch order: one copy for all
        every = lib.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(every, shape=(len(outputs), self.vocab_size)).copy()

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokenization of ``text`` (special tokens parsed): the load-time check that
        it reads the ids the server's tokenizer writes."""
        lib = self.lib
        vocab = lib.llama_model_get_vocab(self._model)
        raw = text.encode()
        size = len(raw) + 16
        ids = (lib.llama_token * size)()
        n = lib.llama_tokenize(vocab, raw, len(raw), ids, size, False, True)
        if n < 0:
            raise LlamaCppError(f"tokenizing {len(raw)} bytes needs {-n} ids")
        return list(ids[:n])

    # -- sequences (the pool and the caches call these) --------------------------------------------
    def seq_remove(self, seq: int, start: int, end: int) -> None:
        """Drop cells ``start <= pos < end`` of ``seq`` (``end`` -1: to the end)."""
        if not self.lib.llama_memory_seq_rm(self.memory, seq, start, end):
            raise LlamaCppError(f"llama.cpp cannot remove positions {start}..{end} of {seq}")

    def seq_shift(self, seq: int, start: int, delta: int) -> None:
        """Move cells at ``pos >= start`` of ``seq`` by ``delta`` positions (RoPE re-applied to
        their keys before the next decode, llama.cpp's K-shift)."""
        self.lib.llama_memory_seq_add(self.memory, seq, start, -1, delta)

    def seq_positions(self, seq: int) -> int:
        """Cells ``seq`` holds (its highest position + 1; 0 when empty)."""
        return int(self.lib.llama_memory_seq_pos_max(self.memory, seq)) + 1

    def seq_save(self, seq: int) -> bytes:
        lib = self.lib
        size = lib.llama_state_seq_get_size(self._ctx, seq)
        buffer = (ctypes.c_uint8 * size)()
        written = lib.llama_state_seq_get_data(self._ctx, buffer, size, seq)
        if written != size:
            raise LlamaCppError(f"llama.cpp wrote {written} of {size} state bytes of {seq}")
        return bytes(buffer)

    def seq_load(self, seq: int, state: bytes) -> None:
        """Make ``seq`` (empty) hold ``state``; LlamaCppError when llama.cpp refuses it (it
        checks the layout: layers, cell counts, sizes)."""
        buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        read = self.lib.llama_state_seq_set_data(self._ctx, buffer, len(state), seq)
        if read != len(state):
            self.seq_remove(seq, -1, -1)
            raise LlamaCppError(f"llama.cpp refused a sequence state of {len(state)} bytes")

    def close(self) -> None:
        lib = self.lib
        if getattr(self, "_batch", None) is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            lib.llama_free(self._ctx)
            self._ctx = None
        if self._threads is not None:
            self._threads.close()  # after the context that used it
            self._threads = None
        if getattr(self, "_model", None):
            lib.llama_model_free(self._model)
            self._model = None


class _ThreadPool:
    """ggml's thread pool for the context's steps, kept for the context's life.

    Without one attached, ggml (built without OpenMP, as ``make install`` builds it) starts and
    joins its worker threads inside every ``llama_decode``; llama.cpp's own tools attach a pool,
    as this does. llama-cpp-python binds neither the pool nor ``llama_attach_threadpool``, so
    they are called from the libraries it loaded (ggml's parameters struct is filled by ggml's
    own initializer, in a buffer larger than it).
    """

    def __init__(self, threads: int) -> None:
        from llama_cpp import llama_cpp as bindings

        folder = Path(bindings._base_path)
        self._base = ctypes.CDLL(str(folder / "libggml-base.so"))
        self._cpu = ctypes.CDLL(str(folder / "libggml-cpu.so"))
        self._llama = bindings._lib
        self._base.ggml_threadpool_params_init.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self._base.ggml_threadpool_params_init.restype = None
        self._cpu.ggml_threadpool_new.argtypes = [ctypes.c_void_p]
        self._cpu.ggml_threadpool_new.restype = ctypes.c_void_p
        self._cpu.ggml_threadpool_free.argtypes = [ctypes.c_void_p]
        self._cpu.ggml_threadpool_free.restype = None
        self._llama.llama_attach_threadpool.argtypes = [ctypes.c_void_p] * 3
        self._llama.llama_attach_threadpool.restype = None
        params = ctypes.create_string_buffer(4096)  # struct ggml_threadpool_params: ~530 bytes
        self._base.ggml_threadpool_params_init(params, threads)
        self._pool = self._cpu.ggml_threadpool_new(params)
        if not self._pool:
            raise LlamaCppError(f"ggml cannot start a pool of {threads} threads")

    def attach(self, ctx: Any) -> None:
        self._llama.llama_attach_threadpool(ctx, self._pool, self._pool)

    def close(self) -> None:
        if self._pool:
            self._cpu.ggml_threadpool_free(self._pool)
            self._pool = None


class _Slot:
    """Where a cache lives now: a sequence, or None (parked). Outlives its cache for a moment:
    the cache's finalizer hands the sequence back through it."""

    __slots__ = ("seq",)

    def __init__(self) -> None:
        self.seq: int | None = None


class Placed(Protocol):
    """What the pool reads and writes of a cache (:class:`~.cache.SeqCache`)."""

    slot: _Slot
    parked: bytes | None
    length: int


class SeqPool:
    """Which cache each sequence of the model holds; see the module docstring."""

    def __init__(self, model: LlamaCppModel) -> None:
        self.model = model
        self._free = list(range(model.seqs - 1, -1, -1))
        self._resident: OrderedDict[int, weakref.ref[Placed]] = OrderedDict()  # LRU first
        self._dead: list[int] = []  # sequences whose cache died (any thread)
        self._lock = threading.Lock()
        self.restores = self.parks = 0

    def place(self, cache: Placed, busy: set[int]) -> int:
        """Make ``cache`` resident (restoring its parked state) and return its sequence; caches
        in the sequences ``busy`` (this step's) are never parked for it."""
        with self.model.lock:
            self._reap()
            seq = cache.slot.seq
            if seq is not None:
                self._resident.move_to_end(seq)
                return seq
            if not self._free:
                self._park_one(busy)
            seq = self._free.pop()
            if cache.parked:
                try:
                    self.model.seq_load(seq, cache.parked)
                except BaseException:
                    self._free.append(seq)
                    raise
                self.restores += 1
            cache.slot.seq, cache.parked = seq, None
            self._resident[seq] = weakref.ref(cache)
            return seq

    def park(self, cache: Placed) -> None:
        """Move ``cache`` out of its sequence into bytes (before it goes to the disk tier)."""
        with self.model.lock:
            seq = cache.slot.seq
            if seq is None:
                return
            cache.parked = self.model.seq_save(seq) if cache.length else None
            self._vacate(seq)
            cache.slot.seq = None
            self.parks += 1

    def release_later(self, slot: _Slot) -> None:
        """A cache died (any thread): its sequence is cleared on the model's thread, later."""
        if slot.seq is not None:
            with self._lock:
                self._dead.append(slot.seq)
            slot.seq = None

    def resident(self) -> int:
        return len(self._resident)

    def _park_one(self, busy: set[int]) -> None:
        for seq, ref in self._resident.items():
            if seq in busy:
                continue
            cache = ref()
            if cache is None:
                self._vacate(seq)
            else:
                self.park(cache)
            return
        raise LlamaCppError(f"all {self.model.seqs} sequences are in use by this step")

    def _vacate(self, seq: int) -> None:
        self.model.seq_remove(seq, -1, -1)
        self._resident.pop(seq, None)
        self._free.append(seq)

    def _reap(self) -> None:
        with self._lock:
            dead, self._dead = self._dead, []
        for seq in dead:
            ref = self._resident.get(seq)
            if ref is not None and ref() is None:  # not since vacated and given to another
                self._vacate(seq)
