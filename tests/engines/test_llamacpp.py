"""The llama.cpp runtime (``STREAMING_LLM_RUNTIME=llama.cpp``) on a tiny random GGUF Llama: the
local engine's semantics hold with llama.cpp's caches and runner. Batched answers equal answers
alone; a cache parked out of its sequence and restored answers as if it had stayed; eviction keeps
the sinks and the newest window; a conversation written to disk (evicted from memory, or across a
graceful restart) answers exactly as if it had stayed, and a bad file is refused and rebuilt."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from streaming_llm.engines.base import ChatMessage
from streaming_llm.engines.llamacpp.cache import SeqCache
from streaming_llm.engines.local import LocalEngine
from streaming_llm.engines.local.loading import choose_runtime
from streaming_llm.settings import Settings

from .gguf_files import write_tiny_gguf
from .test_disk import ask
from .test_local import SYSTEM
from .test_local import chat as _chat

Make = Callable[..., Awaitable[LocalEngine]]
GEOMETRY = {"sink_tokens": 4, "window_tokens": 48}  # small: the conversations below evict
# Sampled, not greedy, with a seed: a random tiny model's greedy answers repeat one token, which
# would hide a difference in the logits; sampling at temperature 1 shows it.
SAMPLED = {"temperature": 1.0, "top_p": 1.0, "min_p": 0.0, "seed": 11}


async def chat(engine: LocalEngine, messages: list[ChatMessage], *, cid: str,
               max_new_tokens: int = 12) -> tuple[list[str], Any]:
    return await _chat(engine, messages, cid=cid, max_new_tokens=max_new_tokens, **SAMPLED)


async def talk(engine: LocalEngine, cid: str, turns: int) -> list[ChatMessage]:
    """``turns`` sampled turns in conversation ``cid``; returns the history with the answers."""
    messages = [SYSTEM]
    for i in range(turns):
        messages.append(ChatMessage("user", f"message number {i} in {cid}, tell me more"))
        pieces, _ = await chat(engine, messages, cid=cid, max_new_tokens=10)
        messages.append(ChatMessage("assistant", "".join(pieces)))
    return messages


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path, _ = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return path


@pytest.fixture
async def make(tmp_path: Path, gguf: Path) -> AsyncIterator[Make]:
    """``await make(name, **settings)``: a llama.cpp engine on data dir ``tmp_path/name``."""
    engines: list[LocalEngine] = []

    async def build(name: str, **overrides: Any) -> LocalEngine:
        settings = Settings(data_dir=tmp_path / name, model=str(gguf), instance_id="test",
                            **{"runtime": "llama.cpp", "compile": False, **GEOMETRY,
                               **overrides})
        engine = LocalEngine(settings)
        engines.append(engine)
        await engine.start()
        assert engine.runtime == "llama.cpp"
        return engine

    yield build
    for engine in engines:
        await engine.close()


# --- choosing the runtime -------------------------------------------------------------------------
@pytest.mark.parametrize(("settings", "runtime"), [
    ({}, "llama.cpp"),  # the default model is a GGUF file
    ({"model": "/models/x.gguf"}, "llama.cpp"),
    ({"model": "demo"}, "torch"),
    ({"model": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "torch"),
    ({"streaming": False}, "torch"),
    ({"device": "cuda"}, "torch"),
    ({"runtime": "torch"}, "torch"),
    ({"runtime": "llama.cpp", "model": "demo"}, "llama.cpp"),  # asked for: load says why not
])
def test_auto_takes_llama_cpp_for_a_gguf_model_on_cpu(settings: dict[str, Any],
                                                       runtime: str) -> None:
    chosen, why = choose_runtime(Settings(**settings))
    assert chosen == runtime and why


async def test_the_engine_reports_its_runtime(make: Make) -> None:
    engine = await make("a")
    extra = (await engine.health()).extra
    assert extra is not None
    assert extra["runtime"] == "llama.cpp" and extra["decode_step"] == "llama.cpp"
    assert extra["compile"] == {"state": "off"}


async def test_llama_cpp_refuses_a_model_that_is_not_gguf(tmp_path: Path) -> None:
    engine = LocalEngine(Settings(data_dir=tmp_path, model="demo", runtime="llama.cpp"))
    with pytest.raises(Exception, match="GGUF"):
        await engine.start()
    await engine.close()


# --- the batch ----------------------------------------------------------------------------------
def conversation(i: int) -> list[ChatMessage]:
    return [SYSTEM, ChatMessage("user", f"conversation {i}: say something about {i * 7}")]


async def test_answers_in_a_batch_equal_answers_alone(make: Make) -> None:
    alone = await make("alone", max_batch=1)
    together = await make("together", max_batch=4)
    expected = [await chat(alone, conversation(i), cid=f"c{i}", max_new_tokens=24)
                for i in range(4)]
    got = await asyncio.gather(*(chat(together, conversation(i), cid=f"c{i}", max_new_tokens=24)
                                 for i in range(4)))
    assert [pieces for pieces, _ in got] == [pieces for pieces, _ in expected]
    assert max(done.usage.batch_size for _, done in got) > 1  # they did decode together
    assert all(done.usage.batch_size == 1 for _, done in expected)


async def test_a_parked_cache_answers_as_if_it_had_stayed(make: Make) -> None:
    """max_batch=1: three sequences for five conversations, so caches move out and back."""
    answers: dict[int, list[Any]] = {}
    for rows in (8, 1):
        engine = await make(f"rows{rows}", max_batch=rows)
        histories = [await talk(engine, f"c{i}", 2) for i in range(5)]
        answers[rows] = histories + [(await chat(engine, ask(h), cid=f"c{i}"))[0]
                                     for i, h in enumerate(histories)]
    assert answers[1] == answers[8]
    assert len({"".join(a) for a in answers[1][5:]}) > 1  # the answers say different things
    pool = engine._loaded.model.pool  # type: ignore[union-attr]
    assert pool.parks > 0 and pool.restores > 0


async def test_a_long_conversation_evicts_and_keeps_its_sinks(make: Make) -> None:
    engine = await make("long")
    history = await talk(engine, "long", 8)
    pieces, done = await chat(engine, ask(history), cid="long", max_new_tokens=8)
    assert pieces and done.usage.evicted_tokens and done.usage.evicted_tokens > 0
    assert done.usage.cache_source == "memory"
    assert engine.caches is not None
    await engine.idle()
    state = engine.caches.conversations["long"]
    cache = state.cache
    assert isinstance(cache, SeqCache)
    assert cache.length <= cache.capacity == cache.sink_tokens + cache.window_tokens
    assert cache.seen_tokens == len(state.ids) == cache.length + cache.evicted_tokens
    seq = cache.seq(set())
    assert cache.model.seq_positions(seq) == cache.length  # positions stayed contiguous


def test_a_cache_evicts_only_window_tokens_and_rolls_back_to_the_sinks(gguf: Path) -> None:
    from streaming_llm.engines.llamacpp.model import LlamaCppModel

    model = LlamaCppModel(gguf)
    try:
        model.open(seqs=3, seq_capacity=64, batch=64, threads=1)
        cache = SeqCache(model, 4, 16)
        seq = cache.seq(set())
        model.decode([(5 + i, i, seq, False) for i in range(20)])
        cache.fed(20)
        assert cache.make_room(6) == 6 and cache.evicted_tokens == 6
        assert model.seq_positions(seq) == cache.length == 14
        with pytest.raises(ValueError, match="roll back"):
            cache.rollback(11)  # into the sinks, after an eviction
        cache.rollback(10)
        assert model.seq_positions(seq) == cache.length == 4
        copy = cache.clone()
        assert copy.parked is not None and copy.slot.seq is None
        assert copy.length == 4 and copy.evicted_tokens == 6
        with pytest.raises(ValueError, match="window"):
            cache.make_room(17)
    finally:
        model.close()


# --- the disk tier ------------------------------------------------------------------------------
async def evicted(engine: LocalEngine, cid: str) -> Path:
    await talk(engine, f"other-{cid}", 1)
    await engine.idle()
    assert engine.caches is not None and engine.caches.disk is not None
    engine.caches.disk.flush()
    path = engine.settings.kv_path / f"{cid}.kv"
    assert path.is_file()
    return path


async def test_a_conversation_evicted_to_disk_answers_exactly_as_if_it_had_stayed(
        make: Make) -> None:
    stayed = await make("stayed", cached_conversations=8)
    left = await make("left", cached_conversations=1)
    history = await talk(stayed, "twin", 6)
    assert await talk(left, "twin", 6) == history
    await evicted(left, "twin")
    warm, warm_done = await chat(stayed, ask(history), cid="twin",
                                 max_new_tokens=16)
    cold, cold_done = await chat(left, ask(history), cid="twin", max_new_tokens=16)
    assert warm_done.usage.cache_source == "memory" and cold_done.usage.cache_source == "disk"
    assert warm_done.usage.evicted_tokens == cold_done.usage.evicted_tokens
    assert cold_done.usage.evicted_tokens and cold_done.usage.evicted_tokens > 0
    assert cold == warm


async def test_a_graceful_restart_keeps_every_conversation(make: Make) -> None:
    stayed = await make("stayed")
    engine = await make("d")
    histories = [await talk(engine, f"c{i}", 3) for i in range(3)]
    await engine.close()
    again = await make("d")
    for i, history in enumerate(histories):
        assert await talk(stayed, f"c{i}", 3) == history
        warm = await chat(stayed, ask(history), cid=f"c{i}", max_new_tokens=10)
        cold = await chat(again, ask(history), cid=f"c{i}", max_new_tokens=10)
        assert cold[1].usage.cache_source == "disk"
        assert cold[0] == warm[0]
    assert (await again.health()).extra["kv_disk_loads"] == 3  # type: ignore[index]


def _rewrite(path: Path, change: Callable[[dict[str, Any], bytearray], None]) -> None:
    """Change a safetensors file's header (JSON) and body in place."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    body = bytearray(raw[8 + n:])
    change(header, body)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(body))


