"""The compiled step built ahead of use: a child process compiles, the serving step takes the
graphs in while idle, a restart loads them, and nothing waits on a compile meanwhile."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from streaming_llm.engines.base import ChatMessage, EngineRequest, GenerationOptions
from streaming_llm.engines.batch_cache import SLOT_BLOCK, BatchSinkCache
from streaming_llm.engines.precompile import Precompiler, wanted_shapes
from streaming_llm.engines.sink_cache import SinkCache
from streaming_llm.engines.step import LlamaStep

from .conftest import MakeEngine
from .streams import drain
from .tiny_models import random_ids, tiny_model

# torch.compile warns about its own deprecated internals
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def test_the_wanted_shapes_are_every_bucket_at_one_buffer_size() -> None:
    assert wanted_shapes(8, 2004) == [(1, 2048), (2, 2048), (4, 2048), (8, 2048)]
    assert wanted_shapes(3, SLOT_BLOCK + 1) == [(1, 2 * SLOT_BLOCK), (2, 2 * SLOT_BLOCK),
                                                (3, 2 * SLOT_BLOCK)]


def hi() -> EngineRequest:
    return EngineRequest(request_id="r", conversation_id="c", messages=[ChatMessage("user", "hi")],
                         options=GenerationOptions(temperature=0), max_new_tokens=8)


def greedy(step: LlamaStep, model: Any, n: int) -> list[int]:
    """``n`` greedy tokens of one conversation through ``step`` (batch of 2 rows, bucket 1)."""
    cache = SinkCache.from_model(model, 4, 60)
    with torch.inference_mode():
        logits = model(torch.tensor([random_ids(12)]), past_key_values=cache).logits[0, -1]
        batch = BatchSinkCache(2)
        batch.join(cache)
        out = [int(logits.argmax())]
        for _ in range(n - 1):
            out.append(int(step(batch, [out[-1]])[0].argmax()))
    return out


def test_an_ahead_step_never_compiles_in_a_call_and_runs_what_was_prepared() -> None:
    model = tiny_model("llama")
    eager = greedy(LlamaStep(model), model, 12)
    step = LlamaStep(model, compile=True, ahead=True)
    assert greedy(step, model, 12) == eager
    assert step.compile_seconds == 0 and step.missing == {(1, SLOT_BLOCK)}  # ran eager
    seconds = step.prepare(2, (1, SLOT_BLOCK))
    assert seconds is not None and seconds > 0
    assert step.compiled_shapes == {(1, SLOT_BLOCK)} and not step.missing
    assert greedy(step, model, 12) == eager  # compiled now, the same tokens
    assert step.prepare(2, (1, SLOT_BLOCK)) == 0.0  # built once


def test_a_failing_child_leaves_the_step_eager_with_one_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    step = LlamaStep(tiny_model("llama"), compile=True, ahead=True)
    spec = {"source": str(tmp_path / "no-such-model"), "dtype": "float32", "device": "cpu",
            "quantize": "none", "rows": 1, "threads": 1}
    pre = Precompiler(step, tmp_path / "compile", spec, [(1, SLOT_BLOCK)])
    with caplog.at_level(logging.WARNING):
        for _ in range(600):
            if not pre.idle():
                break
            time.sleep(0.2)
    assert pre.status()["state"] == "failed"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "compile.log" in warnings[0].getMessage()
    assert "no-such-model" in (tmp_path / "compile" / "compile.log").read_text()
    assert not pre.idle() and step.compiled_shapes == frozenset()


@pytest.mark.process
async def test_the_engine_serves_while_compiling_then_compiled_and_a_restart_only_loads(
        local_engines: MakeEngine, llama_path: Path) -> None:
    geometry = {"compile": True, "max_batch": 1, "window_tokens": 200, "sink_tokens": 4,
                "kv_disk_bytes": 0}

    async def compile_state(engine: Any) -> dict[str, Any]:
        health = await engine.health()
        return health.extra["compile"]

    first = await local_engines(llama_path, **geometry)
    for _ in range(100):  # the scheduler starts the child on its first idle tick
        if (await compile_state(first))["state"] == "compiling":
            break
        await asyncio.sleep(0.1)
    # A turn while the child compiles: answered by the eager step, not held for the compile.
    _, finished = await drain(first.stream(hi()))
    assert finished is not None and finished.usage.completion_tokens > 0
    state = await compile_state(first)
    assert state["state"] == "compiling" and state["running"] == 0, state
    for _ in range(1800):
        state = await compile_state(first)
        if state["state"] in ("ready", "failed"):
            break
        await asyncio.sleep(0.2)
    assert state["state"] == "ready" and state["running"] == state["shapes"] == 1, state
    folder = Path(state["folder"])
    assert json.loads((folder / "shapes.json").read_text()) == {"shapes": [[1, 512]]}
    health = await first.health()
    assert health.extra["decode_step"].endswith("-compiled")
    _, finished = await drain(first.stream(hi()))
    assert finished is not None and finished.usage.completion_tokens > 0
    await first.close()

    # A restart finds every shape built: it loads them, no child.
    second = await local_engines(llama_path, **geometry)
    for _ in range(600):
        state = await compile_state(second)
        if state["state"] in ("ready", "failed"):
            break
        assert state["state"] == "loading", state
        await asyncio.sleep(0.2)
    assert state["state"] == "ready" and state["running"] == 1, state
    log = (folder / "compile.log").read_text()
    assert log.count("built batch") == 1, log  # built once, by the first start's child
