"""The local engine on tiny random models: prompts, per-conversation caches, streaming text,
stopping, cancellation, dense mode, loading errors and health."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
from transformers import AutoModelForCausalLM

from streaming_llm.engines import demo_model
from streaming_llm.engines.base import (
    ChatMessage,
    Constraint,
    EngineRequest,
    Finished,
    GenerationOptions,
    TextChunk,
    ToolCall,
)
from streaming_llm.engines.detokenize import REPLACEMENT
from streaming_llm.engines.local import LocalEngine
from streaming_llm.engines.local.prompts import template_messages
from streaming_llm.errors import ContextTooLong, EngineUnavailable, ModelNotFound
from streaming_llm.settings import Settings

from . import model_dirs as models
from .streams import drain

MakeEngine = Callable[..., Awaitable[LocalEngine]]
SYSTEM = ChatMessage("system", "You are a test agent.\n\n# Notes\nBe brief.")
PREFIX_TOKENS = 34  # SYSTEM rendered by the demo chat template (checked in the pinning tests)


# --- fixtures and helpers -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.write_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def chain_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.write_chain_model(tmp_path_factory.mktemp("chain"), "日語 🎉")


@pytest.fixture
async def make_engine(tmp_path: Path) -> AsyncIterator[MakeEngine]:
    engines: list[LocalEngine] = []

    async def make(model: Path | str, *, start: bool = True, **overrides: Any) -> LocalEngine:
        settings = Settings(data_dir=tmp_path / "data", model=str(model),
                            **{"compile": False, **overrides})
        engine = LocalEngine(settings)
        engines.append(engine)
        if start:
            await engine.start()
        return engine

    yield make
    for engine in engines:
        await engine.close()


def request(messages: list[ChatMessage], *, cid: str = "c", max_new_tokens: int = 12,
            **options: Any) -> EngineRequest:
    # Compared with a plain greedy generate(), which has no repetition penalty.
    options.setdefault("repetition_penalty", 1.0)
    return EngineRequest(request_id="r", conversation_id=cid, messages=list(messages),
                         options=GenerationOptions(**options), max_new_tokens=max_new_tokens)


async def chat(engine: LocalEngine, messages: list[ChatMessage], **kwargs: Any,
               ) -> tuple[list[str], Finished]:
    return await drain(engine.stream(request(messages, **kwargs)))


def encode(messages: list[ChatMessage], *, generation_prompt: bool = True) -> list[int]:
    """The ids of ``messages`` rendered with the demo tokenizer's chat template."""
    tok = models.tokenizer()
    text = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                   add_generation_prompt=generation_prompt, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def reference(model_path: Path, messages: list[ChatMessage], max_new_tokens: int) -> str:
    """Greedy answer of a plain ``model.generate`` over the whole prompt: no engine involved."""
    tok = models.tokenizer()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ids = torch.tensor([encode(messages)])
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True,
                      clean_up_tokenization_spaces=False)


# --- multi-turn reuse ---------------------------------------------------------------------------
@pytest.mark.parametrize("streaming", [True, False], ids=["sink", "dense"])
async def test_turn_three_from_kept_cache_equals_replay(
        make_engine: MakeEngine, llama_path: Path, streaming: bool) -> None:
    engine = await make_engine(llama_path, streaming=streaming)
    messages = [SYSTEM]
    questions = ["What is a sink token?", "And the window, 日本語?", "Thanks 🎉 one more"]
    for i, question in enumerate(questions):
        messages.append(ChatMessage("user", question))
        pieces, finished = await chat(engine, messages, temperature=0)
        if i == 0:
            assert finished.usage.cached_tokens == 0
        else:
            # Everything up to and including the closed previous answer came from the cache.
            closed_before = encode(messages[:-1], generation_prompt=False)
            assert finished.usage.cached_tokens == len(closed_before)
        assert finished.usage.prompt_tokens == len(encode(messages))
        answer = "".join(pieces)
        messages.append(ChatMessage("assistant", answer))
    assert finished.usage.evicted_tokens in (0, None)
    assert finished.usage.completion_tokens == 12 and finished.reason == "length"

    prompt = messages[:-1]
    assert answer == reference(llama_path, prompt, 12)
    engine.forget("c")
    pieces, replayed = await chat(engine, prompt, temperature=0)
    # only the agent's prefix comes from a kept cache: the copy every new conversation starts from
    assert replayed.usage.cached_tokens == (PREFIX_TOKENS if streaming else 0)
    assert "".join(pieces) == answer


