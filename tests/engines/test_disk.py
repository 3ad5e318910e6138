"""The disk tier and the bounded rebuild on a tiny Llama: a conversation that left memory, or
outlived the process, answers exactly as if it had stayed; a file that fails any check is
ignored, removed and the turn rebuilds; a rebuild costs one window whatever the history."""

from __future__ import annotations

import errno
import logging
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from streaming_llm.engines.base import ChatMessage
from streaming_llm.engines.local import LocalEngine
from streaming_llm.settings import Settings

from . import model_dirs as models
from .test_local import SYSTEM, chat

Make = Callable[..., Awaitable[LocalEngine]]
# A small window, so that the conversations below evict (the restored state includes evictions).
GEOMETRY = {"sink_tokens": 4, "window_tokens": 48}


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.write_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Make]:
    """``await make(name, **settings)``: an engine on data dir ``tmp_path/name`` (one instance
    folder per name), closed after the test unless the test closed it."""
    engines: list[LocalEngine] = []

    async def build(name: str, model: Path, **overrides: Any) -> LocalEngine:
        settings = Settings(data_dir=tmp_path / name, model=str(model), instance_id="test",
                            **{"compile": False, **GEOMETRY, **overrides})
        engine = LocalEngine(settings)
        engines.append(engine)
        await engine.start()
        return engine

    yield build
    for engine in engines:
        await engine.close()


async def talk(engine: LocalEngine, cid: str, turns: int, *, system: ChatMessage = SYSTEM,
               ) -> list[ChatMessage]:
    """``turns`` greedy turns in conversation ``cid``; returns the history with the answers."""
    messages = [system]
    for i in range(turns):
        messages.append(ChatMessage("user", f"message number {i} in {cid}, tell me more"))
        pieces, _ = await chat(engine, messages, cid=cid, temperature=0, max_new_tokens=10)
        messages.append(ChatMessage("assistant", "".join(pieces)))
    return messages


def ask(messages: list[ChatMessage], question: str = "and now?") -> list[ChatMessage]:
    return [*messages, ChatMessage("user", question)]


def folder(engine: LocalEngine) -> Path:
    return engine.settings.kv_path


async def evicted(engine: LocalEngine, cid: str) -> Path:
    """Push ``cid`` out of memory (cached_conversations=1) and wait for its file."""
    await talk(engine, f"other-{cid}", 1)
    await engine.idle()
    assert engine.caches is not None and engine.caches.disk is not None
    engine.caches.disk.flush()  # the write queued before is done
    path = folder(engine) / f"{cid}.kv"
    assert path.is_file()
    return path


# --- exact restore --------------------------------------------------------------------------------
async def test_an_evicted_conversation_answers_exactly_as_if_it_had_stayed(
        make: Make, llama_path: Path) -> None:
    stayed = await make("stayed", llama_path, cached_conversations=8)
    left = await make("left", llama_path, cached_conversations=1)
    history = await talk(stayed, "twin", 6)
    assert await talk(left, "twin", 6) == history
    await evicted(left, "twin")
    warm, warm_done = await chat(stayed, ask(history), cid="twin", temperature=0,
                                 max_new_tokens=16)
    cold, cold_done = await chat(left, ask(history), cid="twin", temperature=0, max_new_tokens=16)
    assert warm_done.usage.cache_source == "memory" and cold_done.usage.cache_source == "disk"
    assert warm_done.usage.evicted_tokens == cold_done.usage.evicted_tokens > 0  # it evicted
    assert cold_done.usage.cached_tokens == warm_done.usage.cached_tokens
    assert cold == warm


async def test_a_graceful_restart_keeps_every_conversation(make: Make, llama_path: Path) -> None:
    stayed = await make("stayed", llama_path)
    first = await make("restarted", llama_path)
    history = await talk(stayed, "c", 5)
    assert await talk(first, "c", 5) == history
    await first.close()  # writes the cached conversations
    assert (folder(first) / "c.kv").is_file()
    second = await make("restarted", llama_path)
    warm, _ = await chat(stayed, ask(history), cid="c", temperature=0, max_new_tokens=16)
    cold, done = await chat(second, ask(history), cid="c", temperature=0, max_new_tokens=16)
    assert done.usage.cache_source == "disk" and cold == warm
    extra = (await second.health()).extra
    assert extra["kv_disk_loads"] == 1 and extra["cache_hits_disk"] == 1


async def test_the_agent_prefix_is_stored_once_and_shared(make: Make, llama_path: Path) -> None:
    engine = await make("d", llama_path, cached_conversations=1)
    await talk(engine, "a", 1)
    await talk(engine, "b", 1)
    await talk(engine, "c", 1)  # a and b left memory
    await engine.close()
    names = sorted(p.name for p in folder(engine).glob("*.kv"))
    assert len([n for n in names if n.startswith("prefix-")]) == 1
    assert {"a.kv", "b.kv", "c.kv"} <= set(names)


