"""The engine on CUDA, in bfloat16 (what the server runs there by default): batched greedy
answers equal lone ones, the compiled step (CUDA graphs) gives the eager step's tokens, and the
sink cache evicts on CUDA as on the CPU. Skipped where torch sees no CUDA device (tests/conftest.py);
scripts/gpu-check.sh runs them on a GPU machine."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from streaming_llm.engines.decoding import forward_tokens
from streaming_llm.engines.scheduler import Scheduler
from streaming_llm.engines.sink_cache import SinkCache
from streaming_llm.engines.step import LlamaStep

from .test_scheduler import ANSWERS, CHUNK, Recorder, one_at_a_time, prompts, request, wait
from .test_step import batch_of
from .tiny_models import random_ids, tiny_model

pytestmark = pytest.mark.cuda


def cuda_model(dtype: torch.dtype = torch.bfloat16) -> Any:
    return tiny_model("llama", layers=2).to("cuda", dtype)


def test_batched_greedy_answers_equal_lone_ones_on_cuda() -> None:
    """As on the CPU (test_scheduler): a row's arithmetic does not depend on the rows beside it.
    On CUDA that also needs each product's kernel to give a row the same sums at every batch
    size; a failure here means it does not, and batched answers drift from lone ones."""
    model = cuda_model()
    step = LlamaStep(model)

    def new_scheduler(**kwargs: Any) -> Scheduler:
        return Scheduler(model, step=step, **kwargs)

    alone = one_at_a_time(new_scheduler, model, prompts(), ANSWERS)
    scheduler = new_scheduler(max_batch=8, prefill_chunk=CHUNK)
    handlers = [Recorder(model, p) for p in prompts()]
    try:
        for h, n in zip(handlers, ANSWERS, strict=True):
            scheduler.submit(request(h, n))
        wait(handlers)
    finally:
        scheduler.close()
    assert [h.error for h in handlers] == [None] * len(handlers)
    assert max(h.outcome.batch_size for h in handlers if h.outcome) >= 5  # they ran together
    assert [h.tokens for h in handlers] == alone
    assert len({t for h in handlers for t in h.tokens}) > 10  # not one token over and over


@pytest.mark.slow  # torch.compile
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile
def test_the_compiled_step_gives_the_eager_steps_tokens_on_cuda(
        caplog: pytest.LogCaptureFixture) -> None:
    """``compile=True`` on CUDA is inductor with CUDA graphs ("reduce-overhead"). Both steps are
    fed the eager step's greedy tokens, so one rounding difference cannot send them apart; the
    compiled step's attention is written out as products (eager: SDPA), so in bfloat16 the
    logits differ by rounding, and the tokens must agree wherever eager's top two are apart."""
    model = cuda_model()
    eager_step, compiled_step = LlamaStep(model), LlamaStep(model, compile=True)
    eager_batch, compiled_batch = batch_of(model, [9, 3]), batch_of(model, [9, 3])
    tokens = [5, 6]
    with torch.inference_mode(), caplog.at_level(logging.INFO, "streaming_llm.engines.step"):
        # CUDA graphs record after warm-up calls: replays are checked too, and the longer row
        # (9 tokens, 20 slots) evicts after 11 steps.
        for _ in range(16):
            for batch in (eager_batch, compiled_batch):
                for b in range(batch.active):
                    if batch.full(b):
                        batch.make_room(b, 2)
            eager = eager_step(eager_batch, tokens)
            compiled = compiled_step(compiled_batch, tokens)
            # bfloat16 keeps 8 bits: two orders of the same sums differ by a few of its steps
            # at each of the model's roundings (2 layers), here up to 4 % of the largest logit.
            scale = float(eager.abs().max())
            assert float((compiled - eager).abs().max()) < 0.08 * scale
            top2 = eager.topk(2, dim=-1).values
            clear = (top2[:, 0] - top2[:, 1]) > 0.16 * scale
            assert torch.equal(compiled.argmax(-1)[clear], eager.argmax(-1)[clear])
            tokens = [int(t) for t in eager.argmax(-1)]
    assert compiled_step.name == "llama-compiled", caplog.text  # no fallback to eager
    assert compiled_step.compile_seconds > 0
    assert "decode step: compiled batch 2" in caplog.text


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-3), (torch.bfloat16, 0.05)])
def test_the_sink_cache_evicts_on_cuda_as_on_the_cpu(dtype: torch.dtype,
                                                     tolerance: float) -> None:
    """The same tokens streamed through a small sink cache (evicting many times, chunks of many
    sizes) give the same cache and logits on CUDA as on the CPU, within ``dtype``'s rounding."""
    sinks, window = 4, 16
    ids = random_ids(70, seed=5)
    out = {}
    for device in ("cpu", "cuda"):
        model = tiny_model("llama", layers=2).to(device, dtype)
        cache = SinkCache.from_model(model, sinks, window)
        with torch.inference_mode():
            forward_tokens(model, cache, ids[:30], chunk_size=7)
            for t in ids[30:]:
                logits = forward_tokens(model, cache, [t])
        assert cache.evicted_tokens == len(ids) - sinks - window
        keys = cache.layers[0].keys
        assert keys.device.type == device
        assert keys.shape[2] == sinks + window  # (batch, kv_heads, tokens, head_dim)
        out[device] = (logits.float().cpu(), keys.float().cpu())
    (cpu_logits, cpu_keys), (cuda_logits, cuda_keys) = out["cpu"], out["cuda"]
    scale = float(cpu_logits.abs().max())
    torch.testing.assert_close(cuda_logits, cpu_logits, rtol=tolerance, atol=tolerance * scale)
    torch.testing.assert_close(cuda_keys, cpu_keys, rtol=tolerance,
                               atol=tolerance * float(cpu_keys.abs().max()))
    if dtype == torch.float32:
        assert cuda_logits.argmax() == cpu_logits.argmax()
