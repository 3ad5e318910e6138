"""An attention-sink KV cache for endless generation (StreamingLLM).

Reference: G. Xiao, Y. Tian, B. Chen, S. Han, M. Lewis. *Efficient Streaming Language Models with
Attention Sinks*. ICLR 2024 (arXiv:2309.17453). The authors' code (mit-han-lab/streaming-llm)
patches the attention of transformers 4.33; transformers itself shipped a ``SinkCache`` until 4.52
and removed it in 5.0. This module is our own implementation against the transformers 5.x
``Cache`` interface; everything that touches transformers internals is in the section
"transformers glue" at the bottom.

A.1 The cache
-------------
A decoder attends, at every step, to the keys and values of all earlier tokens. A dense cache grows
without bound, and a model run past its trained context fails. StreamingLLM observes that the
first few tokens receive a large share of attention whatever their content ("attention sinks"), so
a cache that keeps

    the first S tokens (the sinks)  +  the W most recent tokens (the window)

and evicts the middle keeps the model's output close to that of a model that saw everything
recent, at a constant cost per token. Positions *inside the cache* must be contiguous: the sinks
sit at positions 0..S-1 and the window right after them, at S..S+W-1, and a new query at the next
free position, whatever the tokens' positions in the original text were (§3.2 of the paper). A
model therefore never sees a position beyond S + W - 1, which must be below its trained context.

A.2 Counting
------------
``seen_tokens`` counts every token ever appended; ``get_seq_length()`` the tokens stored now;
``evicted_tokens`` those dropped. Always ``seen_tokens == stored + evicted_tokens`` and
``stored <= capacity == S + W``. A caller feeds the model cache-relative positions
``arange(stored, stored + n)`` (:func:`streaming_llm.engines.decoding.forward_tokens` does).

A.3 Evicting between forward calls
----------------------------------
A forward pass fixes the attention mask and positions before any layer writes to the cache, so
eviction cannot happen inside ``update``. :meth:`SinkCache.make_room` evicts *before* a forward
call, just enough that ``stored + incoming <= capacity``; ``incoming`` may not exceed W, so a
long prompt is fed in chunks of at most W tokens. There are three cases, written as such:
*empty* (nothing stored), *growing* (the new tokens fit), and *evicting* (the oldest window tokens
go, the sinks stay, the rest of the window moves left).

A.4 Re-positioning with RoPE, without drift
-------------------------------------------
Rotary position embeddings (Su et al., 2021) store a key already rotated by its position: for
each frequency ``f_j`` of the model (``inv_freq``), the pair ``(x1_j, x2_j)`` of a key at position
``p`` is turned by the angle ``p * f_j``. Rotations compose additively, ``R(a) R(b) = R(a + b)``,
so a key written at position ``p0`` and now living at slot ``p`` is ``R(p - p0)`` applied to the
key as it arrived. When ``e`` middle tokens are evicted, every window key moves from slot ``p`` to
``p - e``.

Doing that by re-rotating the *current* key by ``-e`` at every eviction is exact on paper but
drifts in practice: each re-rotation rounds to the cache dtype again, and in bfloat16 a key that
has been shifted 2000 times by one position carries 10-80 % relative error. So this cache keeps,
for every stored token,

* ``arrived``: the key exactly as the model produced it (rotated at its arrival slot ``p0``);
* ``origin``: that arrival slot ``p0`` (shared by all layers);
* ``keys``: the key at its current slot, which attention reads.

After an eviction the current key of slot ``p`` is recomputed from scratch as
``R(p - p0) @ arrived``, in float32, and rounded once to the cache dtype. Its error is the model's
own rounding of the arriving key plus one rounding, however many evictions it has lived through;
nothing is ever rotated twice. The rotation is a pure rotation: the arriving key already carries
any ``attention_scaling`` of the model's RoPE variant (YaRN), and ``R`` only turns it further. The
frequencies are the model's own ``inv_freq`` buffer, so linear / Llama-3 / YaRN scaling is
honoured; with partial rotary embeddings (GPT-NeoX) only the first ``2 * len(inv_freq)`` channels
are turned and the rest are copied. Sink keys (slots 0..S-1) never move: they stay bit-identical.
Values carry no position and are only moved, never changed.

The price is one extra copy of the keys (``nbytes`` counts it): 1.5x the memory of a plain K/V
cache of the same capacity, preallocated, and an O(W) pass over every layer's window per eviction
(it moves values and arrived keys and re-derives the current keys). That pass costs about half a
decode step of a small model, so a decode loop evicts a chunk at a time when the cache is full,
``make_room(k)`` once every ``k`` tokens (:func:`~streaming_llm.engines.decoding.eviction_chunk`,
1/16 of the window, at most 64), and attends to at most ``k - 1`` fewer recent tokens for it.

A.5 Which models
----------------
Positions can only be shifted when they enter attention as a rotation with fixed frequencies. The
cache refuses learned absolute positions (GPT-2, OPT), ALiBi and other non-RoPE schemes, RoPE
whose frequencies depend on the sequence length (``dynamic`` NTK scaling, LongRoPE), and layers
that are not full attention; :func:`check_streaming_support` names the reason and suggests dense
mode (``STREAMING_LLM_STREAMING=false``). Families whose rotation convention (``rotate_half``) the
tests prove: Llama, Mistral, Qwen2, Qwen3, GPT-NeoX.

Shapes: keys and values are ``(batch, kv_heads, tokens, head_dim)`` as transformers passes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = ["SinkCache", "SinkRow", "UnsupportedModel", "check_streaming_support", "evict_window"]

DENSE_HINT = "set STREAMING_LLM_STREAMING=false to serve it with a dense cache instead"

# Model families whose attention applies RoPE with transformers' ``rotate_half`` convention to
# every layer, which is what the re-rotation below assumes (the tests prove each of them).
_ROTATE_HALF_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt_neox"})
# RoPE variants with fixed frequencies (a rotation by a position difference is well defined).
_FIXED_FREQUENCY_ROPE = frozenset({"default", "linear", "llama3", "yarn"})
_ABSOLUTE_POSITIONS = frozenset({"gpt2", "gpt_bigcode", "opt", "biogpt", "xglm", "codegen"})
_ALIBI = frozenset({"bloom", "mpt", "falcon"})


class UnsupportedModel(ValueError):
    """The model's positions cannot be shifted, so the sink cache cannot serve it."""


