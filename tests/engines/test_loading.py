"""Model loading: GGUF files converted once and cached by content, the bundled default model,
clear errors for files that cannot be served, and conversion progress in the health report."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from streaming_llm.engines.base import ChatMessage, EngineRequest, Finished, GenerationOptions
from streaming_llm.engines.local import LocalEngine, loading
from streaming_llm.errors import EngineUnavailable, ModelNotFound
from streaming_llm.settings import Settings

from .gguf_files import write_tiny_gguf
from .streams import drain

MESSAGES = [ChatMessage("system", "Be brief."), ChatMessage("user", "hello 日本 🎉")]


def request(messages: list[ChatMessage], max_new_tokens: int = 12) -> EngineRequest:
    return EngineRequest(request_id="r", conversation_id="c", messages=messages,
                         options=GenerationOptions(temperature=0), max_new_tokens=max_new_tokens)


@pytest.fixture
async def engines() -> AsyncIterator[list[LocalEngine]]:
    made: list[LocalEngine] = []
    yield made
    for engine in made:
        await engine.close()


async def started(engines: list[LocalEngine], **settings: object) -> LocalEngine:
    # The torch runtime: converting a GGUF file is its way of reading one (llama.cpp reads the
    # file as it is: tests/engines/test_llamacpp.py).
    engine = LocalEngine(Settings(**{"compile": False, "runtime": "torch",  # type: ignore[arg-type]
                                     **settings}))
    engines.append(engine)
    await engine.start()
    return engine


async def answer(engine: LocalEngine, messages: list[ChatMessage], n: int = 12) -> str:
    pieces, finished = await drain(engine.stream(request(messages, n)))
    assert isinstance(finished, Finished)
    return "".join(pieces)


async def test_gguf_is_converted_once_and_serves_what_the_original_serves(
        tmp_path: Path, engines: list[LocalEngine], caplog: pytest.LogCaptureFixture) -> None:
    gguf, original = write_tiny_gguf(tmp_path / "tiny.gguf")
    models = tmp_path / "models"
    caplog.set_level(logging.INFO, "streaming_llm.engines.local")
    first = await started(engines, data_dir=tmp_path / "d1", model=str(gguf), models_dir=models)
    (converted,) = models.iterdir()
    assert converted.name.startswith("tiny-") and (converted / "model.safetensors").is_file()
    assert (await first.health()).model == "tiny"
    reference = await started(engines, data_dir=tmp_path / "d0", model=str(original))
    assert await answer(first, MESSAGES) == await answer(reference, MESSAGES)
    assert "converting tiny.gguf" in caplog.text

    caplog.clear()
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    second = await started(engines, data_dir=tmp_path / "d2", model=str(gguf), models_dir=models)
    assert "converted before" in caplog.text and "converting" not in caplog.text
    assert list(models.iterdir()) == [converted]
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp
    assert await answer(second, MESSAGES) == await answer(reference, MESSAGES)


async def test_another_file_content_is_converted_apart(tmp_path: Path) -> None:
    a, _ = write_tiny_gguf(tmp_path / "a" / "m.gguf", seed=0)
    b, _ = write_tiny_gguf(tmp_path / "b" / "m.gguf", seed=1)
    models = tmp_path / "models"
    first = loading.converted_gguf(a, models, lambda _: None)
    assert loading.converted_gguf(b, models, lambda _: None) != first
    assert len(list(models.iterdir())) == 2


async def test_health_shows_conversion_progress(tmp_path: Path,
                                                engines: list[LocalEngine],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    gguf, _ = write_tiny_gguf(tmp_path / "tiny.gguf")
    release = threading.Event()
    digest = loading.file_digest

    def slow_digest(path: Path) -> str:
        release.wait(30)
        return digest(path)

    monkeypatch.setattr(loading, "file_digest", slow_digest)
    engine = LocalEngine(Settings(data_dir=tmp_path / "d", model=str(gguf), compile=False,
                                  runtime="torch"))
    engines.append(engine)
    start = asyncio.create_task(engine.start())
    for _ in range(600):
        health = await engine.health()
        if "hashing" in (health.detail or ""):
            break
        await asyncio.sleep(0.05)
    assert not health.ready and health.detail == "loading tiny; hashing tiny.gguf"
    release.set()
    await start
    assert (await engine.health()).ready


@pytest.mark.parametrize(("content", "message"), [
    (b"not a model at all", "is not a GGUF file"),
    (b"GGUF\x03\x00\x00\x00" + b"\x00" * 64, "cannot read this GGUF file"),
])
async def test_a_bad_gguf_file_is_a_clear_start_up_error(tmp_path: Path, content: bytes,
                                                         message: str) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    engine = LocalEngine(Settings(data_dir=tmp_path / "d", model=str(path), compile=False))
    with pytest.raises(EngineUnavailable) as info:
        await engine.start()
    assert str(path) in info.value.message and message in info.value.message
    health = await engine.health()
    assert not health.ready and str(path) in (health.detail or "")
    assert not (tmp_path / "d" / "models").exists() or not any((tmp_path / "d" / "models").iterdir())
    await engine.close()


async def test_a_missing_gguf_file_is_model_not_found(tmp_path: Path) -> None:
    path = tmp_path / "absent.gguf"
    engine = LocalEngine(Settings(data_dir=tmp_path / "d", model=str(path), compile=False))
    with pytest.raises(ModelNotFound, match=r"absent\.gguf"):
        await engine.start()
    await engine.close()


def test_default_model_file_comes_from_the_wheel() -> None:
    path = loading.default_model_file()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert path.read_bytes()[:4] == b"GGUF"


@pytest.mark.slow
async def test_default_model_answers_the_capital_of_france(tmp_path: Path,
                                                           default_models_dir: Path,
                                                           engines: list[LocalEngine]) -> None:
    engine = await started(engines, data_dir=tmp_path / "d", models_dir=default_models_dir,
                           cached_conversations=0)
    health = await engine.health()
    assert health.model == "SmolLM2-135M-Instruct.Q4_1" and health.detail is None
    text = await answer(engine, [ChatMessage("user", "What is the capital of France?")], 20)
    assert "Paris" in text