@pytest.mark.parametrize("disk", [True, False])
async def test_cache_dropped_from_lru_comes_back_from_disk_or_rebuilds(
        make_engine: MakeEngine, llama_path: Path, disk: bool) -> None:
    engine = await make_engine(llama_path, cached_conversations=1,
                               kv_disk_bytes=-1 if disk else 0)
    a = [SYSTEM, ChatMessage("user", "conversation A")]
    b = [SYSTEM, ChatMessage("user", "conversation B")]
    pieces, first = await chat(engine, a, cid="a", temperature=0)
    assert first.usage.cache_source == "new"
    a += [ChatMessage("assistant", "".join(pieces)), ChatMessage("user", "A again")]
    await chat(engine, b, cid="b", temperature=0)  # pushes A's cache out
    await engine.idle()
    if disk:
        engine.caches.disk.flush()  # type: ignore[union-attr]  # written, not only handed over
    assert (await engine.health()).extra["cached_conversations"] == 1
    pieces, finished = await chat(engine, a, cid="a", temperature=0)
    if disk:  # read back whole: everything but the new user message is cached
        assert finished.usage.cache_source == "disk"
        assert finished.usage.cached_tokens > PREFIX_TOKENS
        assert (await engine.health()).extra["kv_disk_loads"] == 1
    else:
        assert finished.usage.cache_source == "rebuilt"
        assert finished.usage.cached_tokens == PREFIX_TOKENS  # the shared agent prefix only
    assert "".join(pieces) == reference(llama_path, a, 12)


async def test_reuse_continues_after_sink_evictions(make_engine: MakeEngine,
                                                    llama_path: Path) -> None:
    engine = await make_engine(llama_path, sink_tokens=4, window_tokens=24)
    messages = [SYSTEM]
    evicted = []
    for i in range(4):
        messages.append(ChatMessage("user", f"question number {i}"))
        pieces, finished = await chat(engine, messages, temperature=0, max_new_tokens=8)
        if i:
            assert finished.usage.cached_tokens == len(encode(messages[:-1],
                                                               generation_prompt=False))
        evicted.append(finished.usage.evicted_tokens)
        messages.append(ChatMessage("assistant", "".join(pieces)))
    assert evicted == sorted(evicted) and evicted[-1] > 0
    await engine.idle()
    state = engine.caches.conversations["c"]
    # The kept ids are the canonical tokenization of the whole conversation, evicted part included,
    # and the cache holds sinks + the most recent tokens of it.
    assert state.ids == encode(messages, generation_prompt=False)
    assert state.cache.seen_tokens == len(state.ids)
    assert state.cache.sink_tokens == PREFIX_TOKENS  # the pinned agent prefix
    assert state.cache.get_seq_length() <= PREFIX_TOKENS + 24


async def test_long_prompt_streams_through_a_small_window(make_engine: MakeEngine,
                                                          llama_path: Path) -> None:
    engine = await make_engine(llama_path, sink_tokens=4, window_tokens=16)
    messages = [SYSTEM, ChatMessage("user", "lorem ipsum dolor sit amet " * 20)]
    _, finished = await chat(engine, messages, temperature=0, max_new_tokens=5)
    assert finished.usage.prompt_tokens > 100
    assert finished.usage.evicted_tokens >= finished.usage.prompt_tokens - PREFIX_TOKENS - 16
    assert finished.usage.completion_tokens == 5


