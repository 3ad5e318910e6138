"""The StreamingLLM sink cache against dense references, on tiny random models.

The numbered tests are the correctness criteria of issue 3:
1. window >= sequence behaves exactly like a dense cache (and like ``model.generate``);
2. after evictions every layer holds min(seen, S+W) tokens, sinks bit-identical, values unchanged;
3. on a 1-layer model the logits after eviction equal a dense forward over the kept tokens at
   positions 0..L-1 (re-positioning is right), for every supported family;
4. in bfloat16 the re-positioning error does not grow with the number of evictions.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from streaming_llm.engines.decoding import Sampler, decode_step, forward_tokens
from streaming_llm.engines.sink_cache import SinkCache, UnsupportedModel, check_streaming_support

from .tiny_models import dense_forward, random_ids, tiny_config, tiny_model, torch_threads

S, W = 4, 16


def layer0_keys(cache) -> torch.Tensor:
    return cache.layers[0].keys[0].float()  # (kv_heads, tokens, head_dim)



@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy machine their spin-waits
    # make these tests many times slower.
    with torch_threads(1):
        yield


# -- 1. window >= sequence: identical to a dense cache ------------------------------------------
def test_window_covering_the_sequence_matches_dense_cache_and_generate() -> None:
    model = tiny_model("llama", layers=2)
    prompt = random_ids(12)
    sink, dense = SinkCache.from_model(model, 4, 100), DynamicCache()
    sink_logits = forward_tokens(model, sink, prompt)
    dense_logits = forward_tokens(model, dense, prompt)
    tokens = []
    for _ in range(20):
        torch.testing.assert_close(sink_logits, dense_logits, rtol=1e-5, atol=1e-5)
        token = int(torch.argmax(sink_logits))
        tokens.append(token)
        sink_logits = forward_tokens(model, sink, [token])
        dense_logits = forward_tokens(model, dense, [token])
    assert sink.evicted_tokens == 0 and sink.get_seq_length() == 32

    with torch.inference_mode():
        reference = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)
    assert tokens == reference[0, len(prompt):].tolist()
    # and our decode steps give the same greedy tokens
    cache = SinkCache.from_model(model, 4, 100)
    logits = forward_tokens(model, cache, prompt)
    loop = [Sampler(0)(logits)]
    while len(loop) < 20:
        logits = decode_step(model, cache, loop[-1])
        loop.append(Sampler(0)(logits))
    assert loop == tokens
    assert len(set(tokens)) > 1  # a model stuck on one token would prove little


# -- 2. bookkeeping through evictions ------------------------------------------------------------
def test_evictions_keep_min_seen_capacity_tokens_sinks_bit_identical_values_unchanged() -> None:
    model = tiny_model("llama", layers=3)
    cache = SinkCache.from_model(model, S, W)
    ids = random_ids(300, seed=3)
    chunks = [3, 1, 5, 16, 1, 1, 7, 2, 16, 9] * 4
    sinks_k = sinks_v = None
    fed = 0
    for n in chunks:
        before_v = [layer.values.clone() for layer in cache.layers] if fed else None
        before_len, before_evicted = cache.get_seq_length(), cache.evicted_tokens
        forward_tokens(model, cache, ids[fed:fed + n])
        fed += n
        evicted = cache.evicted_tokens - before_evicted

        assert cache.seen_tokens == fed
        assert cache.evicted_tokens + cache.get_seq_length() == fed
        for layer_idx, layer in enumerate(cache.layers):
            assert cache.get_seq_length(layer_idx) == min(fed, S + W)
            assert layer.keys.shape[-2] == layer.values.shape[-2] == min(fed, S + W)
        if sinks_k is None and fed >= S:
            sinks_k = [layer.keys[:, :, :S].clone() for layer in cache.layers]
            sinks_v = [layer.values[:, :, :S].clone() for layer in cache.layers]
        if sinks_k is not None:
            for layer, k, v in zip(cache.layers, sinks_k, sinks_v, strict=True):
                assert torch.equal(layer.keys[:, :, :S], k)
                assert torch.equal(layer.values[:, :, :S], v)
        if before_v is not None:  # surviving values only moved left by `evicted`
            for layer, old in zip(cache.layers, before_v, strict=True):
                survivors = old[:, :, S + evicted:before_len] if before_len > S else old[:, :, S:S]
                assert torch.equal(layer.values[:, :, S:S + survivors.shape[-2]], survivors)
    assert cache.evicted_tokens > 10 * W  # many evictions happened
    # nbytes is flat once full: it counts preallocated buffers, not tokens seen
    full = cache.nbytes()
    forward_tokens(model, cache, ids[:16])
    assert cache.nbytes() == full > 0


# -- 3. re-positioning is right: streamed logits == dense forward over the kept tokens -----------
FAMILIES = [("llama", "default"), ("llama", "linear"), ("llama", "llama3"), ("llama", "yarn"),
            ("mistral", "default"), ("qwen2", "default"), ("qwen3", "default"),
            ("gpt_neox", "default")]


@pytest.mark.parametrize(("family", "rope"), FAMILIES, ids=[f"{f}-{r}" for f, r in FAMILIES])
def test_logits_after_eviction_equal_dense_forward_over_kept_tokens(family: str, rope: str) -> None:
    model = tiny_model(family, layers=1, rope=rope)
    cache = SinkCache.from_model(model, S, W)
    ids = random_ids(70, seed=5)
    # prompt in chunks, then token by token: evictions of many sizes
    forward_tokens(model, cache, ids[:30], chunk_size=7)
    for t in ids[30:]:
        logits = forward_tokens(model, cache, [t])
    kept = ids[:S] + ids[-W:]
    assert cache.get_seq_length() == len(kept) and cache.evicted_tokens == len(ids) - len(kept)

    expected, fresh = dense_forward(model, kept)  # positions 0..S+W-1
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer0_keys(cache), fresh.layers[0].keys[0].float(),
                               rtol=1e-5, atol=1e-5)
    # The check can fail: the same tokens at their original (non-contiguous) positions give
    # clearly different logits, so positions matter in these models.
    original = list(range(S)) + list(range(len(ids) - W, len(ids)))
    wrong, _ = dense_forward(model, kept, original)
    assert (wrong - expected).abs().max() > 1e-2


def test_long_prompt_streams_through_in_chunks() -> None:
    model = tiny_model("llama", layers=1)
    ids = random_ids(100, seed=7)
    by_window = SinkCache.from_model(model, S, W)
    logits = forward_tokens(model, by_window, ids)  # 100 tokens through a window of 16
    assert (by_window.seen_tokens, by_window.get_seq_length(), by_window.evicted_tokens) == (100, 20, 80)
    expected, _ = dense_forward(model, ids[:S] + ids[-W:])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    small_chunks = SinkCache.from_model(model, S, W)
    torch.testing.assert_close(forward_tokens(model, small_chunks, ids, chunk_size=5), expected,
                               rtol=1e-4, atol=1e-4)
    # a chunk size above the window is capped at the window
    torch.testing.assert_close(forward_tokens(model, SinkCache.from_model(model, S, W), ids,
                                              chunk_size=W + 1), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="chunks"):
        by_window.make_room(W + 1)


def test_no_sinks_is_a_repositioned_sliding_window() -> None:
    model = tiny_model("qwen2", layers=1)
    cache = SinkCache.from_model(model, 0, W)
    ids = random_ids(50, seed=11)
    logits = forward_tokens(model, cache, ids, chunk_size=3)
    expected, _ = dense_forward(model, ids[-W:])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


# -- 4. no drift in bfloat16 -----------------------------------------------------------------------
def _relative_error(keys: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest per-vector relative error over heads and tokens; inputs (heads, tokens, dim)."""
    diff = (keys.float() - reference.float()).norm(dim=-1)
    norm = reference.float().norm(dim=-1).clamp_min(1e-6)  # the padding token's key is zero
    return float((diff / norm).max())