def bad_state_hash(path: Path) -> None:
    def change(header: dict[str, Any], body: bytearray) -> None:
        start, _ = header["state"]["data_offsets"]
        body[start + 100] ^= 0xFF

    _rewrite(path, change)


def state_llama_cpp_refuses(path: Path) -> None:
    """A state whose hash matches but whose bytes llama.cpp does not read (a crafted file)."""
    def change(header: dict[str, Any], body: bytearray) -> None:
        start, end = header["state"]["data_offsets"]
        body[start:start + 4] = b"\xde\xad\xbe\xef"
        header["__metadata__"]["state_sha256"] = hashlib.sha256(body[start:end]).hexdigest()

    _rewrite(path, change)


def counts_that_do_not_add_up(path: Path) -> None:
    def change(header: dict[str, Any], body: bytearray) -> None:
        header["__metadata__"]["evicted"] = "0"

    _rewrite(path, change)


def other_runtime(path: Path) -> None:
    def change(header: dict[str, Any], body: bytearray) -> None:
        header["__metadata__"]["model"] = "0" * 64

    _rewrite(path, change)


@pytest.mark.parametrize("damage", [bad_state_hash, state_llama_cpp_refuses,
                                    counts_that_do_not_add_up, other_runtime])
async def test_a_bad_file_is_refused_removed_and_the_turn_rebuilds(
        make: Make, damage: Callable[[Path], None], caplog: pytest.LogCaptureFixture) -> None:
    engine = await make("d")
    history = await talk(engine, "c", 4)
    await engine.close()
    path = engine.settings.kv_path / "c.kv"
    damage(path)
    again = await make("d")
    with caplog.at_level(logging.WARNING):
        pieces, done = await chat(again, ask(history), cid="c", max_new_tokens=6)
    assert pieces and done.usage.cache_source == "rebuilt"
    assert not path.exists()
    assert len([r for r in caplog.records if "is not used" in r.getMessage()]) == 1
    assert (await again.health()).extra["kv_disk_refused_files"] == 1  # type: ignore[index]



