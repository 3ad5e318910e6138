"""The pinned agent prefix: the sink region of a conversation's cache is the rendered system
message, never evicted; too long a prefix is refused; an edited agent's next turn uses the new
prefix; new conversations start from a shared copy of the prefix cache, equal to a fresh prefill."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from starlette.testclient import TestClient

from streaming_llm.app import create_app
from streaming_llm.engines import runner
from streaming_llm.engines.base import ChatMessage
from streaming_llm.engines.local import LocalEngine
from streaming_llm.errors import AgentContextTooLong
from streaming_llm.settings import Settings

from .conftest import MakeEngine
from .test_local import PREFIX_TOKENS, SYSTEM, chat, encode, reference
from .tiny_models import dense_forward

LONG = ChatMessage("system", "You are a test agent with a long context.\n\n" + "- a fact\n" * 40)


@pytest.fixture
def make(local_engines: MakeEngine) -> MakeEngine:
    return local_engines  # (conftest.py)


async def talk(engine: LocalEngine, system: ChatMessage | None, turns: int, *, cid: str = "c",
               max_new_tokens: int = 8) -> list[ChatMessage]:
    messages = [system] if system else []
    for i in range(turns):
        messages.append(ChatMessage("user", f"unrelated question number {i}, 日本"))
        pieces, _ = await chat(engine, messages, cid=cid, temperature=0,
                               max_new_tokens=max_new_tokens)
        messages.append(ChatMessage("assistant", "".join(pieces)))
    await engine.idle()
    return messages


def prefix_ids(system: ChatMessage) -> list[int]:
    return encode([system], generation_prompt=False)


async def test_the_agent_prefix_is_the_sink_region_and_never_evicted(make: Any,
                                                                     llama_path: Path) -> None:
    assert len(prefix_ids(SYSTEM)) == PREFIX_TOKENS
    engine = await make(llama_path, sink_tokens=4, window_tokens=24)
    messages = await talk(engine, SYSTEM, 6)
    cache = engine.caches.conversations["c"].cache
    assert cache.sink_tokens == PREFIX_TOKENS and cache.window_tokens == 24
    assert cache.evicted_tokens > 100
    # The stored sink keys are those of the prefix itself, as a fresh prefill writes them.
    _, dense = dense_forward(engine._model, prefix_ids(SYSTEM))
    for ours, fresh in zip(cache.layers, dense.layers, strict=True):
        torch.testing.assert_close(ours.keys[:, :, :PREFIX_TOKENS], fresh.keys, rtol=1e-5, atol=1e-5)
    assert engine.caches.conversations["c"].ids == encode(messages, generation_prompt=False)


async def test_without_a_system_message_the_sinks_are_the_papers(make: Any,
                                                                 llama_path: Path) -> None:
    engine = await make(llama_path, sink_tokens=4, window_tokens=24)
    await talk(engine, None, 3)
    assert engine.caches.conversations["c"].cache.sink_tokens == 4


async def test_the_pin_can_be_switched_off(make: Any, llama_path: Path) -> None:
    engine = await make(llama_path, sink_tokens=4, window_tokens=24, pin_agent_prefix=False)
    await talk(engine, SYSTEM, 4)
    cache = engine.caches.conversations["c"].cache
    assert cache.sink_tokens == 4 and cache.evicted_tokens > 0
    assert engine.refusal(LONG.content) is None  # nothing pinned, nothing refused


async def test_a_prefix_leaving_too_small_a_window_is_refused(make: Any, llama_path: Path) -> None:
    engine = await make(llama_path, window_tokens=40)
    refused = engine.refusal(LONG.content)
    assert isinstance(refused, AgentContextTooLong) and refused.code == "agent_context_too_long"
    n = len(prefix_ids(LONG))
    assert f"take {n} tokens" in refused.message and f"leaves 40 tokens of a {n + 40}-token" in refused.message
    assert engine.refusal(SYSTEM.content) is None
    with pytest.raises(AgentContextTooLong):
        await chat(engine, [LONG, ChatMessage("user", "hi")])


async def test_an_edited_agent_is_served_with_its_new_prefix(make: Any, llama_path: Path) -> None:
    engine = await make(llama_path)
    messages = await talk(engine, SYSTEM, 2)
    edited = ChatMessage("system", "You are an edited agent now.")
    messages = [edited, *messages[1:], ChatMessage("user", "and now?")]
    pieces, _ = await chat(engine, messages, temperature=0)
    assert "".join(pieces) == reference(llama_path, messages, 12)
    await engine.idle()
    state = engine.caches.conversations["c"]
    assert state.cache.sink_tokens == len(prefix_ids(edited))
    assert state.ids[:state.cache.sink_tokens] == prefix_ids(edited)


async def test_an_edited_agent_after_evictions_gets_a_rebuilt_cache(make: Any,
                                                                    llama_path: Path) -> None:
    engine = await make(llama_path, window_tokens=24)
    messages = await talk(engine, SYSTEM, 4)
    edited = ChatMessage("system", SYSTEM.content.replace("test", "best"))  # same length
    messages = [edited, *messages[1:], ChatMessage("user", "and now?")]
    _, finished = await chat(engine, messages, temperature=0)
    await engine.idle()
    state = engine.caches.conversations["c"]
    assert finished.usage.cached_tokens == 0  # nothing of the old prefix was reused
    assert state.ids[:state.cache.sink_tokens] == prefix_ids(edited)


async def test_a_new_conversation_copies_the_shared_prefix_equal_to_a_fresh_prefill(
        make: Any, llama_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.Tensor] = []
    sample = runner.sample_rows

    def record(logits: torch.Tensor, samplers: Any, histories: Any, masks: Any = None,
               ) -> list[int]:
        seen.extend(row.clone() for row in logits)
        return sample(logits, samplers, histories, masks)

    monkeypatch.setattr(runner, "sample_rows", record)
    shared = await make(llama_path, window_tokens=24)
    fresh = await make(llama_path, window_tokens=24, shared_prefixes=0)
    first = [SYSTEM, ChatMessage("user", "the first conversation")]
    _, built = await chat(shared, first, cid="a", temperature=0, max_new_tokens=1)
    assert built.usage.cached_tokens == 0
    await talk(shared, SYSTEM, 4, cid="a")  # evicts in a's own copy; the kept prefix stays
    messages = [SYSTEM, ChatMessage("user", "a second conversation")]
    seen.clear()
    _, copied = await chat(shared, messages, cid="b", temperature=0, max_new_tokens=1)
    _, prefilled = await chat(fresh, messages, cid="b", temperature=0, max_new_tokens=1)
    assert copied.usage.cached_tokens == PREFIX_TOKENS and prefilled.usage.cached_tokens == 0
    torch.testing.assert_close(seen[0], seen[1], rtol=1e-5, atol=1e-5)
    assert (await shared.health()).extra["shared_prefixes"] == 1

    edited = ChatMessage("system", "Another agent.")  # another prefix: another shared entry
    _, other = await chat(shared, [edited, ChatMessage("user", "hi")], cid="c", temperature=0)
    assert other.usage.cached_tokens == 0
    assert (await shared.health()).extra["shared_prefixes"] == 2


def test_put_warns_and_chat_refuses_an_agent_whose_prefix_is_too_long(tmp_path: Path,
                                                                      llama_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", engine="local", model=str(llama_path),
                        window_tokens=40, allowed_hosts="testserver", compile=False)
    with TestClient(create_app(settings)) as client:
        for _ in range(600):
            if client.get("/health").json()["ready"]:
                break
            time.sleep(0.05)
        agent = {"name": "Long", "system_prompt": "", "markdown_context": LONG.content}
        put = client.put("/agents/long", json=agent)
        assert put.status_code == 201
        assert [w["code"] for w in put.json()["warnings"]] == ["agent_context_too_long"]
        assert client.get("/agents/long").json()["name"] == "Long"  # stored all the same
        ok = client.put("/agents/short", json={**agent, "markdown_context": "Be brief."})
        assert ok.status_code == 201 and "warnings" not in ok.json()
        with client.websocket_connect("/ws/chat") as ws:
            ws.send_json({"type": "chat", "agent_id": "long", "message": "hi"})
            error = ws.receive_json()
        assert error["type"] == "error" and error["code"] == "agent_context_too_long"
        assert not client.get("/conversations").json()  # refused before anything was stored
