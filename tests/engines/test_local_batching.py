"""The local engine serving many conversations at once through the batched scheduler."""

from __future__ import annotations

import asyncio
from pathlib import Path

from streaming_llm.engines.base import ChatMessage, EngineRequest, GenerationOptions, TextChunk

from .conftest import MakeEngine
from .streams import drain

SYSTEM = ChatMessage("system", "You are agent number one.")


def request(text: str, cid: str, max_new_tokens: int) -> EngineRequest:
    return EngineRequest(request_id=f"r-{cid}", conversation_id=cid,
                         messages=[SYSTEM, ChatMessage("user", text)],
                         options=GenerationOptions(temperature=0),
                         max_new_tokens=max_new_tokens)


QUESTIONS = [("say something", 20), ("a longer question about the weather today", 28),
             ("x", 12), ("count to ten, please, slowly", 24)]


async def test_answers_together_equal_answers_one_at_a_time(local_engines: MakeEngine,
                                                           llama_path: Path) -> None:
    alone_engine, engine = await local_engines(llama_path), await local_engines(llama_path)
    for e in (alone_engine, engine):  # the agent's prefix is kept by both before they compare
        await drain(e.stream(request("warm up", "warm", 2)))
    alone = [await drain(alone_engine.stream(request(q, f"c{i}", n)))
             for i, (q, n) in enumerate(QUESTIONS)]
    together = await asyncio.gather(*(drain(engine.stream(request(q, f"c{i}", n)))
                                      for i, (q, n) in enumerate(QUESTIONS)))
    assert [pieces for pieces, _ in together] == [pieces for pieces, _ in alone]
    assert all(f.usage.batch_size == 1 for _, f in alone)
    assert max(f.usage.batch_size or 0 for _, f in together) >= 2
    for (_, a), (_, b) in zip(alone, together, strict=True):
        # each turn's own counts, whatever ran beside it
        assert (a.usage.prompt_tokens, a.usage.completion_tokens, a.usage.cached_tokens) == \
            (b.usage.prompt_tokens, b.usage.completion_tokens, b.usage.cached_tokens)


async def test_cancel_of_one_conversation_leaves_the_others(local_engines: MakeEngine,
                                                           llama_path: Path) -> None:
    engine = await local_engines(llama_path)
    alone = await drain(engine.stream(request("keep going", "solo", 30)))
    others = [asyncio.ensure_future(drain(engine.stream(request("keep going", f"o{i}", 30))))
              for i in range(2)]
    victim = engine.stream(request("this one stops", "victim", 10_000))
    got = 0
    async for chunk in victim:
        if isinstance(chunk, TextChunk):
            got += 1
            if got == 3:
                break
    await victim.aclose()
    results = await asyncio.gather(*others)
    assert all(pieces == alone[0] for pieces, _ in results)
    await engine.idle()
    state = engine.caches.conversations["victim"]
    assert state.cache.seen_tokens == len(state.ids)  # consistent, ready for its next turn


async def test_health_reports_the_batch_and_flat_bytes_per_conversation(
        local_engines: MakeEngine, llama_path: Path) -> None:
    engine = await local_engines(llama_path, window_tokens=64, max_batch=3)
    extra = (await engine.health()).extra
    assert extra is not None and extra["max_batch"] == 3 and extra["decoding"] == 0
    messages = [SYSTEM]
    sizes = []
    for turn in range(6):  # far past the 64-token window: the cache evicts
        messages.append(ChatMessage("user", f"turn {turn}: tell me more"))
        pieces, _ = await drain(engine.stream(EngineRequest(
            request_id=f"t{turn}", conversation_id="long", messages=list(messages),
            options=GenerationOptions(temperature=0), max_new_tokens=20)))
        messages.append(ChatMessage("assistant", "".join(pieces)))
        await engine.idle()
        extra = (await engine.health()).extra
        assert extra is not None
        sizes.append((extra["kv_bytes"], extra["batch_kv_bytes"]))
    assert engine.caches.conversations["long"].cache.evicted_tokens > 0
    assert len(set(sizes)) == 1  # flat, however long the conversation grows
