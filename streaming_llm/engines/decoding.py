"""The model-level steps of decoding: feed tokens through a causal LM with a KV cache, and sample.

No threads, HTTP or database here: the model runner (:mod:`.runner`) calls
:func:`forward_tokens` for a prompt chunk and :func:`decode_step` for a dense row, and
:func:`sample_rows` once per step to pick the next token of every row, each row with its own
:class:`Sampler` (its settings and its random generator).

``model.generate()`` is not used with a :class:`~streaming_llm.engines.sink_cache.SinkCache`: it
derives absolute positions from the number of tokens seen, while the sink cache needs positions
relative to what it stores (``arange(stored, stored + n)``) and room made before each call.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .sink_cache import SinkCache

__all__ = ["PENALTY_WINDOW", "Sampler", "decode_step", "eviction_chunk", "forward_tokens",
           "sample_rows"]


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

    def uniform(self) -> torch.Tensor:
        """One draw in [0, 1) from this sampler's own generator (a host tensor)."""
        return torch.rand((), generator=self._generator)

    @property
    def penalized(self) -> bool:
        return not (self.repetition_penalty == 1 and self.presence_penalty == 0
                    and self.frequency_penalty == 0)

    def penalize(self, scores: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        """``scores`` ``(vocab,)`` with the repetition penalties for ``history`` applied.

        The distinct ids and their counts are found on the host (from the list), so nothing here
        waits for the device.
        """
        if not history or not self.penalized:
            return scores
        counted = collections.Counter(history)
        ids = torch.tensor(list(counted), dtype=torch.long, device=scores.device)
        counts = torch.tensor(list(counted.values()), dtype=scores.dtype, device=scores.device)
        seen = scores[ids]
        if self.repetition_penalty != 1:
            seen = torch.where(seen > 0, seen / self.repetition_penalty,
                               seen * self.repetition_penalty)
        seen = seen - self.presence_penalty - self.frequency_penalty * counts
        return scores.index_copy(0, ids, seen)

    def __call__(self, logits: torch.Tensor, history: Sequence[int] = ()) -> int:
        """``logits``: ``(vocab,)``; ``history``: recent token ids; returns a token id."""
        return sample_rows(logits.reshape(1, -1), [self], [history])[0]


def sample_rows(logits: torch.Tensor, samplers: Sequence[Sampler],
                histories: Sequence[Sequence[int]],
                masks: torch.Tensor | None = None) -> list[int]:
    """The next token of every row, in one call: ``logits`` ``(rows, vocab)``, row ``b`` sampled
    by ``samplers[b]`` with the penalties of ``histories[b]``.

    ``masks``: ``(rows, vocab)`` booleans, the tokens each row may take (constrained decoding,
    :mod:`.constraints`; an unconstrained row is all True). The others are set to ``-inf``
    before anything else (penalties, temperature, top-k/p, min-p), so a sampled token, not only
    the greedy one, is always allowed.

    Every operation is row-wise, so a row's token does not depend on the other rows (nor on how
    many there are); the only device-to-host copy is the final list of tokens. The random draw is
    one uniform number per sampling row from the row's own generator (host side), turned into a
    token by inverse transform over the row's probabilities, which never picks a token whose
    probability is zero.
    """
    n = logits.shape[0]
    if n != len(samplers) or n != len(histories):
        raise ValueError(f"{n} rows of logits, {len(samplers)} samplers, {len(histories)} histories")
    device = logits.device
    scores = logits.detach().float()
    if masks is not None:
        scores = scores.masked_fill(~masks, -math.inf)
    if any(s.penalized and h for s, h in zip(samplers, histories, strict=True)):
        scores = torch.stack([s.penalize(scores[b], h) for b, (s, h)
                              in enumerate(zip(samplers, histories, strict=True))])
    greedy = scores.argmax(-1)  # (rows,)
    hot = [b for b, s in enumerate(samplers) if not s.greedy]
    if not hot:
        return [int(t) for t in greedy.tolist()]
    rows = torch.tensor(hot, device=device)
    hs = [samplers[b] for b in hot]

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device)[:, None]  # (hot, 1)

    x = scores[rows] / column([s.temperature for s in hs])  # (hot, vocab)
    vocab = x.shape[-1]
    ks = [s.top_k if 0 < s.top_k < vocab else 0 for s in hs]
    if any(ks):
        top = torch.topk(x, max(ks), dim=-1).values  # (hot, max k), descending
        kth = top.gather(-1, torch.tensor([max(k, 1) - 1 for k in ks], device=device)[:, None])
        cut = torch.tensor([k > 0 for k in ks], device=device)[:, None]
        x = x.masked_fill(cut & (x < kth), -math.inf)
    # From here on only the tokens still in matter (min-p and top-k leave a few dozen of 49k):
    # the most likely ``k`` of every row, ``k`` grown until the k-th is out in every row, are all
    # of them, so top-p and the draw run over those alone (full-width passes over the
    # vocabulary were most of a sampling step).
    # min-p: p < min_p * p_max  <=>  score < max score + log(min_p); min_p 0 gives -inf: keeps all
    floor = column([math.log(s.min_p) if s.min_p > 0 else -math.inf for s in hs])
    threshold = x.max(-1, keepdim=True).values + floor  # (hot, 1)
    k = min(vocab, 64)
    while True:
        values, ids = torch.topk(x, k, dim=-1, sorted=True)  # (hot, k), most likely first
        values = values.masked_fill(values < threshold, -math.inf)
        if k == vocab or bool(torch.isinf(values[:, -1]).all()):
            break
        k = min(vocab, k * 8)
    if any(s.top_p < 1 for s in hs):
        # Keep the smallest set of most likely tokens whose probability reaches top_p (always at
        # least the most likely one).
        probs = torch.softmax(values, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
        values = values.masked_fill(before >= column([s.top_p for s in hs]), -math.inf)
    # The draw inverts the CDF in token-id order, as over the whole vocabulary (a token left out
    # has probability zero there, so it adds nothing and is never picked).
    ids, by_id = torch.sort(ids, dim=-1)
    cdf = torch.softmax(values.gather(-1, by_id), dim=-1).cumsum(-1)  # (hot, k)
    u = torch.stack([s.uniform() for s in hs]).to(device)
    at = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_max(k - 1)
    picked = ids.gather(-1, at)[:, 0]
    tokens = greedy.index_copy(0, rows, picked)
    return [int(t) for t in tokens.tolist()]