def check_streaming_support(config: Any) -> None:
    """Raise :class:`UnsupportedModel` unless the sink cache can re-position this model's keys.

    ``config`` is a transformers ``PretrainedConfig`` (the text config of a multimodal model is
    used when there is one).
    """
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(cfg, "model_type", None) or type(cfg).__name__
    if model_type not in _ROTATE_HALF_FAMILIES:
        if model_type in _ABSOLUTE_POSITIONS:
            why = "it uses learned absolute position embeddings, which cannot be shifted"
        elif model_type in _ALIBI:
            why = "it does not use rotary position embeddings (RoPE)"
        else:
            why = ("the sink cache re-positions rotary (RoPE) keys and is only verified for "
                   f"{', '.join(sorted(_ROTATE_HALF_FAMILIES))}")
        raise UnsupportedModel(f"model type {model_type!r} cannot use the streaming (attention-sink) "
                               f"cache: {why}; {DENSE_HINT}")
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "per-layer"
    if rope_type not in _FIXED_FREQUENCY_ROPE:
        why = ("its RoPE frequencies change with the sequence length"
               if rope_type in ("dynamic", "longrope") or "dynamic" in str(rope_type)
               else "this RoPE variant is not verified for re-positioning")
        raise UnsupportedModel(f"model type {model_type!r} with rope_type {rope_type!r} cannot use the "
                               f"streaming (attention-sink) cache: {why}; {DENSE_HINT}")
    layer_types = getattr(cfg, "layer_types", None) or []
    odd = sorted({t for t in layer_types if t != "full_attention"})
    if odd:
        raise UnsupportedModel(f"model type {model_type!r} has {', '.join(odd)} layers; the streaming "
                               f"(attention-sink) cache supports full-attention layers only; {DENSE_HINT}")


