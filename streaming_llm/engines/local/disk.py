"""The disk tier: a conversation's KV cache written to a file when it leaves memory, read back
for its next turn, so a conversation never goes cold (evicted from memory, or after a restart).

Files
    One folder per instance, ``<data>/kv/<instance>/`` (``STREAMING_LLM_INSTANCE_ID``, default
    ``<hostname>-<port>``), locked by the process that serves from it (``flock`` on ``.lock``): a
    second process pointed at the same folder serves without a disk tier and says so once. Caches
    belong to the instance that wrote them; with several instances, sticky routing keeps a
    conversation where its cache lives, and a turn elsewhere rebuilds (bounded).

    ``<conversation id>.kv``: one conversation; ``prefix-<hash>.kv``: an agent's pinned prefix
    (system prompt + Markdown context), stored once per agent version and shared by the files of
    its conversations, which then hold only the slots after it. Both are safetensors files (a
    JSON header and raw tensors: no code, unlike pickle), written to a temporary name and renamed,
    so a reader never sees half a file.

What a file holds
    The sink cache exactly as it left memory (:class:`~..sink_cache.SinkRow`: current keys,
    arrived keys, values, arrival slots, the counters) in the model's dtype, the ids of every token
    it consumed (evicted ones included) and the chat text they tokenize, so a restored
    conversation answers exactly as if it had stayed (greedy: the same tokens). The header proves
    what the file belongs to: format and version, the model's fingerprint (its config, dtype and
    a sample of its weights), the cache's geometry, the prefix's hash, a SHA-256 of the ids.

    With the llama.cpp runtime (:mod:`..llamacpp`) a file holds the sequence's state as
    llama.cpp serializes it (``state``: tokens, positions, keys and values), the counters, the
    ids and the chat text, with a SHA-256 of the state; the model's fingerprint names the
    llama.cpp version and the GGUF file's content. A file read back is restored into a sequence
    at once (on the tier's thread, under the model's lock), so llama.cpp's own checks refuse a
    bad state before any turn uses it. Such files hold their whole cache (no shared prefix file).

Trust
    A file is read as untrusted input: every field is checked, and one that fails any check
    (corrupt, truncated, written by another model or format version, a prefix that is missing or
    does not match, ids that do not match their hash) is logged once, removed, and the turn
    rebuilds. A full disk or a file over the budget costs the same: a warning, a rebuild, nothing
    lost. Files are named only from ids the chat layer validated (and checked again here).

Threads
    Every read and write runs on this tier's own thread, in submission order (a write, then a
    delete of the same conversation, never the reverse), never on the scheduler's: no token waits
    for the disk. The thread uses numpy only (no torch kernel, so no second OpenMP team next to the
    scheduler's: see the local engine's start-up).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..sink_cache import SinkCache
from .store import Conversation

__all__ = ["FORMAT", "VERSION", "DiskTier", "model_fingerprint"]

log = logging.getLogger("streaming_llm.engines.local.disk")

FORMAT = "streaming-llm-kv"
VERSION = "1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")  # conversation ids the chat layer makes
_SUFFIX = ".kv"
_TMP = ".tmp"
_SEQ_STATE = "llama.cpp-seq"  # the layout of a llama.cpp runtime's file (header "layout")
_PREFIXES_KEPT = 8  # prefixes read from disk, kept in memory for the next file that needs them
# numpy has no bfloat16: such tensors travel as int16 bit patterns.
_AS_NUMPY = {torch.bfloat16: torch.int16}


def model_fingerprint(model: Any, name: str) -> str:
    """What a file must have been written by: the model's name, config and dtype, and a sample of
    its weights (a fine-tune of the same architecture differs there)."""
    h = hashlib.sha256()
    h.update(f"{FORMAT}/{VERSION}\0{name}\0".encode())
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else {}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for i, param in enumerate(model.parameters()):
        if i % 8 == 0:  # a sample: every 8th tensor's first values
            flat = param.detach().reshape(-1)[:256]
            h.update(str(param.dtype).encode())
            h.update(flat.float().cpu().numpy().tobytes())
    return h.hexdigest()


def ids_digest(ids: Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


class BadFile(ValueError):
    """A cache file that fails a check; it is removed and the turn rebuilds."""


@dataclass
class TierStats:
    """What ``/health`` and ``/metrics`` report about the disk tier."""

    files: int = 0
    bytes: int = 0
    writes: int = 0
    write_seconds: float = 0.0
    loads: int = 0
    load_seconds: float = 0.0
    refused: int = 0  # files that failed a check
    failed_writes: int = 0  # full disk, over the budget, I/O errors


class DiskTier:
    """Conversation caches on disk, under ``folder``, at most ``budget`` bytes (LRU)."""

    def __init__(self, folder: Path, budget: int, fingerprint: str,
                 new_cache: Callable[[int, int], Any]) -> None:
        self.folder, self.budget, self.fingerprint = folder, budget, fingerprint
        # (sinks, window) -> an empty cache for this model: a SinkCache, or llama.cpp's SeqCache
        self._new_cache = new_cache
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-disk")
        self._lock = threading.Lock()  # guards _pending, _sizes, stats
        self._pending: dict[str, Conversation] = {}  # handed over, not yet written
        self._sizes: OrderedDict[str, int] = OrderedDict()  # file name -> bytes, LRU first
        self._prefixes: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()  # tier thread
        self._warned: set[str] = set()
        self._lockfile: Any = None
        self.enabled = False
        self.stats = TierStats()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Take the folder (or serve without a disk tier when another process has it)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            lockfile = open(self.folder / ".lock", "a+")
            try:
                fcntl.flock(lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lockfile.close()
                log.warning("KV cache folder %s is in use by another process: serving without "
                            "a disk tier (give each instance its own STREAMING_LLM_INSTANCE_ID)",
                            self.folder)
                return
        except OSError as exc:
            log.warning("KV cache folder %s cannot be used (%s): serving without a disk tier",
                        self.folder, exc)
            return
        self._lockfile = lockfile
        for path in self.folder.iterdir():
            if path.name.endswith(_TMP) and path.name.startswith("."):
                path.unlink(missing_ok=True)  # our own half-written files of a killed process
        for path in self.folder.iterdir():
            if path.name.endswith(_SUFFIX) and (path.is_symlink() or not path.is_file()):
                log.warning("KV cache folder %s: %s is not a regular file; removed", self.folder,
                            path.name)
                with contextlib.suppress(OSError):
                    path.unlink()  # a link goes, never what it points to
        files = sorted((p for p in self.folder.iterdir() if p.name.endswith(_SUFFIX)
                        and p.is_file() and not p.is_symlink()), key=lambda p: p.stat().st_mtime)
        for path in files:
            self._sizes[path.name] = path.stat().st_size
        self.enabled = True
        self._sync_stats()
        self._enforce_budget()

    def close(self, conversations: list[tuple[str, Conversation, Conversation | None]]) -> None:
        """Write ``conversations`` (id, state, its agent's kept prefix) and everything pending,
        then stop (a graceful shutdown)."""
        if self.enabled:
            for cid, state, prefix in conversations:
                self.save_later(cid, state, prefix)
        self._thread.shutdown(wait=True)
        if self._lockfile is not None:
            self._lockfile.close()
        self.enabled = False

    # -- any thread: hand work to the tier's thread ----------------------------------------------
    def save_later(self, cid: str, state: Conversation, prefix: Conversation | None) -> None:
        """Write ``state`` (which has left memory) off the caller's thread."""
        if not self.enabled or not _NAME.match(cid) \
                or not (isinstance(state.cache, SinkCache) or _serialized(state.cache)):
            return
        with self._lock:
            self._pending[cid] = state
        self._thread.submit(self._save, cid, state, prefix)

    def reclaim(self, cid: str) -> Conversation | None:
        """A conversation handed over but not written yet: take it back (no disk read)."""
        with self._lock:
            return self._pending.pop(cid, None)

    def load(self, cid: str) -> Future[Conversation | None]:
        """Read the conversation's file on the tier's thread (after any write queued before)."""
        return self._thread.submit(self._load, cid)

    def flush(self) -> None:
        """Wait until everything handed to the tier so far is done (tests, benchmarks)."""
        self._thread.submit(lambda: None).result()

    def remove(self, cid: str) -> None:
        """The conversation was deleted: its file goes (after any write queued before)."""
        with self._lock:
            self._pending.pop(cid, None)
        if self.enabled and _NAME.match(cid):
            self._thread.submit(self._unlink, cid + _SUFFIX)

    # -- the tier's thread -----------------------------------------------------------------------
    def _save(self, cid: str, state: Conversation, prefix: Conversation | None) -> None:
        with self._lock:
            if self._pending.get(cid) is not state:
                return  # reclaimed, forgotten or superseded meanwhile
        started = time.perf_counter()
        try:
            self._write(cid, state, prefix)
        except OSError as exc:
            self._fail_write(cid, exc)
        except Exception:  # a bug: the conversation rebuilds, the service goes on
            log.exception("KV cache: writing %s failed", cid)
            self._fail_write(cid, None)
        else:
            with self._lock:
                self.stats.writes += 1
                self.stats.write_seconds += time.perf_counter() - started
        finally:
            with self._lock:
                if self._pending.get(cid) is state:
                    del self._pending[cid]

    def _write(self, cid: str, state: Conversation, prefix: Conversation | None) -> None:
        if _serialized(state.cache):
            self._write_state(cid, state)
            return
        cache: SinkCache = state.cache
        row = cache.snapshot()
        stored = row.stored
        tensors: dict[str, np.ndarray] = {
            "ids": np.asarray(state.ids, dtype=np.int64),
            "origin": np.ascontiguousarray(row.origin.numpy()),
        }
        start, prefix_hash = 0, ""
        if prefix is not None and 0 < len(prefix.ids) <= stored \
                and state.ids[:len(prefix.ids)] == prefix.ids \
                and _same_slots(prefix.cache.snapshot(), row, len(prefix.ids)):
            prefix_hash = self._ensure_prefix(prefix)
            if prefix_hash:
                start = len(prefix.ids)
        dtype = cache.layers[0].dtype if stored else torch.float32
        for i, layer in enumerate(row.layers):
            for name, t in zip("kav", layer, strict=True):
                tensors[f"{name}.{i}"] = np.ascontiguousarray(_numpy(t[:, :, start:stored]))
        meta = self._header(cache, state, dtype, kind="conversation", start=start,
                            prefix=prefix_hash)
        meta["text"] = state.text if state.text is not None else ""
        meta["has_text"] = "1" if state.text is not None else "0"
        self._commit(cid + _SUFFIX, tensors, meta)

    def _write_state(self, cid: str, state: Conversation) -> None:
        """A llama.cpp cache: its sequence state as llama.cpp serializes it, whole."""
        cache = state.cache
        blob = cache.state() or b""
        tensors: dict[str, np.ndarray] = {"ids": np.asarray(state.ids, dtype=np.int64),
                                          "state": np.frombuffer(blob, dtype=np.uint8)}
        meta = {"format": FORMAT, "version": VERSION, "kind": "conversation",
                "layout": _SEQ_STATE, "model": self.fingerprint,
                "sink_tokens": str(cache.sink_tokens), "window_tokens": str(cache.window_tokens),
                "stored": str(cache.length), "seen": str(cache.seen_tokens),
                "evicted": str(cache.evicted_tokens), "ids_sha256": ids_digest(state.ids),
                "state_sha256": hashlib.sha256(blob).hexdigest(),
                "text": state.text if state.text is not None else "",
                "has_text": "1" if state.text is not None else "0"}
        self._commit(cid + _SUFFIX, tensors, meta)

    def _read_state(self, meta: dict[str, str], arrays: dict[str, np.ndarray]) -> Conversation:
        """A llama.cpp cache file (checked by :meth:`_open`), restored into a sequence now."""
        cache = self._new_cache(int(meta["sink_tokens"]), int(meta["window_tokens"]))
        cache.length, cache.seen_tokens = int(meta["stored"]), int(meta["seen"])
        cache.evicted_tokens = int(meta["evicted"])
        cache.parked = arrays["state"].tobytes() or None
        try:
            seq = cache.seq(set())  # llama.cpp checks the state's layout as it reads it
        except Exception as exc:
            raise BadFile(f"llama.cpp refused its state ({exc})") from exc
        if cache.model.seq_positions(seq) != cache.length:
            raise BadFile(f"its state holds {cache.model.seq_positions(seq)} positions, "
                          f"the header says {cache.length}")
        text = meta.get("text", "") if meta.get("has_text") == "1" else None
        return Conversation(cache=cache, ids=[int(t) for t in arrays["ids"]], text=text,
                            source="disk")

    def _ensure_prefix(self, prefix: Conversation) -> str:
        """The prefix's file name hash; written now unless a file of it is there already."""
        digest = ids_digest(prefix.ids)[:32]
        name = f"prefix-{digest}{_SUFFIX}"
        if name in self._sizes:
            self._sizes.move_to_end(name)
            return digest
        row = prefix.cache.snapshot()
        tensors = {"ids": np.asarray(prefix.ids, dtype=np.int64),
                   "origin": np.ascontiguousarray(row.origin.numpy())}
        for i, layer in enumerate(row.layers):
            for key, t in zip("kav", layer, strict=True):
                tensors[f"{key}.{i}"] = np.ascontiguousarray(_numpy(t))
        dtype = prefix.cache.layers[0].dtype
        self._commit(name, tensors, self._header(prefix.cache, prefix, dtype, kind="prefix",
                                                 start=0, prefix=""))
        return digest

    def _header(self, cache: SinkCache, state: Conversation, dtype: torch.dtype, *, kind: str,
                start: int, prefix: str) -> dict[str, str]:
        return {"format": FORMAT, "version": VERSION, "kind": kind, "model": self.fingerprint,
                "dtype": str(dtype).removeprefix("torch."), "layers": str(len(cache.layers)),
                "sink_tokens": str(cache.sink_tokens), "window_tokens": str(cache.window_tokens),
                "stored": str(cache.get_seq_length()), "seen": str(cache.seen_tokens),
                "evicted": str(cache.evicted_tokens), "start": str(start), "prefix": prefix,
                "ids_sha256": ids_digest(state.ids)}

    def _commit(self, name: str, tensors: dict[str, np.ndarray], meta: dict[str, str]) -> None:
        from safetensors.numpy import save_file

        size = sum(a.nbytes for a in tensors.values())
        if size > self.budget:
            raise OSError(errno.EFBIG, f"{size} bytes is over the disk tier's budget of "
                                       f"{self.budget} (STREAMING_LLM_KV_DISK_BYTES)")
        tmp = self.folder / f".{name}.{uuid.uuid4().hex}{_TMP}"
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, self.folder / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        with self._lock:
            self._sizes[name] = (self.folder / name).stat().st_size
            self._sizes.move_to_end(name)
        self._sync_stats()
        self._enforce_budget(keep=name)

    def _load(self, cid: str) -> Conversation | None:
        name = cid + _SUFFIX
        if not self.enabled or not _NAME.match(cid) or name not in self._sizes:
            return None
        started = time.perf_counter()
        try:
            state = self._read(name)
        except Exception as exc:  # noqa: BLE001 - any failure: the file is not trusted
            self._refuse(name, exc)
            return None
        with self._lock:
            self.stats.loads += 1
            self.stats.load_seconds += time.perf_counter() - started
            self._sizes.move_to_end(name)
        with contextlib.suppress(OSError):
            os.utime(self.folder / name)  # least recently used goes first, across restarts
        return state

    def _read(self, name: str) -> Conversation:
        meta, arrays = self._open(name, kind="conversation")
        if meta.get("layout") == _SEQ_STATE:
            return self._read_state(meta, arrays)
        ids = arrays["ids"]
        stored, start = int(meta["stored"]), int(meta["start"])
        layers = int(meta["layers"])
        prefix_arrays: dict[str, np.ndarray] | None = None
        if meta["prefix"]:
            prefix_arrays = self._prefix(meta["prefix"], meta)
            p_ids = prefix_arrays["ids"]
            if start != len(p_ids) or not np.array_equal(ids[:start], p_ids):
                raise BadFile("its agent prefix does not match the prefix file")
        elif start != 0:
            raise BadFile("slots before start without a prefix")
        cache = self._new_cache(int(meta["sink_tokens"]), int(meta["window_tokens"]))
        if len(cache.layers) != layers:
            raise BadFile(f"{layers} layers, the model has {len(cache.layers)}")
        capacity, dtype = cache.capacity, _dtype(meta["dtype"])
        buffers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for i in range(layers):
            full = []
            for key in "kav":
                part = arrays[f"{key}.{i}"]
                if part.ndim != 4 or part.shape[0] != 1 or part.shape[2] != stored - start \
                        or part.dtype != _numpy_dtype(dtype):
                    raise BadFile(f"tensor {key}.{i} has shape {part.shape}, {part.dtype}")
                buf = np.empty((1, part.shape[1], capacity, part.shape[3]), dtype=part.dtype)
                if prefix_arrays is not None:
                    head = prefix_arrays[f"{key}.{i}"]
                    if head.shape[:2] != part.shape[:2] or head.shape[3] != part.shape[3] \
                            or head.dtype != part.dtype:
                        raise BadFile(f"prefix tensor {key}.{i} does not fit")
                    buf[:, :, :start] = head[:, :, :start]
                buf[:, :, start:stored] = part
                full.append(_torch(buf, dtype))
            buffers.append((full[0], full[1], full[2]))
        origin = np.zeros(capacity, dtype=np.int64)
        origin[:stored] = arrays["origin"]
        seen, evicted = int(meta["seen"]), int(meta["evicted"])
        device = cache.inv_freq.device
        if device.type != "cpu":
            buffers = [tuple(t.to(device) for t in layer) for layer in buffers]  # type: ignore[misc]
        cache.adopt(buffers, torch.from_numpy(origin), stored=stored, seen_tokens=seen,
                    evicted_tokens=evicted)
        text = meta.get("text", "") if meta.get("has_text") == "1" else None
        return Conversation(cache=cache, ids=[int(t) for t in ids], text=text, source="disk")

    def _prefix(self, digest: str, meta: dict[str, str]) -> dict[str, np.ndarray]:
        if not re.fullmatch(r"[0-9a-f]{32}", digest):
            raise BadFile("a bad prefix reference")
        if (kept := self._prefixes.get(digest)) is not None:
            self._prefixes.move_to_end(digest)
            return kept
        name = f"prefix-{digest}{_SUFFIX}"
        if name not in self._sizes:
            raise BadFile("its agent prefix file is missing")
        p_meta, arrays = self._open(name, kind="prefix")
        if ids_digest(arrays["ids"].tolist())[:32] != digest:
            raise BadFile("the prefix file holds other ids")
        for key in ("dtype", "layers", "sink_tokens", "window_tokens"):
            if p_meta[key] != meta[key]:
                raise BadFile(f"the prefix file's {key} differs")
        self._prefixes[digest] = arrays
        while len(self._prefixes) > _PREFIXES_KEPT:
            self._prefixes.popitem(last=False)
        return arrays

    def _open(self, name: str, *, kind: str) -> tuple[dict[str, str], dict[str, np.ndarray]]:
        """Read and check one file: header, geometry, ids; every tensor read whole."""
        from safetensors import safe_open

        path = self.folder / name
        if path.is_symlink() or not path.is_file():
            raise BadFile("not a regular file")
        with safe_open(path, framework="numpy") as f:  # type: ignore[no-untyped-call]
            meta = f.metadata() or {}
            arrays = {key: f.get_tensor(key) for key in f.keys()}
        if meta.get("format") != FORMAT:
            raise BadFile(f"format {meta.get('format')!r}")
        if meta.get("version") != VERSION:
            raise BadFile(f"format version {meta.get('version')!r}, this server reads {VERSION}")
        if meta.get("kind") != kind:
            raise BadFile(f"a {meta.get('kind')!r} file where a {kind} file was expected")
        if meta.get("model") != self.fingerprint:
            raise BadFile("written for another model")
        if meta.get("layout") == _SEQ_STATE:
            _check_state(meta, arrays)
            return meta, arrays
        try:
            stored, seen, evicted = int(meta["stored"]), int(meta["seen"]), int(meta["evicted"])
            layers, sinks = int(meta["layers"]), int(meta["sink_tokens"])
            window, start = int(meta["window_tokens"]), int(meta["start"])
            _dtype(meta["dtype"])
        except (KeyError, ValueError) as exc:
            raise BadFile(f"a bad header ({exc})") from exc
        ids = arrays.get("ids")
        origin = arrays.get("origin")
        if ids is None or origin is None or ids.dtype != np.int64 or ids.ndim != 1 \
                or origin.dtype != np.int64 or origin.shape != (stored,):
            raise BadFile("ids or origin missing or malformed")
        if not (0 <= start <= stored <= sinks + window and seen == stored + evicted == len(ids)
                and evicted >= 0 and layers > 0):
            raise BadFile("counts that do not add up")
        if ids_digest(ids.tolist()) != meta.get("ids_sha256"):
            raise BadFile("ids that do not match their hash")
        if stored and (origin.min() < 0 or origin.max() >= sinks + window):
            raise BadFile("arrival slots out of range")
        expected = {"ids", "origin", *(f"{k}.{i}" for i in range(layers) for k in "kav")}
        if set(arrays) != expected:
            raise BadFile("unexpected or missing tensors")
        return meta, arrays

    def _unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.folder / name).unlink()
        with self._lock:
            self._sizes.pop(name, None)
        self._sync_stats()

    def _refuse(self, name: str, exc: Exception) -> None:
        with self._lock:
            self.stats.refused += 1
        log.warning("KV cache file %s is not used (%s: %s); the conversation rebuilds",
                    name, type(exc).__name__, exc)
        self._unlink(name)

    def _fail_write(self, cid: str, exc: OSError | None) -> None:
        with self._lock:
            self.stats.failed_writes += 1
        why = "disk full" if exc is not None and exc.errno == errno.ENOSPC else (
            str(exc) if exc is not None else "an error")
        key = why.split(":")[0]
        if key not in self._warned:  # one warning per cause, not one per conversation
            self._warned.add(key)
            log.warning("KV cache: a conversation's cache was not written (%s); it will rebuild "
                        "from its history when it speaks again", why)
        self._unlink(cid + _SUFFIX)  # never leave an older file that a later turn would trust

    def _enforce_budget(self, keep: str | None = None) -> None:
        """Remove the least recently used files until the folder is within the budget."""
        while True:
            with self._lock:
                total = sum(self._sizes.values())
                victims = [n for n in self._sizes if n != keep]
            if total <= self.budget or not victims:
                return
            self._unlink(victims[0])

    def _sync_stats(self) -> None:
        with self._lock:
            self.stats.files = len(self._sizes)
            self.stats.bytes = sum(self._sizes.values())

    def snapshot(self) -> TierStats:
        with self._lock:
            return TierStats(**vars(self.stats))