@pytest.mark.parametrize(("content", "message"), [
    (b"not a model at all", "is not a GGUF file"),
    (b"GGUF\x03\x00\x00\x00" + b"\x00" * 64, "cannot read this GGUF file"),
])
async def test_a_bad_model_file_stops_start_up_naming_it(tmp_path: Path, content: bytes,
                                                         message: str) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    engine = LocalEngine(Settings(data_dir=tmp_path / "d", model=str(path), runtime="llama.cpp"))
    with pytest.raises(Exception, match=message) as caught:
        await engine.start()
    assert str(path) in str(caught.value)
    health = await engine.health()
    assert not health.ready and health.extra == {"state": "failed"}
    await engine.close()


@pytest.mark.parametrize(("settings", "message"), [
    ({"streaming": False}, "STREAMING_LLM_STREAMING=true"),
    ({"device": "cuda"}, "runs on the CPU"),
])
async def test_what_llama_cpp_cannot_serve_stops_start_up_saying_so(
        tmp_path: Path, gguf: Path, settings: dict[str, Any], message: str) -> None:
    engine = LocalEngine(Settings(data_dir=tmp_path, model=str(gguf), runtime="llama.cpp",
                                  **settings))
    with pytest.raises(Exception, match=message):
        await engine.start()
    await engine.close()


async def test_the_tokenizer_is_read_from_the_file_once(tmp_path: Path, gguf: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "streaming_llm.engines.local")
    models = tmp_path / "models"
    answers = []
    for name in ("first", "second"):
        caplog.clear()
        engine = LocalEngine(Settings(data_dir=tmp_path / name, model=str(gguf), models_dir=models,
                                      runtime="llama.cpp", **GEOMETRY))
        await engine.start()
        answers.append((await chat(engine, conversation(1), cid="c"))[0])
        await engine.close()
        reads = "reading the tokenizer of tiny.gguf" in caplog.text
        assert reads == (name == "first")
    (kept,) = models.iterdir()
    assert kept.name.startswith("tiny-") and kept.name.endswith("-tokenizer")
    assert answers[0] == answers[1]
