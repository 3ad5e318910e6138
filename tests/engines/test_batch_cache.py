"""The batch of sink caches: a batched step equals each row's own step, row eviction equals
the sink cache's, joining and leaving move a conversation's cache exactly."""

from __future__ import annotations

import pytest
import torch

from streaming_llm.engines.batch_cache import BatchSinkCache, bucket_size, slots_for, span_size
from streaming_llm.engines.decoding import forward_tokens
from streaming_llm.engines.sink_cache import SinkCache

from .tiny_models import random_ids, tiny_model, torch_threads

S, W = 4, 16


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def prefilled(model, n: int, seed: int, window: int = W) -> SinkCache:
    cache = SinkCache.from_model(model, S, window)
    forward_tokens(model, cache, random_ids(n, seed=seed))
    return cache


def batched_step(model, batch: BatchSinkCache, tokens: list[int]) -> torch.Tensor:
    inputs = batch.step_inputs(tokens, torch.float32)
    with torch.inference_mode():
        out = model(**inputs, past_key_values=batch, use_cache=True, logits_to_keep=1)
    batch.advance()
    return out.logits[:len(tokens), -1].float()


def test_bucket_is_the_next_power_of_two_up_to_the_rows() -> None:
    assert [bucket_size(n, 8) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert bucket_size(5, 6) == 6
    with pytest.raises(ValueError):
        bucket_size(0, 8)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt_neox"])
def test_a_batched_step_gives_every_row_its_own_logits(family: str) -> None:
    model = tiny_model(family, layers=2)
    lengths = [1, 5, 19, 12, 9]  # 19 > S + W: that one has evicted already
    rows = [prefilled(model, n, seed=n) for n in lengths]
    alone = [prefilled(model, n, seed=n) for n in lengths]
    batch = BatchSinkCache(8)
    for cache in rows:
        batch.join(cache)
    tokens = [5, 6, 7, 8, 9]
    for _ in range(6):
        for b in range(batch.active):
            if batch.full(b):
                batch.make_room(b, 2)
        logits = batched_step(model, batch, tokens)
        for b, cache in enumerate(alone):
            if cache.get_seq_length() >= cache.capacity:
                cache.make_room(2)
            expected = forward_tokens(model, cache, [tokens[b]])
            torch.testing.assert_close(logits[b], expected, rtol=1e-4, atol=1e-4)
            assert batch.length(b) == cache.get_seq_length()
            assert batch.evicted(b) == cache.evicted_tokens
        tokens = [int(t) for t in logits.argmax(-1)]
    # leaving copies each row back: the caches equal the ones that stepped alone
    for b in reversed(range(len(rows))):
        batch.leave(b, rows[b])
    for mine, theirs in zip(rows, alone, strict=True):
        assert (mine.seen_tokens, mine.evicted_tokens) == (theirs.seen_tokens, theirs.evicted_tokens)
        for la, lb in zip(mine.layers, theirs.layers, strict=True):
            torch.testing.assert_close(la.keys, lb.keys, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(la.values, lb.values, rtol=1e-4, atol=1e-4)
        assert torch.equal(mine._origin[:mine.get_seq_length()],
                           theirs._origin[:theirs.get_seq_length()])


def test_row_eviction_is_the_sink_cache_eviction_bit_for_bit() -> None:
    model = tiny_model("llama", layers=2)
    full, other = prefilled(model, S + W, seed=3), prefilled(model, 6, seed=4)
    reference = prefilled(model, S + W, seed=3)
    batch = BatchSinkCache(4)
    batch.join(other)
    b = batch.join(full)
    assert batch.full(b) and not batch.full(0)
    assert batch.make_room(b, 5) == reference.make_room(5) == 5
    assert batch.make_room(0, 5) == 0  # a row with room is untouched
    batch.leave(b, full)
    for mine, theirs in zip(full.layers, reference.layers, strict=True):
        assert torch.equal(mine.keys, theirs.keys)  # the same arithmetic, so the same bits
        assert torch.equal(mine.values, theirs.values)
    assert full.evicted_tokens == reference.evicted_tokens == 5
    assert torch.equal(full._origin[:S + W - 5], reference._origin[:S + W - 5])


def test_leaving_moves_the_last_row_into_the_hole() -> None:
    model = tiny_model("llama", layers=1)
    caches = [prefilled(model, n, seed=n) for n in (3, 7, 11)]
    batch = BatchSinkCache(4)
    for cache in caches:
        batch.join(cache)
    assert batch.leave(0, caches[0]) == 2  # row 2 moved into row 0
    assert [batch.length(0), batch.length(1)] == [11, 7]
    assert batch.leave(1, caches[1]) is None
    assert batch.active == 1
    # the moved row still steps as its own cache would
    reference = prefilled(model, 11, seed=11)
    logits = batched_step(model, batch, [4])
    torch.testing.assert_close(logits[0], forward_tokens(model, reference, [4]),
                               rtol=1e-4, atol=1e-4)


def test_a_larger_cache_regrows_the_slots_and_keeps_the_rows() -> None:
    model = tiny_model("llama", layers=1)
    small, large = prefilled(model, 9, seed=1), prefilled(model, 30, seed=2, window=600)
    batch = BatchSinkCache(2)
    batch.join(small)
    assert batch.slots == slots_for(S + W)
    batch.join(large)
    assert batch.slots == slots_for(S + 600) > slots_for(S + W)
    ref_small, ref_large = prefilled(model, 9, seed=1), prefilled(model, 30, seed=2, window=600)
    logits = batched_step(model, batch, [5, 6])
    torch.testing.assert_close(logits[0], forward_tokens(model, ref_small, [5]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1], forward_tokens(model, ref_large, [6]), rtol=1e-4, atol=1e-4)


def test_misuse_is_refused() -> None:
    model = tiny_model("llama", layers=1)
    batch = BatchSinkCache(1)
    with pytest.raises(ValueError, match="prefill first"):
        batch.join(SinkCache.from_model(model, S, W))
    batch.join(prefilled(model, S + W, seed=1))
    with pytest.raises(RuntimeError, match="rows are in use"):
        batch.join(prefilled(model, 3, seed=2))
    with pytest.raises(RuntimeError, match="make_room"):
        batch.step_inputs([3], torch.float32)
    with pytest.raises(ValueError, match="tokens"):
        batch.step_inputs([3, 4], torch.float32)


def test_a_step_attends_to_the_slots_in_use_rounded_up_to_a_power_of_two() -> None:
    assert [span_size(n, 1000) for n in (1, 64, 65, 129, 600, 999)] == [64, 64, 128, 256, 1000, 1000]
    model = tiny_model("llama", layers=2)
    lengths = [5, 70, 100]
    rows = [prefilled(model, n, seed=n, window=400) for n in lengths]
    alone = [prefilled(model, n, seed=n, window=400) for n in lengths]
    batch = BatchSinkCache(4)
    for cache in rows:
        batch.join(cache)
    assert batch.slots == slots_for(S + 400)
    inputs = batch.step_inputs([3, 4, 5], torch.float32)
    assert inputs["attention_mask"].shape == (4, 1, 1, 128)  # the longest row, 101, rounded up
    with torch.inference_mode():
        out = model(**inputs, past_key_values=batch, use_cache=True, logits_to_keep=1)
    batch.advance()
    for b, cache in enumerate(alone):
        torch.testing.assert_close(out.logits[b, -1].float(), forward_tokens(model, cache, [3 + b]),
                                   rtol=1e-4, atol=1e-4)