# --- the bounded rebuild --------------------------------------------------------------------------
def fed_tokens(engine: LocalEngine) -> list[int]:
    """Tokens each forward call of the model took (prefill chunks and decode steps)."""
    counts: list[int] = []

    def hook(module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        ids = kwargs.get("input_ids")
        counts.append(int(ids.numel()) if ids is not None else 0)

    engine._model.register_forward_pre_hook(hook, with_kwargs=True)
    return counts


@pytest.mark.parametrize("turns", [6, 12])
async def test_without_a_file_the_rebuild_costs_one_window_whatever_the_history(
        make: Make, llama_path: Path, turns: int) -> None:
    writer = await make("w", llama_path)
    history = await talk(writer, "long", turns)
    rebuilder = await make("r", llama_path, kv_disk_bytes=0)  # no file: another instance
    counts = fed_tokens(rebuilder)
    pieces, done = await chat(rebuilder, ask(history), cid="long", temperature=0,
                              max_new_tokens=4)
    await rebuilder.idle()  # the turn's closing ids went in too
    assert done.usage.cache_source == "rebuilt" and pieces
    window, sinks = GEOMETRY["window_tokens"], 34  # the pinned prefix is the sinks
    prompt = done.usage.prompt_tokens
    assert prompt > 2 * (sinks + window)  # the history is much longer than the cache
    # Everything the model was fed: the sinks, the last window, and the answer's closing ids
    # (at most 4 answer tokens and the template's end-of-turn); never the whole history.
    assert sum(counts) <= sinks + window + 8
    assert done.usage.evicted_tokens > 0  # the middle of the history counts as evicted
    # The next turn continues from the rebuilt cache.
    more = ask([*ask(history), ChatMessage("assistant", "".join(pieces))], "go on")
    _, again = await chat(rebuilder, more, cid="long", temperature=0, max_new_tokens=4)
    assert again.usage.cache_source == "memory"
    assert again.usage.cached_tokens >= prompt


async def test_a_short_history_rebuilds_whole_and_matches_the_kept_cache(
        make: Make, llama_path: Path) -> None:
    writer = await make("w", llama_path, window_tokens=2000)
    history = await talk(writer, "short", 1)
    rebuilder = await make("r", llama_path, window_tokens=2000, kv_disk_bytes=0)
    warm, _ = await chat(writer, ask(history), cid="short", temperature=0, max_new_tokens=12)
    cold, done = await chat(rebuilder, ask(history), cid="short", temperature=0,
                            max_new_tokens=12)
    assert done.usage.cache_source == "rebuilt" and cold == warm  # nothing evicted: the same


# --- files that are not trusted ------------------------------------------------------------------
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def bad_header(path: Path) -> None:
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")


def other_version(path: Path) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = raw[8:8 + n].replace(b'"version":"1"', b'"version":"9"')
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n:])


def other_ids(path: Path) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    import json

    header = json.loads(raw[8:8 + n])
    start, _ = header["ids"]["data_offsets"]
    body = bytearray(raw[8 + n:])
    body[start:start + 8] = struct.pack("<q", 7)  # the first id changes: the hash no longer holds
    path.write_bytes(raw[:8 + n] + bytes(body))


def no_prefix(path: Path) -> None:
    for prefix in path.parent.glob("prefix-*.kv"):
        prefix.unlink()


def symlinked(path: Path) -> None:
    target = path.with_name("elsewhere.bin")
    path.rename(target)
    path.symlink_to(target)


@pytest.mark.parametrize("damage", [truncate, bad_header, other_version, other_ids, no_prefix,
                                    symlinked])
async def test_a_damaged_file_is_ignored_removed_and_the_turn_rebuilds(
        make: Make, llama_path: Path, damage: Callable[[Path], None],
        caplog: pytest.LogCaptureFixture) -> None:
    engine = await make("d", llama_path)
    history = await talk(engine, "c", 3)
    await engine.close()
    path = folder(engine) / "c.kv"
    damage(path)
    again = await make("d", llama_path)
    with caplog.at_level(logging.WARNING):
        pieces, done = await chat(again, ask(history), cid="c", temperature=0, max_new_tokens=6)
    assert pieces and done.usage.cache_source == "rebuilt"
    assert not path.exists()
    if damage is not symlinked:
        warnings = [r for r in caplog.records if "is not used" in r.getMessage()]
        assert len(warnings) == 1
        assert (await again.health()).extra["kv_disk_refused_files"] == 1
    else:  # not one of our files: never opened, the link removed at start (not its target)
        assert path.with_name("elsewhere.bin").is_file()