async def test_prompt_tokenization_reuses_the_kept_text(make_engine: MakeEngine,
                                                        llama_path: Path) -> None:
    engine = await make_engine(llama_path)
    messages = [SYSTEM, ChatMessage("user", "first 日本")]
    pieces, _ = await chat(engine, messages, temperature=0)
    messages += [ChatMessage("assistant", "".join(pieces)), ChatMessage("user", "second 🎉")]
    await engine.idle()
    state = engine.caches.conversations["c"]
    prompts = engine.prompts
    text = prompts.render([{"role": m.role, "content": m.content} for m in messages],
                          generation_prompt=True)
    full = prompts.encode_text(text)
    seen: list[str] = []
    encode_text = prompts.encode_text
    prompts.encode_text = lambda t: seen.append(t) or encode_text(t)  # type: ignore[method-assign]

    assert prompts.encode_prompt(state.text, state.ids, text) == full
    assert seen == [text[len(state.text):]]  # only the new turn was tokenized
    assert seen[0].startswith("<|user|>")

    # Cut mid-text, it goes back to the last special token before the cut.
    seen.clear()
    known = text[:len(state.text) + 20]
    known_ids = encode_text(known)
    assert prompts.encode_after(known, known_ids, text) == full
    assert seen == [known[known.rindex("<|user|>"):], text[known.rindex("<|user|>"):]]

    seen.clear()  # a text that does not extend the known one is tokenized whole
    assert prompts.encode_after(known + "x", known_ids, text) == full
    assert seen == [text]


async def test_forget_drops_the_cache(make_engine: MakeEngine, llama_path: Path) -> None:
    engine = await make_engine(llama_path)
    messages = [SYSTEM, ChatMessage("user", "hi")]
    pieces, _ = await chat(engine, messages, temperature=0)
    messages += [ChatMessage("assistant", "".join(pieces)), ChatMessage("user", "again")]
    await engine.idle()
    engine.forget("c")
    assert (await engine.health()).extra["cached_conversations"] == 0
    _, finished = await chat(engine, messages, temperature=0)
    assert finished.usage.cached_tokens == PREFIX_TOKENS  # the shared agent prefix only


# --- text: UTF-8, stop strings, length ----------------------------------------------------------
async def test_multibyte_characters_stream_whole(make_engine: MakeEngine,
                                                 chain_path: Path) -> None:
    engine = await make_engine(chain_path)
    pieces, finished = await chat(engine, [ChatMessage("user", "say it")], max_new_tokens=50)
    # 11 byte tokens for 5 characters, each character shown whole, once complete.
    assert finished.usage.completion_tokens == 11
    assert pieces == ["日", "語", " ", "🎉"]
    assert all(REPLACEMENT not in p for p in pieces)
    assert finished.reason == "stop"  # the model ended with EOS


@pytest.mark.parametrize(("stop", "text"), [
    (["語"], "日"),
    (["語 🎉", "nothing"], "日"),
    (["🎉"], "日語 "),
    (["語X"], "日語 🎉"),  # held back while it could be a stop string, then released
])
async def test_stop_strings(make_engine: MakeEngine, chain_path: Path, stop: list[str],
                            text: str) -> None:
    engine = await make_engine(chain_path)
    pieces, finished = await chat(engine, [ChatMessage("user", "say it")], stop=stop)
    assert "".join(pieces) == text
    assert finished.reason == "stop"


async def test_max_new_tokens_gives_length(make_engine: MakeEngine, chain_path: Path) -> None:
    engine = await make_engine(chain_path)
    pieces, finished = await chat(engine, [ChatMessage("user", "say it")], max_new_tokens=6)
    assert "".join(pieces) == "日語"  # 3 byte tokens each
    assert (finished.reason, finished.usage.completion_tokens) == ("length", 6)


async def test_sampling_is_reproducible_with_a_seed(make_engine: MakeEngine,
                                                    llama_path: Path) -> None:
    engine = await make_engine(llama_path, cached_conversations=0)
    messages = [ChatMessage("user", "roll the dice")]
    runs = [await chat(engine, messages, temperature=1.0, top_p=0.9, top_k=50, seed=s,
                       max_new_tokens=20) for s in (1, 1, 2)]
    texts = ["".join(pieces) for pieces, _ in runs]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