def test_bf16_repositioning_error_does_not_grow_with_evictions() -> None:
    model = tiny_model("llama", layers=1, dtype=torch.bfloat16)
    s, w = 4, 500
    cache = SinkCache.from_model(model, s, w)
    prompt = random_ids(s + w, seed=13)
    sampler = Sampler(temperature=1.0, seed=0)
    ids = list(prompt)
    logits = forward_tokens(model, cache, prompt)
    errors = {}
    for step in range(1, 2001):
        token = sampler(logits)
        ids.append(token)
        logits = forward_tokens(model, cache, [token])
        if step in (50, 2000):
            # fresh keys of the kept tokens at their current positions 0..L-1, as the model
            # computes them in bfloat16 (layer-0 keys depend on the token and position only)
            _, fresh = dense_forward(model, ids[:s] + ids[-w:])
            errors[step] = _relative_error(layer0_keys(cache), fresh.layers[0].keys[0])
    assert cache.evicted_tokens == 2000
    bf16_unit = 2.0 ** -8  # unit roundoff of bfloat16
    # within a few roundings of the model's own bf16 key, and no growth from 50 to 2000 evictions
    assert errors[2000] <= 4 * bf16_unit, errors
    assert errors[2000] <= 1.5 * errors[50] + bf16_unit, errors

    # The bound is tight enough to catch drift: re-rotating the arrived bf16 keys one position per
    # eviction (what a naive cache does) ends far outside it.
    window = ids[-w:]
    arrived_at = s + w - 1  # every generated token arrived in the last slot
    _, at_arrival = dense_forward(model, window, [arrived_at] * w)
    naive = at_arrival.layers[0].keys[0].clone()  # (heads, w, dim), bf16
    inv_freq = model.model.rotary_emb.inv_freq.float()
    back = torch.cat([-inv_freq, -inv_freq])  # angle of a shift by -1, rotate_half layout
    cos, sin = back.cos().to(torch.bfloat16), back.sin().to(torch.bfloat16)
    shifts = torch.tensor([arrived_at - (s + j) for j in range(w)])  # positions each key moved
    for step in range(1, int(shifts.max()) + 1):
        moving = (shifts >= step)[None, :, None]
        half = naive.shape[-1] // 2
        rotated = naive * cos + torch.cat([-naive[..., half:], naive[..., :half]], -1) * sin
        naive = torch.where(moving, rotated, naive)
    _, fresh = dense_forward(model, ids[:s] + window)
    naive_error = _relative_error(naive, fresh.layers[0].keys[0][:, s:])
    assert naive_error > 4 * 4 * bf16_unit, naive_error


