"""One conversation's KV cache in llama.cpp, with the sink cache's semantics.

:class:`SeqCache` is to the llama.cpp backend what :class:`~..sink_cache.SinkCache` is to the
torch one, with the same attributes and methods the scheduler, the runner and
:class:`~..local.caches.Caches` use (``sink_tokens``, ``window_tokens``, ``evicted_tokens``,
``make_room``, ``skip``, ``crop``, ``clone``, ``get_seq_length``, ``nbytes``):

- positions are cache-relative and contiguous: the sinks at ``0 .. S-1``, the window after them;
- eviction drops the oldest window cells and shifts the rest down, which llama.cpp does as its
  context shift does (``seq_rm`` then ``seq_add``; keys re-rotated before the next decode), so
  the model sees what a SinkCache shows it;
- only window tokens are evicted, and once something was, a rollback stops at the sinks.

Where the cells are is the pool's business (:class:`~.model.SeqPool`): in a sequence while
resident, else ``parked`` bytes. A copy (an agent prefix kept for new conversations) is parked
bytes from the start, restored into a sequence when it is first fed.
"""

from __future__ import annotations

import weakref

from .model import LlamaCppModel, _Slot

__all__ = ["SeqCache"]


class SeqCache:
    """Sinks + recent window over a llama.cpp sequence (see the module docstring)."""

    def __init__(self, model: LlamaCppModel, sink_tokens: int, window_tokens: int) -> None:
        if sink_tokens < 0 or window_tokens < 1:
            raise ValueError(f"sink_tokens >= 0 and window_tokens >= 1, got {sink_tokens}, "
                             f"{window_tokens}")
        if sink_tokens + window_tokens > model.seq_capacity:
            raise ValueError(f"{sink_tokens} sinks + {window_tokens} window do not fit a "
                             f"sequence of {model.seq_capacity} cells")
        self.model = model
        self.sink_tokens, self.window_tokens = sink_tokens, window_tokens
        self.capacity = sink_tokens + window_tokens
        self.length = 0  # cells stored: positions 0 .. length-1
        self.seen_tokens = self.evicted_tokens = 0
        self.slot = _Slot()
        self.parked: bytes | None = None  # the state while no sequence holds it
        weakref.finalize(self, model.pool.release_later, self.slot)

    # -- what the runner does --------------------------------------------------------------------
    def seq(self, busy: set[int]) -> int:
        """This cache's sequence, made resident; see :meth:`~.model.SeqPool.place`."""
        return self.model.pool.place(self, busy)

    def fed(self, n: int) -> None:
        """``n`` tokens went in at positions ``length ..`` (the runner's decode)."""
        self.length += n
        self.seen_tokens += n

    # -- eviction, as SinkCache ------------------------------------------------------------------
    def make_room(self, incoming: int) -> int:
        """Evict just enough window tokens that ``incoming`` more fit; return how many went."""
        if incoming < 0:
            raise ValueError(f"incoming must be >= 0, got {incoming}")
        if incoming > self.window_tokens:
            raise ValueError(f"cannot make room for {incoming} tokens in a window of "
                             f"{self.window_tokens}; feed them in chunks of at most that many")
        excess = self.length + incoming - self.capacity
        if self.length == 0 or excess <= 0:
            return 0
        with self.model.lock:
            seq, s = self.seq(set()), self.sink_tokens
            self.model.seq_remove(seq, s, s + excess)
            self.model.seq_shift(seq, s + excess, -excess)
        self.length -= excess
        self.evicted_tokens += excess
        return excess

    def skip(self, n: int) -> None:
        """Count ``n`` tokens as seen and evicted without feeding them (a bounded rebuild)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n and self.length < self.sink_tokens:
            raise ValueError(f"skip needs the {self.sink_tokens} sinks stored first, "
                             f"{self.length} are")
        self.seen_tokens += n
        self.evicted_tokens += n

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` stored tokens (negative: drop that many of the newest);
        ValueError when that would reach into the sinks after an eviction."""
        keep = self.length + max_length if max_length < 0 else max_length
        if keep < self.length:
            self.rollback(self.length - keep)

    def can_rollback(self, n: int) -> bool:
        floor = self.sink_tokens if self.evicted_tokens else 0
        return 0 <= n <= self.length - min(floor, self.length)

    def rollback(self, n: int) -> None:
        """Forget the newest ``n`` tokens, as if they had never been fed."""
        if not self.can_rollback(n):
            raise ValueError(f"cannot roll back {n} tokens: {self.length} stored, "
                             f"{self.evicted_tokens} evicted, {self.sink_tokens} sinks")
        if n == 0:
            return
        with self.model.lock:
            self.model.seq_remove(self.seq(set()), self.length - n, -1)
        self.length -= n
        self.seen_tokens -= n

    def clone(self) -> SeqCache:
        """An independent copy, parked (restored into a sequence when it is first used)."""
        copy = SeqCache(self.model, self.sink_tokens, self.window_tokens)
        copy.length, copy.seen_tokens = self.length, self.seen_tokens
        copy.evicted_tokens = self.evicted_tokens
        copy.parked = self.state()
        return copy

    def state(self) -> bytes | None:
        """The cells as llama.cpp serializes a sequence (None when empty); any thread."""
        with self.model.lock:
            if self.slot.seq is None or self.length == 0:
                return self.parked if self.length else None
            return self.model.seq_save(self.slot.seq)

    def park(self) -> None:
        """Out of its sequence into bytes, freeing the sequence (it left memory for the disk)."""
        self.model.pool.park(self)

    # -- bookkeeping -------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.capacity

    def nbytes(self) -> int:
        if self.slot.seq is None:
            return len(self.parked) if self.parked else 0
        return self.length * self.model.bytes_per_token

    def __repr__(self) -> str:
        where = f"seq {self.slot.seq}" if self.slot.seq is not None else "parked"
        return (f"SeqCache(sinks={self.sink_tokens}, window={self.window_tokens}, "
                f"stored={self.length}, evicted={self.evicted_tokens}, {where})")
