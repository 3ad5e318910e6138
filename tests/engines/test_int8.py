"""Int8 linear layers: close to float32, and the batched step runs on them."""

from __future__ import annotations

import copy

import pytest
import torch

from streaming_llm.engines.batch_cache import BatchSinkCache
from streaming_llm.engines.decoding import forward_tokens
from streaming_llm.engines.int8 import quantize_int8
from streaming_llm.engines.sink_cache import SinkCache

from .tiny_models import random_ids, tiny_model, torch_threads


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def test_int8_layers_replace_every_linear_and_stay_close_to_float32() -> None:
    model = tiny_model("llama", layers=2, initializer_range=0.02)
    quantized = quantize_int8(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.modules())
    prompt = random_ids(20)
    exact = forward_tokens(model, SinkCache.from_model(model, 4, 32), prompt)
    approx = forward_tokens(quantized, SinkCache.from_model(quantized, 4, 32), prompt)
    assert exact is not None and approx is not None
    assert (approx - exact).abs().max() <= 0.05 * exact.abs().max()
    assert not torch.equal(approx, exact)  # it really is another model


def test_the_batched_step_runs_on_int8_layers() -> None:
    model = quantize_int8(tiny_model("llama", layers=2))
    caches = []
    for n in (3, 9):
        cache = SinkCache.from_model(model, 4, 32)
        forward_tokens(model, cache, random_ids(n, seed=n))
        caches.append(cache)
    batch = BatchSinkCache(2)
    for cache in caches:
        batch.join(cache)
    with torch.inference_mode():
        out = model(**batch.step_inputs([5, 6], torch.float32), past_key_values=batch,
                    use_cache=True, logits_to_keep=1)
    assert out.logits.shape[:2] == (2, 1) and torch.isfinite(out.logits).all()