# -- refusal and limits -------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gpt_neox"])
def test_rope_families_are_accepted(family: str) -> None:
    check_streaming_support(tiny_config(family))


def test_gpt2_is_refused_with_a_hint_to_use_dense_mode() -> None:
    with pytest.raises(UnsupportedModel, match="absolute position") as info:
        SinkCache.from_model(tiny_model("gpt2", layers=1), S, W)
    assert "STREAMING_LLM_STREAMING=false" in str(info.value)


def test_dynamic_rope_is_refused() -> None:
    with pytest.raises(UnsupportedModel, match=r"dynamic.*STREAMING_LLM_STREAMING=false"):
        check_streaming_support(tiny_config("llama", rope="dynamic"))


def test_sliding_window_layers_are_refused() -> None:
    config = tiny_config("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    with pytest.raises(UnsupportedModel, match="sliding_attention"):
        check_streaming_support(config)
    mistral = tiny_model("mistral", layers=1, sliding_window=16)
    with pytest.raises(UnsupportedModel, match="sliding attention window of 16"):
        SinkCache.from_model(mistral, S, W)  # 20 > 16
    SinkCache.from_model(mistral, 4, 12)  # fits inside it


def test_capacity_beyond_trained_context_is_refused() -> None:
    model = tiny_model("llama", layers=1, max_position_embeddings=64)
    with pytest.raises(ValueError, match="trained context of 64"):
        SinkCache.from_model(model, 4, 61)
    assert SinkCache.from_model(model, 4, 60).capacity == 64


def test_forward_without_room_is_an_error_not_a_silent_overflow() -> None:
    model = tiny_model("llama", layers=1)
    cache = SinkCache.from_model(model, S, W)
    forward_tokens(model, cache, random_ids(S + W))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="make_room"):
        model(input_ids=torch.tensor([[5]]), past_key_values=cache,
              position_ids=torch.tensor([[S + W]]), use_cache=True)


def test_rollback_forgets_the_newest_tokens_but_never_the_sinks() -> None:
    model = tiny_model("llama", layers=2)
    cache = SinkCache.from_model(model, S, W)
    ids = random_ids(40, seed=17)
    forward_tokens(model, cache, ids[:30])
    expected = forward_tokens(model, cache, ids[30:33])
    cache.rollback(3)
    assert (cache.seen_tokens, cache.get_seq_length()) == (30, S + W - 3)
    torch.testing.assert_close(forward_tokens(model, cache, ids[30:33]), expected,
                               rtol=1e-5, atol=1e-5)
    assert cache.can_rollback(W) and not cache.can_rollback(W + 1)  # the sinks stay
    with pytest.raises(ValueError, match="cannot roll back"):
        cache.rollback(W + 1)


def test_crop_has_transformers_meaning() -> None:
    model = tiny_model("llama", layers=1)
    cache = SinkCache.from_model(model, 4, 16)
    forward_tokens(model, cache, random_ids(10))
    cache.crop(-3)  # negative: drop the newest 3
    assert cache.get_seq_length() == 7 and cache.seen_tokens == 7
    cache.crop(9)  # longer than stored: nothing happens
    assert cache.get_seq_length() == 7
    cache.crop(5)  # keep the first 5
    assert cache.get_seq_length() == 5
    forward_tokens(model, cache, random_ids(30))  # evicts
    assert cache.evicted_tokens
    with pytest.raises(ValueError, match="roll back"):
        cache.crop(2)  # would drop sinks after an eviction