# --- cancellation and the scheduler's thread ------------------------------------------------------
def count_steps_after_cancel(engine: LocalEngine) -> list[int]:
    """Count forward passes that start after a live request's cancel flag was set."""
    counts = [0, 0]  # [all forward passes, those started after cancel]

    def hook(module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        counts[0] += 1
        if any(r.cancel.is_set() for r in engine._scheduler.admitted()):
            counts[1] += 1

    engine._model.register_forward_pre_hook(hook, with_kwargs=True)
    return counts


@pytest.mark.parametrize("how", ["aclose", "task"])
async def test_cancel_stops_within_one_step(make_engine: MakeEngine, llama_path: Path,
                                            how: str) -> None:
    engine = await make_engine(llama_path)
    counts = count_steps_after_cancel(engine)
    messages = [ChatMessage("user", "go on forever")]
    stream = engine.stream(request(messages, max_new_tokens=100_000, temperature=0))
    got: list[str] = []

    async def consume() -> None:
        async for chunk in stream:
            if isinstance(chunk, TextChunk):
                got.append(chunk.text)

    if how == "aclose":
        while len(got) < 3:
            chunk = await anext(stream)
            if isinstance(chunk, TextChunk):
                got.append(chunk.text)
        await stream.aclose()
    else:
        task = asyncio.create_task(consume())
        while len(got) < 3:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # Closing waited for the scheduler, which has let the turn go: at most the step under way
    # finished.
    assert not engine.caches.live
    assert counts[1] <= 1
    total = counts[0]
    await asyncio.sleep(0.05)
    assert counts[0] == total < 1000
    # The conversation's cache stays consistent and usable.
    await engine.idle()
    state = engine.caches.conversations["c"]
    assert state.cache.seen_tokens == len(state.ids)
    _, finished = await chat(engine, messages, temperature=0, max_new_tokens=3)
    assert finished.usage.cached_tokens == len(encode(messages)) - 1


async def test_request_cancelled_while_queued_never_runs(make_engine: MakeEngine,
                                                         llama_path: Path) -> None:
    engine = await make_engine(llama_path, max_batch=1)  # one at a time: the second one waits
    counts = count_steps_after_cancel(engine)
    first = engine.stream(request([ChatMessage("user", "first")], cid="a", max_new_tokens=40))
    second = engine.stream(request([ChatMessage("user", "second")], cid="b"))
    first_chunk = asyncio.ensure_future(anext(first))
    waiting = asyncio.ensure_future(anext(second))
    await first_chunk
    await asyncio.sleep(0)
    waiting.cancel()  # the second request is still queued behind the first
    with pytest.raises(asyncio.CancelledError):
        await waiting
    async for _ in first:
        pass
    await engine.idle()
    assert "b" not in engine.caches.conversations and "a" in engine.caches.conversations
    assert counts[1] == 0


async def test_event_loop_keeps_running_while_generating(make_engine: MakeEngine,
                                                         llama_path: Path) -> None:
    engine = await make_engine(llama_path)
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    _, finished = await chat(engine, [ChatMessage("user", "talk")], max_new_tokens=200,
                             temperature=0)
    done.set()
    await task
    assert finished.usage.completion_tokens == 200
    # A loop blocked by generation would tick once or twice in all; a free one ticks every
    # millisecond or few (200 decode steps take far longer than 10 ms).
    assert ticks >= 10


# --- dense mode ---------------------------------------------------------------------------------
async def test_dense_mode_drops_oldest_turns(make_engine: MakeEngine,
                                             tmp_path: Path) -> None:
    path = models.write_llama(tmp_path / "short", max_position_embeddings=160)
    engine = await make_engine(path, streaming=False)
    history = []
    for i in range(4):
        history += [ChatMessage("user", f"question {i} " * 3), ChatMessage("assistant", "ok " * 6)]
    messages = [SYSTEM, *history, ChatMessage("user", "the new question")]
    assert len(encode(messages)) + 16 > 160
    pieces, finished = await chat(engine, messages, temperature=0, max_new_tokens=16)
    dropped = finished.usage.dropped_turns
    assert dropped is not None and 0 < dropped < 4
    kept = [SYSTEM, *history[2 * dropped:], messages[-1]]
    assert finished.usage.prompt_tokens == len(encode(kept))
    assert finished.usage.prompt_tokens + 16 <= 160
    assert len(encode([SYSTEM, *history[2 * (dropped - 1):], messages[-1]])) + 16 > 160
    assert "".join(pieces) == reference(path, kept, 16)

    with pytest.raises(ContextTooLong):
        await chat(engine, [SYSTEM, ChatMessage("user", "x " * 200)])


async def test_dense_mode_without_drops_reports_zero(make_engine: MakeEngine,
                                                     llama_path: Path) -> None:
    engine = await make_engine(llama_path, streaming=False)
    _, finished = await chat(engine, [SYSTEM, ChatMessage("user", "short")])
    assert finished.usage.dropped_turns == 0
    assert finished.usage.evicted_tokens is None


# --- loading and health -------------------------------------------------------------------------
async def test_gpt2_refused_for_streaming_with_dense_hint(make_engine: MakeEngine,
                                                          tmp_path: Path) -> None:
    path = models.write_gpt2(tmp_path / "gpt2")
    engine = await make_engine(path, start=False)
    with pytest.raises(EngineUnavailable) as info:
        await engine.start()
    assert "STREAMING_LLM_STREAMING=false" in info.value.message
    assert "absolute position" in info.value.message
    health = await engine.health()
    assert not health.ready and health.detail == info.value.message
    assert health.extra == {"state": "failed"}
    with pytest.raises(EngineUnavailable):
        await chat(engine, [ChatMessage("user", "hi")])

    dense = await make_engine(path, streaming=False)  # dense mode serves it
    # Greedy: a sampled answer from random weights may end at once on an end-of-sequence id.
    _, finished = await chat(dense, [ChatMessage("user", "hi")], max_new_tokens=4, temperature=0)
    assert finished.usage.completion_tokens == 4


async def test_missing_model_is_a_clear_error(make_engine: MakeEngine, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    engine = await make_engine(missing, start=False)
    with pytest.raises(ModelNotFound) as info:
        await engine.start()
    assert str(missing) in info.value.message
    health = await engine.health()
    assert not health.ready and str(missing) in (health.detail or "")


async def test_health_reports_loading_then_ready(make_engine: MakeEngine,
                                                 llama_path: Path) -> None:
    engine = await make_engine(llama_path, start=False, window_tokens=5000)
    before = await engine.health()
    assert not before.ready and before.extra == {"state": "loading"}
    await engine.start()
    await chat(engine, [ChatMessage("user", "hello")])
    await engine.idle()
    health = await engine.health()
    assert health.ready and health.model == str(llama_path) and health.detail is None
    extra = health.extra or {}
    assert extra["device"] == "cpu" and extra["dtype"] == "float32"
    assert extra["streaming"] is True and extra["sink_tokens"] == 4
    assert extra["window_tokens"] == 1024 - 4  # clamped below the trained context
    assert extra["cached_conversations"] == 1 and extra["kv_bytes"] > 0
    await engine.close()
    assert (await engine.health()).extra == {"state": "closed"}
    with pytest.raises(EngineUnavailable, match="shut down"):
        await chat(engine, [ChatMessage("user", "after close")])


async def test_demo_model_is_selected_by_name(make_engine: MakeEngine, tmp_path: Path) -> None:
    engine = await make_engine("demo")
    assert (tmp_path / "data" / demo_model.DIRNAME / "config.json").exists()
    health = await engine.health()
    assert health.ready and health.model == demo_model.NAME
    assert health.detail == demo_model.NOTICE
    assert "meaningless" in health.detail and "STREAMING_LLM_MODEL" in health.detail
    pieces, finished = await chat(engine, [SYSTEM, ChatMessage("user", "hi 日本語 🎉")],
                                  temperature=0, max_new_tokens=30)
    text = "".join(pieces)
    assert finished.usage.completion_tokens > 0
    # The demo model writes printable ASCII nonsense, not control bytes or broken UTF-8.
    assert text and all(c == "\n" or (c.isascii() and c.isprintable()) for c in text)


async def test_count_tokens_is_the_prompt_a_turn_reads(make_engine: MakeEngine,
                                                       llama_path: Path) -> None:
    """``/v1``'s prompt-token limit counts what the turn's usage will report."""
    engine = await make_engine(llama_path, start=False)
    messages = [SYSTEM, ChatMessage("user", "count these few words, please")]
    assert engine.count_tokens(messages) is None  # not loaded yet: nothing to count with
    await engine.start()
    counted = engine.count_tokens(messages)
    _, finished = await chat(engine, messages, max_new_tokens=2)
    assert counted == len(encode(messages)) == finished.usage.prompt_tokens


async def test_tool_calls_and_results_reach_the_prompt(make_engine: MakeEngine,
                                                      llama_path: Path) -> None:
    """Calls and results render in the generic text form, which the demo template (knowing no
    ``tool`` role) takes; the offered tools are described in the system message."""
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    messages = [SYSTEM, ChatMessage("user", "weather?"), ChatMessage("assistant", "", (call,)),
                ChatMessage("tool", "sunny", tool_call_id="call_1"),
                ChatMessage("tool", "21 C", tool_call_id="call_2")]
    constraint = Constraint("tool_calls", tools=({"name": "get_weather", "description": "",
                                                  "parameters": {"type": "object"}},),
                            lazy_trigger="<tool_call>")
    rendered = template_messages(messages, constraint)
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "user"]
    assert rendered[0]["content"].startswith(SYSTEM.content + "\n\n# Tools")
    assert '"name": "get_weather"' in rendered[0]["content"]
    assert rendered[2]["content"] == ('<tool_call>\n{"name": "get_weather", "arguments": '
                                      '{"city": "Paris"}}\n</tool_call>')
    assert rendered[3]["content"] == ("<tool_response>\nsunny\n</tool_response>\n"
                                      "<tool_response>\n21 C\n</tool_response>")
    engine = await make_engine(llama_path)
    req = msgspec.structs.replace(request(messages, max_new_tokens=2), constraint=constraint)
    _, finished = await drain(engine.stream(req))
    tok = models.tokenizer()
    text = tok.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False)
    assert finished.usage.prompt_tokens == len(tok(text, add_special_tokens=False)["input_ids"])


