"""The model-level steps of decoding: feed tokens through a causal LM with a KV cache, and sample.

No threads, HTTP or database here: the local engine's decode loop
(:meth:`streaming_llm.engines.local.engine.LocalEngine`) runs these functions in its worker
thread: :func:`forward_tokens` for a prompt, then :func:`decode_step` per generated token, with a
:class:`Sampler` picking each token.

``model.generate()`` is not used with a :class:`~streaming_llm.engines.sink_cache.SinkCache`: it
derives absolute positions from the number of tokens seen, while the sink cache needs positions
relative to what it stores (``arange(stored, stored + n)``) and room made before each call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .sink_cache import SinkCache

__all__ = ["PENALTY_WINDOW", "Sampler", "decode_step", "eviction_chunk", "forward_tokens"]


def forward_tokens(model: Any, cache: Any, token_ids: Sequence[int], *,
                   chunk_size: int | None = None,
                   should_stop: Callable[[], bool] | None = None) -> torch.Tensor | None:
    """Feed ``token_ids`` through ``model``, appending to ``cache``; return the last token's logits.

    ``cache`` is a :class:`SinkCache` or a plain transformers ``DynamicCache``. Tokens go in chunks
    of at most ``chunk_size`` (default: the whole input), and never more than a sink cache's
    window, which cannot take more at once; for a sink cache, room is made before each chunk.
    ``should_stop`` is asked before every chunk: when it says yes, the rest is not fed and the
    result is None (the cache then holds the chunks fed so far).
    Positions are ``arange(stored, stored + n)``: absolute for a dense cache, cache-relative for a
    sink cache (A.1 of :mod:`~streaming_llm.engines.sink_cache`).

    Returns float32 logits of shape ``(vocab,)``.
    """
    ids = [int(t) for t in token_ids]
    if not ids:
        raise ValueError("forward_tokens needs at least one token")
    sink = isinstance(cache, SinkCache)
    size = chunk_size if chunk_size is not None else len(ids)
    if size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {size}")
    if sink:
        size = min(size, cache.window_tokens)
    device = model.device
    with torch.inference_mode():
        logits = None
        for start in range(0, len(ids), size):
            if should_stop is not None and should_stop():
                return None
            chunk = ids[start:start + size]
            if sink:
                cache.make_room(len(chunk))
            stored = cache.get_seq_length()
            input_ids = torch.tensor([chunk], dtype=torch.long, device=device)
            positions = torch.arange(stored, stored + len(chunk), device=device).unsqueeze(0)
            out = model(input_ids=input_ids, past_key_values=cache, position_ids=positions,
                        use_cache=True, logits_to_keep=1)
            logits = out.logits
        assert logits is not None
        return logits[0, -1].float()


PENALTY_WINDOW = 64  # recent answer tokens the penalties look at (llama.cpp's repeat_last_n)


def decode_step(model: Any, cache: Any, token: int, *, evict: int | None = None) -> torch.Tensor:
    """Feed one generated ``token``; return the next token's float32 logits ``(vocab,)``.

    A full sink cache first evicts ``evict`` tokens at once (default :func:`eviction_chunk`;
    never the sinks).
    """
    if isinstance(cache, SinkCache) and cache.get_seq_length() >= cache.capacity:
        cache.make_room(eviction_chunk(cache.window_tokens) if evict is None else evict)
    logits = forward_tokens(model, cache, [token])
    assert logits is not None
    return logits


def eviction_chunk(window_tokens: int) -> int:
    """How many tokens a decode loop evicts at once when a sink cache is full.

    Every eviction re-rotates the whole window (A.4 of :mod:`~streaming_llm.engines.sink_cache`),
    which costs about as much as half a decode step of the model; evicting one token per step
    would add that to every step. Evicting a chunk at a time amortizes it, at the price of
    attending to up to ``chunk - 1`` fewer window tokens; 1/16 of the window, at most 64, keeps
    that price small (e.g. 63 of a 1020-token window: about 2 % of the decode cost, as measured by
    ``streaming-llm bench cache``).
    """
    return max(1, min(64, window_tokens // 16))


class Sampler:
    """Pick the next token from logits: greedy at temperature 0, else top-k / top-p / min-p
    sampling; repetition penalties first, in both cases.

    Penalties look at ``history``, the most recent tokens (the engine passes the last
    :data:`PENALTY_WINDOW` of the answer, as many as llama.cpp's ``repeat_last_n``, which also
    counts the prompt's: that would keep an agent from quoting its context), each distinct token once
    for ``repetition_penalty`` and ``presence_penalty``, ``count`` times for
    ``frequency_penalty``:

    * ``repetition_penalty`` r (1 = off): a positive logit is divided by r, a negative one
      multiplied (CTRL, Keskar et al. 2019; llama.cpp ``repeat_penalty``);
    * ``presence_penalty`` a: ``logit -= a``; ``frequency_penalty`` f: ``logit -= f * count``
      (OpenAI's definitions);
    * ``min_p`` m (0 = off): after temperature, tokens less likely than m times the most likely
      one are dropped.

    With a ``seed`` the sampler owns a seeded ``torch.Generator``, so the same logits give the same
    tokens run after run; without one it owns a randomly seeded generator (never the global one).
    """

    def __init__(self, temperature: float, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, *, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> None:
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        if not (0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
        if not (0 <= min_p <= 1):
            raise ValueError(f"min_p must be in [0, 1], got {min_p}")
        if not repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.min_p = min_p
        self.repetition_penalty = repetition_penalty
        self.presence_penalty = presence_penalty
        self.frequency_penalty = frequency_penalty
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def penalize(self, scores: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        """``scores`` ``(vocab,)`` with the repetition penalties for ``history`` applied."""
        if not history or (self.repetition_penalty == 1 and self.presence_penalty == 0
                           and self.frequency_penalty == 0):
            return scores
        ids, counts = torch.tensor(list(history), dtype=torch.long).unique(return_counts=True)
        seen = scores[ids]
        if self.repetition_penalty != 1:
            seen = torch.where(seen > 0, seen / self.repetition_penalty,
                               seen * self.repetition_penalty)
        seen = seen - self.presence_penalty - self.frequency_penalty * counts.float()
        return scores.index_copy(0, ids, seen)

    def __call__(self, logits: torch.Tensor, history: Sequence[int] = ()) -> int:
        """``logits``: ``(vocab,)``; ``history``: recent token ids; returns a token id."""
        scores = self.penalize(logits.detach().reshape(-1).float().cpu(), history)
        if self.greedy:
            return int(torch.argmax(scores))
        scores = scores / self.temperature
        if 0 < self.top_k < scores.numel():
            kth = torch.topk(scores, self.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, -math.inf)
        if self.min_p > 0:
            # p < min_p * p_max  <=>  score < max score + log(min_p)
            scores = scores.masked_fill(scores < scores.max() + math.log(self.min_p), -math.inf)
        if self.top_p < 1:
            # Keep the smallest set of most likely tokens whose probability reaches top_p
            # (always at least the most likely one).
            sorted_scores, order = torch.sort(scores, descending=True)
            probs = torch.softmax(sorted_scores, dim=-1)
            before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
            drop = before >= self.top_p
            scores = scores.scatter(0, order[drop], -math.inf)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator))
