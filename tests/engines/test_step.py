"""The decode steps: the written-out Llama step gives the model's own logits row for row
(rows of different lengths, rows evicting), shares the model's weights, compiles to the same
greedy tokens, and int8 stays close; other architectures get the model's forward."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from streaming_llm.engines.batch_cache import BatchSinkCache
from streaming_llm.engines.decoding import forward_tokens
from streaming_llm.engines.sink_cache import SinkCache
from streaming_llm.engines.step import LlamaStep, ModelStep, build_step, llama_step_support

from .tiny_models import random_ids, tiny_model, torch_threads

S, W = 4, 16
LENGTHS = [1, 5, 19, 12, 9]  # 19 > S + W: that row has evicted before it joins


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def batch_of(model: Any, lengths: list[int], window: int = W) -> BatchSinkCache:
    batch = BatchSinkCache(8)
    for n in lengths:
        cache = SinkCache.from_model(model, S, window)
        forward_tokens(model, cache, random_ids(n, seed=n))
        batch.join(cache)
    return batch


def run_steps(step: Any, batch: BatchSinkCache, steps: int,
              first: list[int] | None = None) -> list[torch.Tensor]:
    """Greedy steps over every row (evicting 2 at a time when full); the logits of each step.
    Row b is first fed ``first[b]`` (default 5 + b)."""
    tokens = first or [5 + b for b in range(batch.active)]
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            for b in range(batch.active):
                if batch.full(b):
                    batch.make_room(b, 2)
            logits = step(batch, tokens)
            out.append(logits)
            tokens = [int(t) for t in logits.argmax(-1)]
    return out


@pytest.mark.parametrize(("family", "rope"), [("llama", "default"), ("llama", "llama3"),
                                              ("llama", "yarn"), ("mistral", "default"),
                                              ("qwen2", "default")])
def test_the_llama_step_gives_the_models_logits_row_for_row(family: str, rope: str) -> None:
    model = tiny_model(family, layers=2, rope=rope)
    assert llama_step_support(model) is None
    expected = run_steps(ModelStep(model), batch_of(model, LENGTHS), 8)
    mine = run_steps(LlamaStep(model), batch_of(model, LENGTHS), 8)
    for theirs, ours in zip(expected, mine, strict=True):
        assert ours.shape == (len(LENGTHS), model.config.vocab_size)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_in_bfloat16_the_step_stays_with_the_model() -> None:
    model = tiny_model("llama", layers=2, dtype=torch.bfloat16)
    expected = run_steps(ModelStep(model), batch_of(model, LENGTHS[:3]), 1)
    mine = run_steps(LlamaStep(model), batch_of(model, LENGTHS[:3]), 1)
    assert mine[0].dtype == torch.float32
    torch.testing.assert_close(mine[0], expected[0], rtol=0.05, atol=0.15)


def test_the_fused_weights_are_the_models_own_weights() -> None:
    model = tiny_model("qwen2", layers=1)  # q/k/v with biases
    before = [p.detach().clone() for p in model.parameters()]
    params = sum(p.numel() for p in model.parameters())
    step = LlamaStep(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    base = step.layers[0][0].weight.untyped_storage().data_ptr()  # type: ignore[attr-defined]
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.weight.untyped_storage().data_ptr() == base  # a view, not a copy
    assert mlp.gate_proj.weight.untyped_storage().data_ptr() == \
        mlp.up_proj.weight.untyped_storage().data_ptr()
    assert sum(p.numel() for p in model.parameters()) == params
    for old, new in zip(before, model.parameters(), strict=True):
        assert torch.equal(old, new)


def test_other_architectures_get_the_models_forward(caplog: pytest.LogCaptureFixture) -> None:
    for family in ("qwen3", "gpt_neox"):
        model = tiny_model(family, layers=1)
        with caplog.at_level(logging.INFO, logger="streaming_llm.engines.step"):
            step = build_step(model)
        assert isinstance(step, ModelStep)
        assert family in caplog.text
        with pytest.raises(ValueError, match="quantize=int8 needs the Llama-family step"):
            build_step(model, quantize="int8")
    assert isinstance(build_step(tiny_model("llama", layers=1)), LlamaStep)
    with pytest.raises(ValueError, match="quantize"):
        build_step(tiny_model("llama", layers=1), quantize="int4")


@pytest.mark.parametrize(("kind", "tolerance"), [("fp16", 0.002), ("int8", 0.05)])
def test_lighter_weights_stay_close_and_leave_the_model_alone(kind: str, tolerance: float) -> None:
    model = tiny_model("llama", layers=2, initializer_range=0.05)
    fp32 = run_steps(LlamaStep(model), batch_of(model, LENGTHS), 1)[0]
    step = LlamaStep(model, quantize=kind)
    assert step.name == f"llama-{kind}"
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)  # prefill: fp32
    light = run_steps(step, batch_of(model, LENGTHS), 1)[0]
    spread = float(fp32.max() - fp32.min())
    error = float((fp32 - light).abs().max())
    assert 0 < error < tolerance * spread  # another product, not another model


@pytest.mark.parametrize("kind", ["none", "fp16", "int8"])
def test_a_rows_logits_do_not_depend_on_the_rows_beside_it(kind: str) -> None:
    """Batched == alone, row by row: int8 quantizes every input row on its own."""
    model = tiny_model("llama", layers=2)
    step = LlamaStep(model, quantize=kind)
    together = run_steps(step, batch_of(model, LENGTHS), 6)
    for b, n in enumerate(LENGTHS):
        alone = run_steps(step, batch_of(model, [n]), 6, first=[5 + b])
        for mine, theirs in zip(alone, together, strict=True):
            assert int(mine[0].argmax()) == int(theirs[b].argmax())
            if kind == "int8":  # integer accumulation: exactly the same
                assert torch.equal(mine[0], theirs[b])
            else:
                torch.testing.assert_close(mine[0], theirs[b], rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # torch.compile: about 20 s per kind
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile
@pytest.mark.parametrize("kind", ["none", "fp16", "int8"])
def test_the_compiled_step_gives_the_eager_greedy_tokens(kind: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_model("llama", layers=1)
    eager = run_steps(LlamaStep(model, quantize=kind), batch_of(model, [9, 3]), 10)
    compiled_step = LlamaStep(model, quantize=kind, compile=True)
    with caplog.at_level(logging.INFO, logger="streaming_llm.engines.step"):
        compiled = run_steps(compiled_step, batch_of(model, [9, 3]), 10)
    assert compiled_step.name == ("llama-compiled" if kind == "none"
                                  else f"llama-{kind}-compiled")
    assert "torch.compile failed" not in caplog.text  # the fbgemm products ran compiled too
    assert compiled_step.compile_seconds > 0
    assert "decode step: compiled batch 2" in caplog.text
    assert [x.argmax(-1).tolist() for x in compiled] == [x.argmax(-1).tolist() for x in eager]
    # Compiled attention is written out as products (eager: SDPA), so floats differ by rounding;
    # int8 rounds every input row to 255 levels, where a rounding difference can move a level.
    tolerance = 0.2 if kind == "int8" else 1e-4
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


def test_a_step_torch_compile_cannot_take_runs_eager_after_one_line(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def fails(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("inductor: no C++ compiler on this machine")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fails)
    model = tiny_model("llama", layers=1)
    step = LlamaStep(model, compile=True)
    with caplog.at_level(logging.WARNING, logger="streaming_llm.engines.step"):
        logits = run_steps(step, batch_of(model, [4]), 3)
    eager = run_steps(LlamaStep(model), batch_of(model, [4]), 3)
    assert [x.argmax(-1).tolist() for x in logits] == [x.argmax(-1).tolist() for x in eager]
    assert step.name == "llama"
    failures = [r for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(failures) == 1 and "no C++ compiler" in failures[0].getMessage()