async def test_only_the_schedulers_thread_runs_the_model_once_started(
        make_engine: MakeEngine, llama_path: Path) -> None:
    """The loading thread is gone after start: a second thread with an OpenMP team makes libgomp
    oversubscribe the CPUs and sleep between parallel regions (every step 1.5x slower)."""
    engine = await make_engine(llama_path)
    names = [t.name for t in threading.enumerate()]
    assert not [n for n in names if n.startswith("local-engine_")], names  # the loader's pool
    assert "local-engine-scheduler" in names
    _, finished = await drain(engine.stream(request([ChatMessage("user", "hi")])))
    assert finished is not None and finished.usage.completion_tokens > 0
    health = await engine.health()
    assert health.extra is not None
    # quantize=auto: a float32 Llama-family model on CPU decodes over fp16 weights
    assert health.extra["decode_step"] == "llama-fp16" and health.extra["compile_seconds"] == 0
    assert health.extra["compile"] == {"state": "off"}


@pytest.mark.parametrize("kind", ["fp16", "int8"])
async def test_lighter_weights_are_a_setting(make_engine: MakeEngine, llama_path: Path,
                                             kind: str) -> None:
    engine = await make_engine(llama_path, quantize=kind)
    _, finished = await drain(engine.stream(request([ChatMessage("user", "hi")])))
    assert finished.usage.completion_tokens > 0
    health = await engine.health()
    assert health.extra is not None and health.extra["decode_step"] == f"llama-{kind}"
    # prefill keeps the model's own float32 layers
    assert isinstance(engine._model.model.layers[0].mlp.down_proj, torch.nn.Linear)
