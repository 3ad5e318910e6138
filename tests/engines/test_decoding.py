"""The decode steps (forward_tokens, decode_step) and the Sampler."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from streaming_llm.engines.decoding import (
    Sampler,
    decode_step,
    eviction_chunk,
    forward_tokens,
    sample_rows,
)
from streaming_llm.engines.sink_cache import SinkCache

from .tiny_models import dense_forward, random_ids, tiny_model, torch_threads


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy machine their spin-waits
    # make these tests many times slower.
    with torch_threads(1):
        yield


# -- forward_tokens ------------------------------------------------------------------------------
def test_dense_cache_uses_absolute_positions_in_any_chunking() -> None:
    model = tiny_model("gpt_neox", layers=2)
    ids = random_ids(40)
    expected, _ = dense_forward(model, ids)
    for chunk_size in (None, 1, 7):
        cache = DynamicCache()
        logits = forward_tokens(model, cache, ids, chunk_size=chunk_size)
        assert logits.dtype == torch.float32 and logits.shape == (model.config.vocab_size,)
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        assert cache.get_seq_length() == 40


def test_forward_tokens_rejects_bad_input() -> None:
    model = tiny_model("llama", layers=1)
    with pytest.raises(ValueError, match="at least one token"):
        forward_tokens(model, DynamicCache(), [])
    with pytest.raises(ValueError, match="chunk_size"):
        forward_tokens(model, DynamicCache(), [3, 4], chunk_size=0)


def test_forward_tokens_stops_between_chunks_when_asked() -> None:
    model = tiny_model("llama", layers=1)
    cache = DynamicCache()
    asked = []

    def should_stop() -> bool:
        asked.append(cache.get_seq_length())
        return len(asked) > 2

    assert forward_tokens(model, cache, random_ids(20), chunk_size=8, should_stop=should_stop) is None
    assert asked == [0, 8, 16] and cache.get_seq_length() == 16


def test_forward_tokens_feeds_a_sink_cache_in_window_sized_chunks() -> None:
    model = tiny_model("llama", layers=1)
    cache = SinkCache.from_model(model, 4, 16)
    forward_tokens(model, cache, random_ids(50), chunk_size=512)  # more than the window at once
    assert cache.seen_tokens == 50 and cache.get_seq_length() <= 20


def test_decode_steps_run_a_sink_cache_past_the_window() -> None:
    model = tiny_model("qwen2", layers=2)
    cache = SinkCache.from_model(model, 4, 16)
    logits = forward_tokens(model, cache, random_ids(30))
    sampler = Sampler(0.8, seed=1)
    for _ in range(49):
        logits = decode_step(model, cache, sampler(logits), evict=1)
    assert cache.seen_tokens == 30 + 49 and cache.get_seq_length() == 20  # evicts 1 at a time


def test_decode_steps_evict_in_chunks_and_stay_a_correct_sink_cache() -> None:
    model = tiny_model("llama", layers=1)
    cache = SinkCache.from_model(model, 4, 16)
    prompt = random_ids(20)
    logits = forward_tokens(model, cache, prompt)
    out: list[int] = []
    for _ in range(40):
        out.append(Sampler(0)(logits))
        logits = decode_step(model, cache, out[-1], evict=5)
    stored = cache.get_seq_length()
    assert 20 - 4 <= stored <= 20 and cache.evicted_tokens % 5 == 0 and cache.evicted_tokens
    # after chunked evictions the cache is still "sinks + the most recent tokens, re-positioned"
    seen = prompt + out
    kept = seen[:4] + seen[len(seen) - (stored - 4):]
    expected, _ = dense_forward(model, kept)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_decode_step_evicts_the_default_chunk() -> None:
    model = tiny_model("llama", layers=1)
    cache = SinkCache.from_model(model, 4, 40)
    logits = forward_tokens(model, cache, random_ids(44))
    decode_step(model, cache, Sampler(0)(logits))
    assert cache.evicted_tokens == eviction_chunk(40) == 2


def test_eviction_chunk_is_a_small_share_of_the_window() -> None:
    assert [eviction_chunk(w) for w in (16, 40, 1020, 2000)] == [1, 2, 63, 64]


# -- Sampler -------------------------------------------------------------------------------------
def test_greedy_is_argmax_whatever_the_seed() -> None:
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    assert Sampler(0)(logits) == 1
    assert Sampler(0, seed=5, top_k=3, top_p=0.5)(logits) == 1


def test_seeded_sampling_is_reproducible() -> None:
    logits = torch.zeros(50)  # uniform: any slip in the generator shows
    a, b = Sampler(1.0, seed=42), Sampler(1.0, seed=42)
    draws_a = [a(logits) for _ in range(40)]
    assert draws_a == [b(logits) for _ in range(40)]
    other = Sampler(1.0, seed=43)
    assert draws_a != [other(logits) for _ in range(40)]
    assert len(set(draws_a)) > 10


def test_top_k_keeps_only_the_k_most_likely() -> None:
    logits = torch.tensor([3.0, 0.0, 2.9, -5.0, 2.8, 1.0])
    sampler = Sampler(1.0, top_k=3, seed=0)
    draws = {sampler(logits) for _ in range(300)}
    assert draws == {0, 2, 4}
    assert {Sampler(5.0, top_k=1, seed=s)(logits) for s in range(20)} == {0}


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    sampler = Sampler(1.0, top_p=0.7, seed=0)
    assert {sampler(logits) for _ in range(300)} == {0, 1}
    only_top = Sampler(1.0, top_p=0.5, seed=0)
    assert {only_top(logits) for _ in range(50)} == {0}
    everything = Sampler(1.0, top_p=1.0, seed=0)
    assert {everything(logits) for _ in range(600)} == {0, 1, 2, 3}


def test_temperature_sharpens_and_flattens() -> None:
    logits = torch.tensor([1.0, 0.0])
    cold, hot = Sampler(0.05, seed=0), Sampler(50.0, seed=0)
    assert sum(cold(logits) for _ in range(200)) == 0
    assert 60 < sum(hot(logits) for _ in range(200)) < 140


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": 1.0, "top_p": 0.0}, "top_p"),
    ({"temperature": 1.0, "top_p": 1.5}, "top_p"),
    ({"temperature": 1.0, "top_k": -1}, "top_k"),
])
def test_bad_sampler_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Sampler(**kwargs)


# -- penalties and min_p -------------------------------------------------------------------------
def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([2.0, 1.9, -1.0, -1.05, 0.5])
    sampler = Sampler(0, repetition_penalty=1.25)
    out = sampler.penalize(logits, [0, 2, 0])
    torch.testing.assert_close(out, torch.tensor([1.6, 1.9, -1.25, -1.05, 0.5]))
    assert Sampler(0)(logits, [0]) == 0  # no penalty: argmax
    assert sampler(logits, [0]) == 1  # the repeated token lost its lead
    assert Sampler(0, repetition_penalty=1.25)(torch.tensor([-1.0, -1.05]), [0]) == 1


def test_presence_counts_once_and_frequency_per_occurrence() -> None:
    logits = torch.tensor([1.0, 0.8, 0.0])
    history = [0, 0, 0, 2]
    torch.testing.assert_close(Sampler(0, presence_penalty=0.3).penalize(logits, history),
                               torch.tensor([0.7, 0.8, -0.3]))
    torch.testing.assert_close(Sampler(0, frequency_penalty=0.1).penalize(logits, history),
                               torch.tensor([0.7, 0.8, -0.1]))
    assert Sampler(0, frequency_penalty=0.1)(logits, history) == 1
    assert Sampler(0, frequency_penalty=0.05)(logits, history) == 0
    assert Sampler(0, presence_penalty=-0.5)(torch.tensor([0.8, 1.0]), [0]) == 0  # negative: favour


def test_min_p_drops_tokens_below_a_share_of_the_most_likely() -> None:
    probs = torch.tensor([0.4, 0.3, 0.19, 0.11])
    logits = probs.log()
    picked = {Sampler(1.0, min_p=0.5, seed=s)(logits) for s in range(200)}
    assert picked == {0, 1}  # 0.19 < 0.5 * 0.4
    assert {Sampler(1.0, seed=s)(logits) for s in range(200)} == {0, 1, 2, 3}


def _nucleus_by_full_sort(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p as the sampler did it before it ordered only the live tokens: a full sort."""
    sorted_x, order = torch.sort(x, descending=True, dim=-1)
    probs = torch.softmax(sorted_x, dim=-1)
    drop = torch.cumsum(probs, dim=-1) - probs >= top_p
    return x.scatter(-1, order, sorted_x.masked_fill(drop, -math.inf))


@pytest.mark.parametrize(("min_p", "top_k"), [(0.0, 0), (0.05, 0), (0.0, 40), (0.2, 5)])
def test_top_p_over_the_live_tokens_samples_as_a_full_sort_does(min_p: float, top_k: int) -> None:
    """The same tokens, seed for seed, as top-p over a fully sorted vocabulary."""
    logits = torch.randn(6, 4096, generator=torch.Generator().manual_seed(3)) * 4
    for seed in range(20):
        got = sample_rows(logits, [Sampler(0.8, top_p=0.9, top_k=top_k, min_p=min_p,
                                           seed=seed + b) for b in range(6)], [[]] * 6)
        x = logits / 0.8
        if top_k:
            kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
            x = x.masked_fill(x < kth, -math.inf)
        if min_p:
            x = x.masked_fill(x < x.max(-1, keepdim=True).values + math.log(min_p), -math.inf)
        cdf = torch.softmax(_nucleus_by_full_sort(x, 0.9), dim=-1).cumsum(-1)
        expected = []
        for b in range(6):
            u = torch.rand((), generator=torch.Generator().manual_seed(seed + b))
            expected.append(int(torch.searchsorted(cdf[b], u * cdf[b, -1], right=True)))
        assert got == expected