def _rotate(src: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> None:
    """Write ``R(angle) @ src`` into ``out``, computed in float32 and rounded once.

    ``src``/``out``: ``(batch, heads, n, head_dim)`` in the cache dtype; ``cos``/``sin``: ``(n, r/2)``
    float32 where ``r = 2 * len(inv_freq)`` is the number of rotary channels. transformers'
    ``rotate_half`` convention pairs channel ``j`` with ``j + r/2``, so with ``x1 = x[:r/2]`` and
    ``x2 = x[r/2:r]`` the rotation by ``theta`` is ``(x1 cos - x2 sin, x2 cos + x1 sin)``; channels
    beyond ``r`` (partial rotary, GPT-NeoX) carry no position and are copied.
    """
    half = cos.shape[-1]
    x1 = src[..., :half].float()
    x2 = src[..., half:2 * half].float()
    out[..., :half] = x1 * cos - x2 * sin
    out[..., half:2 * half] = x2 * cos + x1 * sin
    if 2 * half < src.shape[-1]:
        out[..., 2 * half:] = src[..., 2 * half:]


@dataclass
class SinkRow:
    """What one cache row holds, as tensors: the unit a batch row and a cache file copy.

    ``layers``: per layer ``(keys, arrived, values)``, each ``(1, kv_heads, stored, head_dim)``;
    ``origin``: ``(stored,)`` long, the arrival slot of every stored key (A.4); the counters of A.2.
    """

    layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    origin: torch.Tensor
    seen_tokens: int
    evicted_tokens: int

    @property
    def stored(self) -> int:
        return int(self.origin.shape[0])


def evict_window(layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                 origin: torch.Tensor, inv_freq: torch.Tensor, *, sinks: int, stored: int,
                 excess: int) -> None:
    """Drop window slots ``sinks .. sinks+excess-1`` of one cache row and move the rest left (A.3,
    A.4): the one eviction, used by :class:`SinkCache` and by each row of a batch
    (:class:`~streaming_llm.engines.batch_cache.BatchSinkCache`), so a row evicts exactly as its
    conversation's cache would.

    ``layers``: per layer ``(keys, arrived, values)``, each ``(1, kv_heads, slots, head_dim)`` (a
    row's view); ``origin``: ``(slots,)`` long, the row's arrival slots, updated in place;
    ``inv_freq``: ``(r/2,)`` float32. The caller sets the row's stored length to ``stored - excess``.
    """
    kept_end = stored - excess
    origin[sinks:kept_end] = origin[sinks + excess:stored].clone()
    # A.4: the key now at slot p arrived rotated at origin[p]; rotate it by p - origin[p] <= 0.
    # Positions and frequencies in float32 as the model computes them (integers below 2^24 are
    # exact); one (n, r/2) table serves every layer and head.
    shift = (torch.arange(sinks, kept_end) - origin[sinks:kept_end]).to(inv_freq.device)
    angle = shift.float()[:, None] * inv_freq[None, :]
    cos, sin = angle.cos(), angle.sin()
    src, dst = slice(sinks + excess, stored), slice(sinks, kept_end)
    for keys, arrived, values in layers:
        # The ranges overlap, so copy through a temporary. Values and arrived keys only move.
        values[:, :, dst] = values[:, :, src].clone()
        arrived[:, :, dst] = arrived[:, :, src].clone()
        _rotate(arrived[:, :, dst], cos.to(keys.device), sin.to(keys.device), out=keys[:, :, dst])


class SinkCache(Cache):
    """StreamingLLM cache: the first ``sink_tokens`` plus the latest ``window_tokens`` tokens.

    Build it with :meth:`from_model`, pass it as ``past_key_values`` with cache-relative
    ``position_ids`` (``arange(stored, stored + n)``), and call :meth:`make_room` (n) before every
    forward call of ``n`` tokens. Use it under ``torch.inference_mode()`` or ``torch.no_grad()``.
    """

    layers: list[_SinkLayer]  # type: ignore[assignment]  # narrower than Cache's: all ours

    def __init__(self, *, num_layers: int, sink_tokens: int, window_tokens: int,
                 inv_freq: torch.Tensor) -> None:
        if sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {sink_tokens}")
        if window_tokens < 1:
            raise ValueError(f"window_tokens must be >= 1, got {window_tokens}")
        self.sink_tokens = sink_tokens
        self.window_tokens = window_tokens
        self.capacity = sink_tokens + window_tokens
        self.seen_tokens = 0
        self.evicted_tokens = 0
        self._inv_freq = inv_freq.detach().float().clone()  # (r/2,)
        # origin[p] = the slot at which the key now in slot p arrived (its RoPE position then).
        with torch.inference_mode(False):  # a normal tensor: written in place in either mode
            self._origin = torch.zeros(self.capacity, dtype=torch.long)
        super().__init__(layers=[_SinkLayer(self.capacity) for _ in range(num_layers)])

    @classmethod
    def from_model(cls, model: Any, sink_tokens: int, window_tokens: int) -> SinkCache:
        """A cache for ``model`` (a transformers causal LM); raises :class:`UnsupportedModel`."""
        config = model.config.get_text_config()
        check_streaming_support(config)
        capacity = sink_tokens + window_tokens
        trained = getattr(config, "max_position_embeddings", None)
        if trained is not None and capacity > trained:
            raise ValueError(f"sink_tokens + window_tokens = {capacity} exceeds the model's trained "
                             f"context of {trained} positions; lower STREAMING_LLM_WINDOW_TOKENS")
        sliding = getattr(config, "sliding_window", None)
        if sliding is not None and not getattr(config, "layer_types", None) and capacity > sliding:
            raise UnsupportedModel(f"sink_tokens + window_tokens = {capacity} exceeds the model's "
                                   f"sliding attention window of {sliding}; lower "
                                   f"STREAMING_LLM_WINDOW_TOKENS or {DENSE_HINT}")
        return cls(num_layers=config.num_hidden_layers, sink_tokens=sink_tokens,
                   window_tokens=window_tokens, inv_freq=_model_inv_freq(model))

    # -- what attention calls ----------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``n`` new keys/values ``(batch, kv_heads, n, head_dim)`` to layer ``layer_idx``.

        Returns all stored keys and values of the layer, ``(batch, kv_heads, stored + n, head_dim)``.
        The new keys arrive rotated at slots ``stored .. stored + n - 1``, which is why the caller
        must pass exactly those positions.
        """
        layer = self.layers[layer_idx]
        start = layer.length
        keys, values = layer.update(key_states, value_states)
        if layer_idx == 0:
            n = key_states.shape[-2]
            self._origin[start:start + n] = torch.arange(start, start + n)
            self.seen_tokens += n
        return keys, values

    # -- eviction ----------------------------------------------------------------------------------
    def make_room(self, incoming: int) -> int:
        """Evict just enough window tokens that ``incoming`` more fit; return how many went.

        Call between forward calls (never during one). ``incoming`` must be at most
        ``window_tokens``: feed longer inputs in chunks.
        """
        if incoming < 0:
            raise ValueError(f"incoming must be >= 0, got {incoming}")
        if incoming > self.window_tokens:
            raise ValueError(f"cannot make room for {incoming} tokens in a window of "
                             f"{self.window_tokens}; feed them in chunks of at most that many")
        lengths = {layer.length for layer in self.layers}
        if len(lengths) > 1:
            raise RuntimeError(f"layers hold different lengths {sorted(lengths)}: make_room was "
                               "called during a forward pass")
        stored = lengths.pop()
        if stored == 0:  # empty: nothing to evict
            return 0
        excess = stored + incoming - self.capacity
        if excess <= 0:  # growing: the new tokens fit after what is stored
            return 0
        # evicting: drop window slots S .. S+excess-1; slot p >= S+excess moves to p - excess.
        # excess <= stored - S because incoming <= W, so only window tokens ever go.
        evict_window([layer.buffers() for layer in self.layers], self._origin, self._inv_freq,
                     sinks=self.sink_tokens, stored=stored, excess=excess)
        for layer in self.layers:
            layer.truncate(stored - excess)
        self.evicted_tokens += excess
        return excess

    def skip(self, n: int) -> None:
        """Count ``n`` tokens as seen and evicted without feeding them: a cache rebuilt from the
        sinks and only the most recent window of a long history (the engine's bounded rebuild)
        holds what an evicting cache would, with the middle never computed. The sinks must be in
        place (A.3: only window tokens are ever evicted)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n and self.get_seq_length() < self.sink_tokens:
            raise ValueError(f"skip needs the {self.sink_tokens} sinks stored first, "
                             f"{self.get_seq_length()} are")
        self.seen_tokens += n
        self.evicted_tokens += n

    # -- bookkeeping -------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens stored now in layer ``layer_idx`` (not the tokens seen: see ``seen_tokens``)."""
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.capacity

    def nbytes(self) -> int:
        """Bytes held: current keys, arrived keys and values of every layer, plus positions."""
        return sum(layer.nbytes() for layer in self.layers) + self._origin.nbytes

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.seen_tokens = self.evicted_tokens = 0

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` stored tokens, transformers' meaning of crop: a negative
        ``max_length`` drops that many of the newest tokens (as :meth:`rollback`).

        Raises ValueError when that would drop a sink once something has been evicted (the
        tokens before the window are gone; see :meth:`can_rollback`).
        """
        stored = self.get_seq_length()
        keep = stored + max_length if max_length < 0 else max_length
        if keep < stored:
            self.rollback(stored - keep)

    def can_rollback(self, n: int) -> bool:
        """Whether the newest ``n`` tokens seen are all still stored (see :meth:`rollback`)."""
        stored = self.get_seq_length()
        floor = self.sink_tokens if self.evicted_tokens else 0
        return 0 <= n <= stored - min(floor, stored)

    def rollback(self, n: int) -> None:
        """Forget the newest ``n`` tokens, as if they had never been fed.

        The local engine uses this to bring a conversation's cache back to the canonical
        tokenization of its text (the tokens a model generates may be tokenized differently when
        the text is read back). Only stored window tokens can go: once anything has been evicted,
        the sinks stay. Positions stay contiguous because only the tail is removed.
        """
        if not self.can_rollback(n):
            raise ValueError(f"cannot roll back {n} tokens: {self.get_seq_length()} stored, "
                             f"{self.evicted_tokens} evicted, {self.sink_tokens} sinks")
        if n == 0:
            return
        for layer in self.layers:
            layer.truncate(layer.length - n)
        self.seen_tokens -= n

    def clone(self) -> SinkCache:
        """An independent copy (same sinks, window, stored tokens and positions).

        The local engine keeps an agent's pinned prefix once and gives every new conversation a
        clone of it, so the prefix is not prefilled again.
        """
        copy = SinkCache(num_layers=len(self.layers), sink_tokens=self.sink_tokens,
                         window_tokens=self.window_tokens, inv_freq=self._inv_freq)
        copy.seen_tokens, copy.evicted_tokens = self.seen_tokens, self.evicted_tokens
        with torch.inference_mode(False):  # normal tensors, as the originals
            copy._origin = self._origin.clone()
            for mine, theirs in zip(self.layers, copy.layers, strict=True):
                mine.copy_into(theirs)
        return copy

    @property
    def inv_freq(self) -> torch.Tensor:
        """``(r/2,)`` float32: the model's RoPE frequencies this cache re-rotates with (A.4)."""
        return self._inv_freq

    def snapshot(self) -> SinkRow:
        """Views of what is stored now (no copy): valid until the cache changes."""
        n = self.get_seq_length()
        layers = [tuple(t[:, :, :n] for t in layer.buffers()) for layer in self.layers] if n else []
        return SinkRow(layers=layers, origin=self._origin[:n],  # type: ignore[arg-type]
                       seen_tokens=self.seen_tokens, evicted_tokens=self.evicted_tokens)

    def restore(self, row: SinkRow) -> None:
        """Make this cache hold exactly ``row`` (copied), e.g. a batch row leaving or a file read.

        ``row`` must fit: at most ``capacity`` stored, one entry per layer.
        """
        n = row.stored
        if n > self.capacity or (n and len(row.layers) != len(self.layers)):
            raise ValueError(f"a row of {n} tokens and {len(row.layers)} layers does not fit a "
                             f"cache of capacity {self.capacity} and {len(self.layers)} layers")
        for layer, tensors in zip(self.layers, row.layers, strict=False):
            if not layer.is_initialized:
                layer.lazy_initialization(tensors[0], tensors[2])
            for mine, theirs in zip(layer.buffers(), tensors, strict=True):
                mine[:, :, :n] = theirs[:, :, :n]
        for layer in self.layers:
            if layer.is_initialized:
                layer.truncate(n)
        self._origin[:n] = row.origin[:n]
        self.seen_tokens, self.evicted_tokens = row.seen_tokens, row.evicted_tokens

    def adopt(self, layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
              origin: torch.Tensor, *, stored: int, seen_tokens: int,
              evicted_tokens: int) -> None:
        """Take ``layers`` as this cache's buffers, without copying: per layer ``(keys, arrived,
        values)``, each ``(1, kv_heads, capacity, head_dim)`` with the first ``stored`` slots
        filled; ``origin`` ``(capacity,)``. The disk tier builds them from a file with no torch
        kernel (so no second OpenMP team), and hands them over here."""
        if len(layers) != len(self.layers) or origin.shape != (self.capacity,) \
                or not 0 <= stored <= self.capacity:
            raise ValueError("buffers do not fit this cache")
        for layer, (k, arrived, v) in zip(self.layers, layers, strict=True):
            if k.shape[2] != self.capacity or arrived.shape != k.shape or v.shape[2] != self.capacity:
                raise ValueError("buffers do not fit this cache")
            layer.adopt(k, arrived, v, stored)
        self._origin = origin
        self.seen_tokens, self.evicted_tokens = seen_tokens, evicted_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("SinkCache does not support beam search")

    def __repr__(self) -> str:
        return (f"SinkCache(sink_tokens={self.sink_tokens}, window_tokens={self.window_tokens}, "
                f"stored={self.get_seq_length()}, seen={self.seen_tokens}, "
                f"evicted={self.evicted_tokens})")


# ---------------------------------------------------------------------------------------------------
# transformers glue: the only code that knows transformers' cache-layer interface and module layout.
# The tests pass on transformers 5.0.0, 5.10.4, 5.20.2 and 5.23.0; pyproject.toml pins >=5.0,<5.24.
# ---------------------------------------------------------------------------------------------------
def _model_inv_freq(model: Any) -> torch.Tensor:
    """The RoPE frequencies the model actually uses: the ``inv_freq`` buffer of its rotary module.

    That buffer already includes linear / Llama-3 / YaRN scaling and, for partial rotary models,
    has ``rotary_dims / 2`` entries. The forward pass casts it to float32; so do we.
    """
    found = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    if len(found) != 1:
        raise UnsupportedModel(f"expected one rotary embedding module in {type(model).__name__}, "
                               f"found {len(found)}; {DENSE_HINT}")
    return found[0].inv_freq.detach().float().clone()


class _SinkLayer(CacheLayerMixin):
    """One layer's storage: preallocated ``(batch, kv_heads, capacity, head_dim)`` buffers.

    ``keys``/``values`` are views of the first ``length`` slots (what attention reads);
    ``_arrived`` keeps every key as it arrived (A.4).
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._arrived: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        # Allocated as normal tensors even under inference_mode, so that in-place writes work both
        # inside and outside it. Uninitialized: nothing reads a slot beyond ``length`` (zeroing
        # a window of 2,000 slots cost ~50 ms per new conversation of the default model).
        with torch.inference_mode(False):
            self._k = key_states.new_empty((b, h, self.capacity, d))
            self._arrived = key_states.new_empty((b, h, self.capacity, d))
            self._v = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self._k is not None and self._v is not None and self._arrived is not None
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"SinkCache overflow: {end} tokens > capacity {self.capacity}; call "
                               "make_room(n) before each forward call")
        self._k[:, :, start:end] = key_states
        self._arrived[:, :, start:end] = key_states
        self._v[:, :, start:end] = value_states
        self.length = end
        self._refresh_views()
        return self._k[:, :, :end], self._v[:, :, :end]

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The preallocated ``(1, kv_heads, capacity, head_dim)`` buffers: current keys, arrived
        keys, values (slots beyond ``length`` are unspecified)."""
        if self._k is None or self._arrived is None or self._v is None:
            raise ValueError("the sink cache layer holds nothing yet")
        return self._k, self._arrived, self._v

    def adopt(self, k: torch.Tensor, arrived: torch.Tensor, v: torch.Tensor, length: int) -> None:
        """Use these preallocated buffers, the first ``length`` slots stored (no copy)."""
        self._k, self._arrived, self._v = k, arrived, v
        self.dtype, self.device, self.is_initialized = k.dtype, k.device, True
        self.truncate(length)

    def truncate(self, length: int) -> None:
        """Say that the first ``length`` slots are stored (after an eviction, a rollback, or a
        copy into the buffers)."""
        self.length = length
        self._refresh_views()

    def copy_into(self, other: _SinkLayer) -> None:
        """Make ``other`` (same capacity) an independent copy of this layer."""
        other.length = self.length
        if self.is_initialized:
            assert self._k is not None and self._v is not None and self._arrived is not None
            n = self.length  # the stored slots only: the rest is never read
            other._k, other._v = torch.empty_like(self._k), torch.empty_like(self._v)
            other._arrived = torch.empty_like(self._arrived)
            for mine, theirs in ((self._k, other._k), (self._v, other._v),
                                 (self._arrived, other._arrived)):
                theirs[:, :, :n] = mine[:, :, :n]
            other.dtype, other.device, other.is_initialized = self.dtype, self.device, True
            other._refresh_views()

    def _refresh_views(self) -> None:
        assert self._k is not None and self._v is not None
        self.keys = self._k[:, :, :self.length]
        self.values = self._v[:, :, :self.length]

    def get_mask_sizes(self, query: int | torch.Tensor) -> tuple[int, int]:
        # Recent 5.x releases pass the query length, 5.0 passes cache_position (that is
        # ``arange(stored, stored + q)``). Either way: kv_length, kv_offset = stored + q, 0.
        query_length = query if isinstance(query, int) else int(query.shape[0])
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    get_max_cache_shape = get_max_length  # the same method, as earlier 5.x releases name it

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self._k, self._v, self._arrived) if t is not None)

    def reset(self) -> None:
        self.length = 0
        self.keys = self.values = None
        self._k = self._v = self._arrived = None
        self.is_initialized = False