def _serialized(cache: Any) -> bool:
    """A cache that serializes itself (llama.cpp's SeqCache) rather than a SinkCache's tensors."""
    return hasattr(cache, "state") and hasattr(cache, "parked")


def _check_state(meta: dict[str, str], arrays: dict[str, np.ndarray]) -> None:
    """The checks of a llama.cpp cache file's header, ids and state bytes."""
    try:
        stored, seen, evicted = int(meta["stored"]), int(meta["seen"]), int(meta["evicted"])
        sinks, window = int(meta["sink_tokens"]), int(meta["window_tokens"])
    except (KeyError, ValueError) as exc:
        raise BadFile(f"a bad header ({exc})") from exc
    if set(arrays) != {"ids", "state"}:
        raise BadFile("unexpected or missing tensors")
    ids, state = arrays["ids"], arrays["state"]
    if ids.dtype != np.int64 or ids.ndim != 1 or state.dtype != np.uint8 or state.ndim != 1:
        raise BadFile("ids or state malformed")
    if not (0 <= stored <= sinks + window and sinks >= 0 and window > 0 and evicted >= 0
            and seen == stored + evicted == len(ids)) or (stored > 0) != (state.size > 0):
        raise BadFile("counts that do not add up")
    if ids_digest(ids.tolist()) != meta.get("ids_sha256"):
        raise BadFile("ids that do not match their hash")
    if hashlib.sha256(state.tobytes()).hexdigest() != meta.get("state_sha256"):
        raise BadFile("a state that does not match its hash")


def _same_slots(prefix: Any, row: Any, n: int) -> bool:
    """Whether ``row``'s first ``n`` slots are bit for bit the prefix's (numpy: no torch kernel)."""
    if not np.array_equal(prefix.origin[:n].numpy(), row.origin[:n].numpy()):
        return False
    for mine, theirs in zip(prefix.layers, row.layers, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            if not np.array_equal(_numpy(a[:, :, :n]), _numpy(b[:, :, :n])):
                return False
    return True


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype in _AS_NUMPY:
        t = t.view(_AS_NUMPY[t.dtype])
    return t.numpy()


def _torch(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(a)
    return t.view(dtype) if dtype in _AS_NUMPY else t


def _numpy_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    return np.dtype({torch.float32: np.float32, torch.float16: np.float16,
                     torch.bfloat16: np.int16}[dtype])


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or dtype not in (torch.float32, torch.float16,
                                                           torch.bfloat16):
        raise BadFile(f"dtype {name!r}")
    return dtype