async def test_a_file_written_for_another_model_is_refused(make: Make, llama_path: Path,
                                                           tmp_path: Path) -> None:
    other = models.write_llama(tmp_path / "other", seed=1)  # same shape, other weights
    engine = await make("d", other)
    history = await talk(engine, "c", 2)
    await engine.close()
    again = await make("d", llama_path)
    pieces, done = await chat(again, ask(history), cid="c", temperature=0, max_new_tokens=6)
    assert pieces and done.usage.cache_source == "rebuilt"
    assert not (folder(again) / "c.kv").exists()


async def test_a_deleted_conversation_loses_its_file(make: Make, llama_path: Path) -> None:
    engine = await make("d", llama_path, cached_conversations=1)
    await talk(engine, "c", 2)
    path = await evicted(engine, "c")
    engine.forget("c")
    engine.caches.disk.flush()  # type: ignore[union-attr]
    assert not path.exists()


async def test_an_edited_agent_is_not_served_its_old_cache(make: Make, llama_path: Path) -> None:
    engine = await make("d", llama_path)
    history = await talk(engine, "c", 3)
    await engine.close()
    again = await make("d", llama_path)
    edited = [ChatMessage("system", "You are another agent now."), *history[1:]]
    got, done = await chat(again, ask(edited), cid="c", temperature=0, max_new_tokens=8)
    assert done.usage.cache_source == "rebuilt"
    fresh = await make("fresh", llama_path, kv_disk_bytes=0)  # never saw the old agent
    expected, _ = await chat(fresh, ask(edited), cid="c", temperature=0, max_new_tokens=8)
    assert got == expected


async def test_a_full_disk_costs_a_warning_and_a_rebuild(
        make: Make, llama_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    import safetensors.numpy

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    engine = await make("d", llama_path, cached_conversations=1)
    histories = {cid: await talk(engine, cid, 2) for cid in ("a", "b")}
    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    with caplog.at_level(logging.WARNING):
        await talk(engine, "c", 1)
        await talk(engine, "d", 1)
        await engine.idle()
        engine.caches.disk.flush()  # type: ignore[union-attr]
    warnings = [r for r in caplog.records if "disk full" in r.getMessage()]
    assert len(warnings) == 1  # once, not once per conversation
    pieces, done = await chat(engine, ask(histories["b"]), cid="b", temperature=0,
                              max_new_tokens=6)
    assert pieces and done.usage.cache_source in ("rebuilt", "disk")
    assert not list(folder(engine).glob(".*.tmp"))


async def test_a_file_over_the_budget_is_not_kept(make: Make, llama_path: Path) -> None:
    engine = await make("d", llama_path, cached_conversations=1, kv_disk_bytes=1000)
    history = await talk(engine, "c", 2)
    await talk(engine, "other", 1)
    await engine.idle()
    engine.caches.disk.flush()  # type: ignore[union-attr]
    assert not (folder(engine) / "c.kv").exists()
    _, done = await chat(engine, ask(history), cid="c", temperature=0, max_new_tokens=4)
    assert done.usage.cache_source == "rebuilt"
    assert (await engine.health()).extra["kv_disk_failed_writes"] >= 1


async def test_two_processes_never_share_a_folder(make: Make, llama_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    first = await make("d", llama_path)
    with caplog.at_level(logging.WARNING):
        second = await make("d", llama_path)  # the same data dir and instance id
    assert first.caches.disk is not None  # type: ignore[union-attr]
    assert second.caches.disk is None  # type: ignore[union-attr]
    assert any("in use by another process" in r.getMessage() for r in caplog.records)


async def test_a_stale_file_serves_only_what_still_agrees_with_the_history(
        make: Make, llama_path: Path) -> None:
    """Edit and resend after a restart: the file holds turns the conversation no longer has; the
    turn uses it only up to where the ids agree, exactly as a cache kept in memory would."""
    stayed = await make("stayed", llama_path)
    first = await make("restarted", llama_path)
    history = await talk(stayed, "c", 4)
    assert await talk(first, "c", 4) == history
    await first.close()
    second = await make("restarted", llama_path)
    edited = ask(history[:-3], "a different last question")  # the last turn edited and resent
    warm, warm_done = await chat(stayed, edited, cid="c", temperature=0, max_new_tokens=12)
    cold, cold_done = await chat(second, edited, cid="c", temperature=0, max_new_tokens=12)
    assert cold == warm
    # The same decision as the kept cache's: here the edit reaches into what both had evicted,
    # so neither can roll back and both rebuild (bounded) from the agent prefix.
    # (The restarted engine has no copy of the agent prefix in memory yet: it prefills it again.)
    assert cold_done.usage.cache_source == warm_done.usage.cache_source == "rebuilt"
