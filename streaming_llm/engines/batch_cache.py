"""Many sink caches stepped by one forward pass: the rows of a batched decode step.

B.1 Design
----------
Every conversation owns a :class:`~streaming_llm.engines.sink_cache.SinkCache` (sinks or pinned
prefix + recent window, preallocated, A.1-A.4 of that module), and keeps it between turns. A
conversation that is *decoding* also holds a row of a :class:`BatchSinkCache`: preallocated
buffers with one row per decoding conversation, which the scheduler passes as
``past_key_values`` to one forward call that advances every row by one token::

    keys, arrived, values   # (rows, kv_heads, slots, head_dim) per layer, preallocated
    origin                  # (rows, slots) long, host: the arrival slot of every stored key (A.4)
    lengths                 # (rows,) long: tokens stored per row (host list + device copy)

``slots`` is the largest capacity (sinks + window) of any row seen so far, rounded up to a
multiple of :data:`SLOT_BLOCK` (:func:`slots_for`), and the buffers hold one slot more than that,
never attended. Both are for a compiled step (:mod:`.step`, C.2): a graph is built per buffer
shape, so agents whose pinned prefixes differ by a few tokens share one, and a step's span is
never the whole buffer (a contiguous slice, which inductor would specialize a second graph on).
A row of a smaller cache uses its first ``capacity`` slots only.

*Joining* copies a conversation's cache into a free row (after its prompt was prefilled through
its own cache, batch 1, exactly as a lone turn); *leaving* copies the row back, so the
conversation's cache is its own again for the next turn. Each copy moves one conversation's
stored keys and values once per turn, not per token. Memory: a decoding conversation is held
twice (its own cache and its row), so the batch costs ``rows x`` one cache's bytes on top of the
conversations' caches, allocated on the first join; per conversation the bytes stay flat however
long the conversation grows, as the sink cache's do.

B.2 Rows of different lengths
-----------------------------
A step feeds one token per row, ``input_ids (batch, 1)``, at the row's own cache-relative
position ``position_ids = lengths (batch, 1)``. :meth:`BatchSinkCache.update` writes each row's new
key and value at slot ``lengths[b]`` (``index_put_``, in place) and returns the buffers' first
``span`` slots, ``(batch, kv_heads, span, head_dim)``. The attention mask
``(batch, 1, 1, span)`` lets row ``b`` see slots ``0 .. lengths[b]`` only (its stored tokens and
the new one); the slots beyond are masked to the dtype's minimum, so they get exactly zero
weight, and per-row results do not depend on the other rows.

``span`` is the longest row's length + 1 rounded up to a power of two (at least
:data:`MIN_SPAN`, at most ``slots``): attention reads no more than twice the slots in use, and
a step takes one of a few fixed shapes (``log2(slots)`` spans per batch size) however long
each row is.

The batch dimension is a *bucket*: the smallest power of two that holds the decoding rows, at
most ``rows``. Decoding rows are kept in rows ``0 .. n-1`` (a leaving row's place is taken by the
last row), and the free rows of the bucket are padding: length 0, they write their dummy token
at slot 0 and attend to it alone (no all-masked row, so no NaN), and are never advanced. A fixed
set of batch shapes is what a compiled step or a CUDA graph needs.

B.3 Eviction per row
--------------------
A row evicts on its own when it is full, between steps: :meth:`BatchSinkCache.make_room` calls
the one eviction of the sink cache (:func:`~streaming_llm.engines.sink_cache.evict_window`, A.3
and A.4: the three cases, the window re-rotated from the arrived keys in float32 and rounded once)
on the row's views, so a row evicts exactly as its conversation's cache would: a
:class:`~streaming_llm.engines.sink_cache.SinkCache` is a batch of one. The shift is in place and
changes no shape; the other rows are untouched. Joining and leaving copy a
:class:`~streaming_llm.engines.sink_cache.SinkRow` (:meth:`SinkCache.snapshot`,
:meth:`SinkCache.restore`), never the cache's private fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache

from .sink_cache import SinkCache, SinkRow, evict_window

__all__ = ["MIN_SPAN", "SLOT_BLOCK", "BatchSinkCache", "bucket_size", "slots_for", "span_size"]

MIN_SPAN = 64  # the shortest attention span of a step, in slots
SLOT_BLOCK = 512  # the batch's slots are a multiple of this (B.1)


def slots_for(capacity: int) -> int:
    """The batch slots that hold a cache of ``capacity``: rounded up to :data:`SLOT_BLOCK`."""
    return -(-capacity // SLOT_BLOCK) * SLOT_BLOCK


def span_size(longest: int, slots: int) -> int:
    """Slots a step attends to: ``longest`` rounded up to a power of two, MIN_SPAN..slots."""
    return min(slots, max(MIN_SPAN, 1 << (longest - 1).bit_length()))


def bucket_size(n: int, rows: int) -> int:
    """The batch shape for ``n`` decoding rows: the smallest power of two >= n, at most ``rows``."""
    if not 1 <= n <= rows:
        raise ValueError(f"need 1..{rows} rows, got {n}")
    return min(rows, 1 << (n - 1).bit_length())


@dataclass
class _Row:
    """Host-side bookkeeping of one decoding row (the tensors live in the batch buffers)."""

    sink_tokens: int
    window_tokens: int
    capacity: int
    length: int
    seen_tokens: int
    evicted_tokens: int


class BatchSinkCache(Cache):
    """Up to ``rows`` sink caches, stepped together. See the module docstring for the layout.

    Use: :meth:`join` a prefilled :class:`SinkCache`, :meth:`make_room` for full rows,
    :meth:`step_inputs` for the forward call's inputs, the forward call with this cache as
    ``past_key_values``, :meth:`advance`; :meth:`leave` copies a row back into its cache.
    """

    def __init__(self, rows: int) -> None:
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        super().__init__(layers=[])
        self.rows = rows
        self.slots = 0
        self._rows: list[_Row] = []  # decoding rows, in batch order (row b is self._rows[b])
        self._k: list[torch.Tensor] = []  # per layer (rows, kv_heads, slots, head_dim)
        self._arrived: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        self._origin = torch.zeros((rows, 0), dtype=torch.long)  # (rows, slots), host
        self._inv_freq: torch.Tensor | None = None  # (r/2,) float32, the model's RoPE frequencies
        self._lengths = torch.zeros(0, dtype=torch.long)  # (rows,) on the device
        self._batch = 0  # rows in the current step (a bucket)
        self._span = 0  # slots the current step attends to
        # (rows (batch, 1), heads (1, kv_heads), slots (batch, 1)): where each row writes
        self._write_at: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # -- rows in and out ---------------------------------------------------------------------------
    @property
    def active(self) -> int:
        """Rows decoding now (rows ``0 .. active - 1``)."""
        return len(self._rows)

    def join(self, cache: SinkCache) -> int:
        """Copy a prefilled ``cache`` into the next free row; return the row index."""
        if self.active == self.rows:
            raise RuntimeError(f"all {self.rows} rows are in use")
        row = cache.snapshot()
        stored = row.stored
        if stored == 0:
            raise ValueError("join a cache that holds at least one token (prefill first)")
        if not self._k or cache.capacity > self.slots or len(row.layers) != len(self._k):
            self._allocate([(k.shape, v.shape) for k, _, v in row.layers], row.layers[0][0],
                           max(slots_for(cache.capacity), self.slots))
        if self._inv_freq is None:
            self._inv_freq = cache.inv_freq
        b = self.active
        for i, (k, arrived, v) in enumerate(row.layers):
            self._k[i][b, :, :stored] = k[0]
            self._arrived[i][b, :, :stored] = arrived[0]
            self._v[i][b, :, :stored] = v[0]
        self._origin[b, :stored] = row.origin
        self._rows.append(_Row(cache.sink_tokens, cache.window_tokens, cache.capacity, stored,
                               row.seen_tokens, row.evicted_tokens))
        return b

    def leave(self, b: int, cache: SinkCache) -> int | None:
        """Copy row ``b`` back into ``cache`` (the one it joined from) and free the row.

        The last row moves into the freed place, so the decoding rows stay ``0 .. active - 1``;
        returns the index it moved from (None when ``b`` was the last row).
        """
        cache.restore(self.row(b))
        last = self.active - 1
        if b == last:
            self._rows.pop()
            return None
        self._rows[b] = self._rows.pop()
        n = self._rows[b].length
        for buffers in (self._k, self._arrived, self._v):
            for t in buffers:
                t[b, :, :n] = t[last, :, :n]
        self._origin[b, :n] = self._origin[last, :n]
        return last

    def row(self, b: int) -> SinkRow:
        """Views of what row ``b`` holds (no copy), in a :class:`SinkCache`'s terms."""
        row, n = self._rows[b], self._rows[b].length
        layers = [(k[b:b + 1, :, :n], a[b:b + 1, :, :n], v[b:b + 1, :, :n])
                  for k, a, v in zip(self._k, self._arrived, self._v, strict=True)]
        return SinkRow(layers=layers, origin=self._origin[b, :n], seen_tokens=row.seen_tokens,
                       evicted_tokens=row.evicted_tokens)

    def buffers(self) -> list[torch.Tensor]:
        """Every preallocated buffer, written in place by each step (a CUDA graph's static
        inputs)."""
        return [*self._k, *self._arrived, *self._v]

    @classmethod
    def blank(cls, rows: int, slots: int, active: int, *, layers: int, kv_heads: int,
              head_dim: int, dtype: torch.dtype, device: torch.device | str) -> BatchSinkCache:
        """A batch of ``rows`` x ``slots`` (a multiple of :data:`SLOT_BLOCK`) whose first
        ``active`` rows hold one zero token each: the shapes of a live batch, for building a
        compiled step's graph ahead of its use (:mod:`.precompile`)."""
        if slots % SLOT_BLOCK:
            raise ValueError(f"slots must be a multiple of {SLOT_BLOCK}, got {slots}")
        batch = cls(rows)
        like = torch.zeros((1, kv_heads, 1, head_dim), dtype=dtype, device=device)
        batch._allocate([(like.shape, like.shape)] * layers, like, slots)
        batch._inv_freq = torch.ones(head_dim // 2)
        batch._rows = [_Row(0, slots, slots, 1, 1, 0) for _ in range(active)]
        return batch

    def _allocate(self, shapes: list[tuple[torch.Size, torch.Size]], like: torch.Tensor,
                  slots: int) -> None:
        """(Re)allocate the buffers for ``slots`` slots (``shapes``: a layer's keys' and values'
        ``(1, kv_heads, n, head_dim)`` per layer; ``like``: their dtype and device), keeping the
        rows already there."""
        old = (self._k, self._arrived, self._v, self._origin)
        with torch.inference_mode(False):  # normal tensors: written in place in either mode
            def buffer(shape: torch.Size) -> torch.Tensor:
                # (rows, kv_heads, slots + 1, head_dim): the last slot is never attended (B.1)
                return like.new_zeros((self.rows, shape[1], slots + 1, shape[-1]))

            self._k = [buffer(k) for k, _ in shapes]
            self._arrived = [buffer(k) for k, _ in shapes]
            self._v = [buffer(v) for _, v in shapes]
            self._origin = torch.zeros((self.rows, slots), dtype=torch.long)  # (rows, slots)
            self._lengths = torch.zeros(self.rows, dtype=torch.long, device=like.device)
        if old[0] and len(old[0]) == len(shapes):
            n, keep = self.active, min(self.slots, slots)
            for new_list, old_list in zip((self._k, self._arrived, self._v), old[:3], strict=True):
                for new, prev in zip(new_list, old_list, strict=True):
                    new[:n, :, :keep] = prev[:n, :, :keep]
            self._origin[:n, :keep] = old[3][:n, :keep]
        self.slots = slots

    def clear(self) -> None:
        """Free every row without copying anything back (after a failed step)."""
        self._rows.clear()

    # -- eviction ----------------------------------------------------------------------------------
    def full(self, b: int) -> bool:
        """Whether row ``b`` has no free slot for the next token."""
        row = self._rows[b]
        return row.length >= row.capacity

    def make_room(self, b: int, incoming: int) -> int:
        """:meth:`SinkCache.make_room` for row ``b``: evict so that ``incoming`` more fit."""
        row = self._rows[b]
        if not 0 <= incoming <= row.window_tokens:
            raise ValueError(f"incoming must be in 0..{row.window_tokens}, got {incoming}")
        stored = row.length
        if stored == 0:  # empty: nothing to evict
            return 0
        excess = stored + incoming - row.capacity
        if excess <= 0:  # growing: the new tokens fit after what is stored
            return 0
        # evicting: the one eviction of sink_cache (A.3, A.4) on row b's views; the other rows
        # are untouched.
        assert self._inv_freq is not None
        evict_window([(k[b:b + 1], a[b:b + 1], v[b:b + 1])
                      for k, a, v in zip(self._k, self._arrived, self._v, strict=True)],
                     self._origin[b], self._inv_freq, sinks=row.sink_tokens, stored=stored,
                     excess=excess)
        kept_end = stored - excess
        row.length = kept_end
        row.evicted_tokens += excess
        return excess

    # -- one step ----------------------------------------------------------------------------------
    def step_inputs(self, tokens: Sequence[int], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The forward call's inputs for one token per decoding row (``tokens[b]`` for row b).

        Returns ``input_ids`` and ``position_ids`` ``(batch, 1)`` and ``attention_mask``
        ``(batch, 1, 1, span)`` in ``dtype`` (0 where a row may attend, the dtype's minimum
        elsewhere), for the bucket ``batch`` that holds the rows.
        """
        n = self.active
        if len(tokens) != n:
            raise ValueError(f"{n} rows are decoding, got {len(tokens)} tokens")
        for b, row in enumerate(self._rows):
            if row.length >= row.capacity:
                raise RuntimeError(f"row {b} is full: make_room before the step")
        batch = bucket_size(n, self.rows)
        device = self._lengths.device
        lengths = [row.length for row in self._rows] + [0] * (batch - n)
        self._lengths[:batch] = torch.tensor(lengths, dtype=torch.long)
        span = span_size(max(lengths) + 1, self.slots)
        self._batch, self._span = batch, span
        heads = self._k[0].shape[1]
        self._write_at = (torch.arange(batch, device=device)[:, None],
                          torch.arange(heads, device=device)[None, :],
                          self._lengths[:batch, None])
        input_ids = torch.zeros((batch, 1), dtype=torch.long)
        input_ids[:n, 0] = torch.tensor(list(tokens), dtype=torch.long)
        # (batch, 1, 1, span): row b sees its stored slots and the one it writes now.
        visible = torch.arange(span, device=device)[None, :] <= self._lengths[:batch, None]
        mask = torch.zeros((batch, 1, 1, span), dtype=dtype, device=device)
        mask.masked_fill_(~visible[:, None, None, :], torch.finfo(dtype).min)
        return {"input_ids": input_ids.to(device),
                "position_ids": self._lengths[:batch].view(batch, 1).clone(),
                "attention_mask": mask}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one new key/value per row ``(batch, kv_heads, 1, head_dim)`` at its slot.

        Returns the layer's buffers for the bucket and span, ``(batch, kv_heads, span,
        head_dim)``; the mask from :meth:`step_inputs` hides each row's unused slots.
        """
        k, v = self.write(key_states, value_states, layer_idx)
        return k[:self._batch, :, :self._span], v[:self._batch, :, :self._span]

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor,
              layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`update` without the slicing: the layer's whole key and value buffers.

        A compiled step slices them itself, to a span it takes from the mask's shape, so that
        one graph serves every span (:mod:`.step`, C.2).
        """
        if key_states.shape[-2] != 1 or key_states.shape[0] != self._batch:
            raise RuntimeError(f"a batched step takes one token per row for {self._batch} rows, "
                               f"got {tuple(key_states.shape)}")
        assert self._write_at is not None
        k, arrived, v = self._k[layer_idx], self._arrived[layer_idx], self._v[layer_idx]
        # index_put_ at (row, head, slot): in place, also under torch.compile (a scatter_ into a
        # slice of the buffers made inductor copy them whole every step).
        at = self._write_at
        k.index_put_(at, key_states[:, :, 0].to(k.dtype))
        arrived.index_put_(at, key_states[:, :, 0].to(k.dtype))
        v.index_put_(at, value_states[:, :, 0].to(v.dtype))
        return k, v

    def advance(self) -> None:
        """After the forward call: every decoding row now stores one more token."""
        for b, row in enumerate(self._rows):
            self._origin[b, row.length] = row.length
            row.length += 1
            row.seen_tokens += 1

    # -- bookkeeping -------------------------------------------------------------------------------
    def length(self, b: int) -> int:
        """Tokens stored in row ``b``."""
        return self._rows[b].length

    def evicted(self, b: int) -> int:
        """Tokens row ``b``'s conversation has evicted so far."""
        return self._rows[b].evicted_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max((row.length for row in self._rows), default=0)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.slots

    def nbytes(self) -> int:
        """Bytes held by the batch buffers (keys, arrived keys, values, positions)."""
        tensors = [*self._k, *self._arrived, *self._v, self._origin]
        return sum(t.nbytes for t in tensors)

    def __len__(self) -> int:
        return len(self._k)

    def __repr__(self) -> str:
        return (f"BatchSinkCache(rows={self.rows}, slots={self.slots}, active={self.active}, "
                f"lengths={[row.length for row in self._rows]})")

