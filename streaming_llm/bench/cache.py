"""Sink cache benchmark: long streams, long conversations, and what the service adds.

One run, one model: a random-weight Llama (8 layers x 512 hidden by default, large enough that
attention cost shows on a CPU) with the demo model's byte-level tokenizer, saved to a temporary
directory and loaded from there by the local engine and the server like any local model. Its
end-of-sequence logit is pushed down so that answers run to ``max_new_tokens``. ``--model``
takes a real model instead (``default``: the default model, SmolLM2-135M-Instruct Q4_1 GGUF),
loaded by the engine's own loader (:mod:`.models`) for every part; its answers stop where the
model ends them. Figures, each with the goal of issue 3:

``decode``
    Decode latency per token early in a stream (``--early`` tokens seen) and late (``--late``),
    and the KV bytes held at both points: for the sink cache evicting one token per step, for the
    sink cache evicting in chunks as the decode loop does (``decoding.eviction_chunk``), and for a
    dense cache. Goal: sink late/early <= 1.15, KV bytes flat.
``recompute``
    Per-token speed-up of the sink cache over a sliding window with re-computation (every token
    re-encodes the last L tokens from scratch) at L = 256 and 1024. Goal: >= 20x at 1024 (the paper
    reports up to 22.2x).
``turns``
    Time to first token of turn 40 vs turn 1 of one conversation through the local engine, keeping
    the conversation's cache between turns (reuse) and with no cache kept at all (no memory
    slot, no disk tier: each turn rebuilds from the agent prefix and the last window, bounded;
    labelled "replay" in the JSON). Goal: reuse ratio <= 1.3; the rebuild is bounded by one
    window (``bench cold`` measures the tiers).
``socket``
    Decode tokens/s a client receives over the real WebSocket from a running ``streaming-llm
    serve`` divided by the tokens/s of the engine's own decode loop (the same local engine, in
    this process, same model and request). Goal: >= 0.95.

Timings are the best of ``--repeats`` blocks (timeit's rule: on a shared machine the fastest
block is the one least disturbed by other work). With one torch thread (the default) the decode
and recompute figures are the CPU time of the thread doing the work, which is its wall time on an
idle machine but, unlike wall time, not inflated by other processes; the JSON has the wall times
too. First-token latencies and tokens/s are wall time, as a client sees them. Run ``streaming-llm bench cache --help``; a quick
run: ``--layers 2 --hidden 128 --intermediate 256 --late 3000 --window-tokens 252 --turns 10``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..testing.server import start_server
from .models import load

# torch and transformers are imported inside the functions: the CLI imports this module to build
# its parser, and `streaming-llm serve` must not pay for that.

Log = Callable[[str], None]
PARTS = ("decode", "recompute", "turns", "socket", "prefix")
RANDOM = "random"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=RANDOM,
                       help=f"{RANDOM!r} (default): a random-weight Llama of the sizes below; "
                            "'default': the default model (SmolLM2-135M-Instruct Q4_1 GGUF); "
                            "or what STREAMING_LLM_MODEL takes (a .gguf file, a model folder), "
                            "loaded by the engine's loader for every part")
    model.add_argument("--layers", type=int, default=8)
    model.add_argument("--hidden", type=int, default=512)
    model.add_argument("--heads", type=int, default=8)
    model.add_argument("--intermediate", type=int, default=1376)
    cache = parser.add_argument_group("cache")
    cache.add_argument("--sink-tokens", type=int, default=4)
    cache.add_argument("--window-tokens", type=int, default=1020)
    decode = parser.add_argument_group("decode / recompute")
    decode.add_argument("--early", type=int, default=1000, help="tokens seen at the early point")
    decode.add_argument("--late", type=int, default=16000, help="tokens seen at the late point")
    decode.add_argument("--steps", type=int, default=64, help="decode steps per timed block")
    decode.add_argument("--recompute-sizes", default="256,1024",
                        help="cache sizes for the sliding-window-with-recomputation comparison")
    decode.add_argument("--prefill-chunk", type=int, default=512)
    turns = parser.add_argument_group("turns / socket")
    turns.add_argument("--turns", type=int, default=40, help="turns of the conversation")
    turns.add_argument("--answer-tokens", type=int, default=24, help="tokens per answer")
    turns.add_argument("--socket-tokens", type=int, default=256,
                       help="tokens of the answer timed over the socket")
    prefix = parser.add_argument_group("prefix (a real model)")
    prefix.add_argument("--prefix-tokens", type=int, default=2000,
                        help="tokens of the agent's Markdown context")
    prefix.add_argument("--prefix-model", default="",
                        help="STREAMING_LLM_MODEL for this part (default: the bundled SmolLM2)")
    prefix.add_argument("--models-dir", type=Path, default=None,
                        help="where converted GGUF models are kept (default: the server's, "
                             "<STREAMING_LLM_DATA_DIR>/models)")
    run = parser.add_argument_group("run")
    run.add_argument("--repeats", type=int, default=3, help="timed blocks; the best one counts")
    run.add_argument("--threads", type=int, default=1,
                     help="torch threads here and in the server (0 = torch's default)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--only", default=",".join(PARTS),
                     help=f"comma-separated parts to run, of {', '.join(PARTS)}")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


# --- the model ------------------------------------------------------------------------------------
def write_bench_model(target: Path, args: argparse.Namespace) -> Any:
    """Build the random Llama, save it with the demo tokenizer into ``target``; return it."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from ..engines.demo_model import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(4096, args.late + (args.repeats + 2) * args.steps
                                    + args.prefill_chunk),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # Channel 0 of the residual stream is a constant (every embedding has 1.0 there and no
        # layer writes to it), so column 0 of the output layer is a per-token logit offset:
        # special tokens (EOS among them) get a large negative one and answers never stop early.
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tokenizer.all_special_ids, 0] = -30.0
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id)
    tokenizer.save_pretrained(target)
    model.save_pretrained(target)
    return model


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    import torch

    return torch.randint(10, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _kv_bytes(cache: Any) -> int:
    from ..engines.sink_cache import SinkCache

    if isinstance(cache, SinkCache):
        return cache.nbytes()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers
               if getattr(layer, "keys", None) is not None and layer.keys.numel())


# --- decode: late vs early -------------------------------------------------------------------------
class _Clock:
    """Times blocks of work and keeps the best one (timeit's rule).

    Wall time on a shared machine mostly measures the neighbours; with one torch thread all of
    a forward pass runs in the calling thread, so that thread's CPU time is the cost of the work
    itself (and equals the wall time on an idle machine). ``best_ms`` is that CPU time when
    single-threaded, else the wall time; both are kept.
    """

    def __init__(self, threads: int) -> None:
        self.cpu = threads == 1
        self.best_wall = self.best_cpu = float("inf")

    @contextlib.contextmanager
    def block(self, count: int = 1) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.thread_time()
        yield
        self.best_wall = min(self.best_wall, (time.perf_counter() - wall) * 1000 / count)
        self.best_cpu = min(self.best_cpu, (time.thread_time() - cpu) * 1000 / count)

    @property
    def best_ms(self) -> float:
        return self.best_cpu if self.cpu else self.best_wall


def _decode_ms(model: Any, cache: Any, tokens: Iterator[int], args: argparse.Namespace,
               evict_chunk: int) -> tuple[float, float]:
    """(best, best wall) ms of one decode step, eviction included, over ``args.repeats`` blocks."""
    import torch

    from ..engines.decoding import decode_step

    def step() -> None:
        decode_step(model, cache, next(tokens), evict=evict_chunk)

    step()  # warm-up, not timed
    clock = _Clock(torch.get_num_threads())
    for _ in range(args.repeats):
        with clock.block(args.steps):
            for _ in range(args.steps):
                step()
    return clock.best_ms, clock.best_wall


def decode_late_vs_early(model: Any, args: argparse.Namespace, log: Log) -> dict[str, Any]:
    from transformers import DynamicCache

    from ..engines.decoding import eviction_chunk, forward_tokens
    from ..engines.sink_cache import SinkCache

    vocab = model.config.vocab_size
    chunked = eviction_chunk(args.window_tokens)
    runs: dict[str, tuple[Callable[[], Any], int]] = {
        "sink_evict_1": (lambda: SinkCache.from_model(model, args.sink_tokens,
                                                      args.window_tokens), 1),
        f"sink_evict_{chunked}": (lambda: SinkCache.from_model(model, args.sink_tokens,
                                                               args.window_tokens), chunked),
        "dense": (DynamicCache, 1),
    }
    results: dict[str, Any] = {}
    for name, (make, evict_chunk) in runs.items():
        cache = make()
        chunk = min(args.prefill_chunk, getattr(cache, "window_tokens", args.prefill_chunk))
        stream = iter(_ids(args.late + 2 * (args.repeats + 1) * args.steps + 2, vocab, args.seed))
        figures: dict[str, Any] = {"evict_chunk": evict_chunk if name != "dense" else None}
        for point, seen in (("early", args.early), ("late", args.late)):
            t0 = time.perf_counter()
            missing = seen - (cache.seen_tokens if name != "dense" else cache.get_seq_length())
            if missing > 0:
                forward_tokens(model, cache, [next(stream) for _ in range(missing)],
                               chunk_size=chunk)
            log(f"decode/{name}: filled to {seen} tokens in {time.perf_counter() - t0:.1f}s")
            figures[f"{point}_ms_per_token"], figures[f"{point}_wall_ms_per_token"] = (
                _decode_ms(model, cache, stream, args, evict_chunk))
            figures[f"{point}_kv_bytes"] = _kv_bytes(cache)
            figures[f"{point}_stored_tokens"] = cache.get_seq_length()
        figures["latency_ratio"] = figures["late_ms_per_token"] / figures["early_ms_per_token"]
        figures["kv_bytes_ratio"] = figures["late_kv_bytes"] / figures["early_kv_bytes"]
        log(f"decode/{name}: {figures['early_ms_per_token']:.2f} -> "
            f"{figures['late_ms_per_token']:.2f} ms/token")
        results[name] = figures
    return results


# --- recompute: speed-up over sliding window with re-computation -----------------------------------
def recompute_speedup(model: Any, args: argparse.Namespace, log: Log) -> dict[str, Any]:
    import torch

    from ..engines.decoding import eviction_chunk, forward_tokens
    from ..engines.sink_cache import SinkCache

    results: dict[str, Any] = {}
    vocab = model.config.vocab_size
    for size in (int(s) for s in args.recompute_sizes.split(",") if s.strip()):
        ids = _ids(size + 2 * (args.repeats + 2) * args.steps, vocab, args.seed + size)
        # Sliding window with re-computation: each token re-encodes the last `size` tokens.
        clock = _Clock(torch.get_num_threads())
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids[:size]]), use_cache=False, logits_to_keep=1)
            for i in range(1, args.repeats + 1):
                window = torch.tensor([ids[i:i + size]])
                with clock.block():
                    model(input_ids=window, use_cache=False, logits_to_keep=1)
        recompute_ms = clock.best_ms
        figures: dict[str, Any] = {"recompute_ms_per_token": recompute_ms}
        window_tokens = size - args.sink_tokens
        for label, evict in (("evict_1", 1), ("evict_chunked", eviction_chunk(window_tokens))):
            cache = SinkCache.from_model(model, args.sink_tokens, window_tokens)
            forward_tokens(model, cache, ids[:size], chunk_size=min(args.prefill_chunk,
                                                                    window_tokens))
            sink_ms, _ = _decode_ms(model, cache, iter(ids[size:]), args, evict)
            figures[f"sink_{label}_ms_per_token"] = sink_ms
            figures[f"speedup_{label}"] = recompute_ms / sink_ms
        figures["evict_chunk"] = eviction_chunk(window_tokens)
        log(f"recompute/{size}: {recompute_ms:.1f} ms vs sink "
            f"{figures['sink_evict_1_ms_per_token']:.2f} / "
            f"{figures['sink_evict_chunked_ms_per_token']:.2f} ms per token")
        results[str(size)] = figures
    return results


# --- turns: first-token latency with cache reuse vs full replay ------------------------------------
SYSTEM = ("You are a careful assistant for a team of agents. Answer briefly and keep track of "
          "what was said before.\n\n# Context\n- The project streams tokens over a socket.\n"
          "- Keep the first tokens as attention sinks and a recent window.")
USER = ("Turn {n}: the quick brown fox jumps over the lazy dog while the assistant keeps the "
        "conversation going, again and again, with a window of recent tokens and a few sinks.")


def _engine_settings(model_dir: Path, data_dir: Path, args: argparse.Namespace,
                     cached_conversations: int, max_new_tokens: int) -> Any:
    from ..settings import Settings

    # No cache kept (0 conversations) also means no disk tier: every turn rebuilds.
    # The eager step (compile=False): a compile in the background would run beside the timings.
    return Settings(engine="local", model=str(model_dir), data_dir=data_dir, device="cpu",
                    dtype="float32", streaming=True, compile=False, sink_tokens=args.sink_tokens,
                    window_tokens=args.window_tokens, cached_conversations=cached_conversations,
                    kv_disk_bytes=-1 if cached_conversations else 0,
                    max_new_tokens=max_new_tokens, log_level="warning")


async def _ask(engine: Any, conversation_id: str, messages: list[tuple[str, str]],
               max_new_tokens: int) -> tuple[str, Any]:
    """One turn through the engine; returns the answer text and the usage."""
    from ..engines.base import (
        ChatMessage,
        EngineRequest,
        Finished,
        GenerationOptions,
        TextChunk,
    )

    request = EngineRequest(
        request_id=f"{conversation_id}-{len(messages)}", conversation_id=conversation_id,
        messages=[ChatMessage(role=r, content=c) for r, c in messages],  # type: ignore[arg-type]
        options=GenerationOptions(temperature=0.0, max_new_tokens=max_new_tokens),
        max_new_tokens=max_new_tokens)
    text: list[str] = []
    usage = None
    async for chunk in engine.stream(request):
        if isinstance(chunk, TextChunk):
            text.append(chunk.text)
        elif isinstance(chunk, Finished):
            usage = chunk.usage
    await engine.idle()  # the engine closes the turn in the cache after Finished
    return "".join(text), usage


async def _turns(model_dir: Path, data_dir: Path, args: argparse.Namespace,
                 log: Log) -> dict[str, Any]:
    from ..engines.local import LocalEngine

    n = args.turns
    reuse = LocalEngine(_engine_settings(model_dir, data_dir, args, 4, args.answer_tokens))
    replay = LocalEngine(_engine_settings(model_dir, data_dir, args, 0, args.answer_tokens))
    await reuse.start()
    await replay.start()
    try:
        await _ask(reuse, "warm-up", [("system", SYSTEM), ("user", "hello")], 4)
        await _ask(replay, "warm-up", [("system", SYSTEM), ("user", "hello")], 4)
        ttft_reuse: list[list[float]] = []
        history: list[tuple[str, str]] = []
        prompt_tokens = cached_tokens = evicted = 0
        for attempt in range(max(1, args.repeats - 1)):  # whole conversations, best per turn
            history = [("system", SYSTEM)]
            times = []
            for turn in range(1, n + 1):
                history.append(("user", USER.format(n=turn)))
                answer, usage = await _ask(reuse, f"reuse-{attempt}", history, args.answer_tokens)
                history.append(("assistant", answer))
                times.append(usage.time_to_first_token_ms)
                prompt_tokens, cached_tokens = usage.prompt_tokens, usage.cached_tokens
                evicted = usage.evicted_tokens
            ttft_reuse.append(times)
            log(f"turns/reuse: conversation {attempt + 1}: turn 1 {times[0]:.1f} ms, "
                f"turn {n} {times[-1]:.1f} ms ({prompt_tokens} prompt tokens, "
                f"{cached_tokens} cached, {evicted} evicted)")
        best = [min(t[i] for t in ttft_reuse) for i in range(n)]
        # Replay: the same turn 1 and turn n (same history), with no kept cache.
        first = history[:2]
        last = history[:-1]
        ttft_replay = {1: float("inf"), n: float("inf")}
        for attempt in range(max(1, args.repeats - 1)):
            for turn, messages in ((1, first), (n, last)):
                _, usage = await _ask(replay, f"replay-{attempt}-{turn}", messages,
                                      args.answer_tokens)
                ttft_replay[turn] = min(ttft_replay[turn], usage.time_to_first_token_ms)
        log(f"turns/replay: turn 1 {ttft_replay[1]:.1f} ms, turn {n} {ttft_replay[n]:.1f} ms")
    finally:
        await reuse.close()
        await replay.close()
    return {
        "turns": n, "answer_tokens": args.answer_tokens,
        "conversation_tokens_at_last_turn": prompt_tokens,
        "cached_tokens_at_last_turn": cached_tokens, "evicted_tokens_at_last_turn": evicted,
        "reuse_first_ms": best[0], "reuse_last_ms": best[-1],
        "reuse_ratio": best[-1] / best[0],
        "replay_first_ms": ttft_replay[1], "replay_last_ms": ttft_replay[n],
        "replay_ratio": ttft_replay[n] / ttft_replay[1],
    }


def turn_latency(model_dir: Path, data_dir: Path, args: argparse.Namespace,
                 log: Log) -> dict[str, Any]:
    return asyncio.run(_turns(model_dir, data_dir, args, log))


# --- socket: what the service adds ------------------------------------------------------------------
def _server_env(model_dir: Path, args: argparse.Namespace) -> dict[str, str]:
    """The server runs the same local engine and cache settings as the in-process engine."""
    env = {
        "STREAMING_LLM_ENGINE": "local", "STREAMING_LLM_MODEL": str(model_dir),
        "STREAMING_LLM_DEVICE": "cpu", "STREAMING_LLM_COMPILE": "false",
        "STREAMING_LLM_DTYPE": "float32", "STREAMING_LLM_STREAMING": "true",
        "STREAMING_LLM_SINK_TOKENS": str(args.sink_tokens),
        "STREAMING_LLM_WINDOW_TOKENS": str(args.window_tokens),
        "STREAMING_LLM_LOG_LEVEL": "warning",
    }
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)  # torch's intra-op threads, as here
    return env


async def _socket_rate(base: str, max_new_tokens: int) -> tuple[float, float, int]:
    """One chat over the socket: (client decode tokens/s, server-reported tokens/s, tokens)."""
    import aiohttp

    async with aiohttp.ClientSession() as http:
        agent = {"name": "Bench", "system_prompt": SYSTEM, "markdown_context": ""}
        async with http.put(f"{base}/agents/bench", json=agent) as resp:
            resp.raise_for_status()
        async with http.ws_connect(base.replace("http", "ws") + "/ws/chat") as ws:
            await ws.send_json({"type": "chat", "agent_id": "bench", "message": USER.format(n=1),
                                "options": {"temperature": 0, "max_new_tokens": max_new_tokens}})
            first = last = 0.0
            while True:
                frame = await ws.receive_json(timeout=600)
                now = time.perf_counter()
                if frame["type"] == "token":
                    first = first or now
                    last = now
                elif frame["type"] == "done":
                    break
                elif frame["type"] == "error":
                    raise RuntimeError(f"server error: {frame}")
    usage = frame["usage"]
    n = usage["completion_tokens"]
    return (n - 1) / (last - first), float(usage["decode_tokens_per_s"]), n


async def _socket(model_dir: Path, data_dir: Path, args: argparse.Namespace,
                  log: Log) -> dict[str, Any]:
    from ..engines.local import LocalEngine

    engine = LocalEngine(_engine_settings(model_dir, data_dir / "engine", args, 1,
                                          args.socket_tokens))
    await engine.start()
    messages = [("system", SYSTEM), ("user", USER.format(n=1))]
    in_process = client = reported = 0.0
    tokens = 0
    try:
        with start_server(data_dir / "server", _server_env(model_dir, args),
                          timeout=300) as server:
            # Alternate the two, so that a change in the machine's load hits both; the first
            # round is a warm-up. Best rate of each.
            for attempt in range(args.repeats + 1):
                _, usage = await _ask(engine, f"rate-{attempt}", messages, args.socket_tokens)
                rate, server_rate, tokens = await _socket_rate(server.base_url,
                                                               args.socket_tokens)
                if attempt:
                    in_process = max(in_process, usage.decode_tokens_per_s)
                    client, reported = max(client, rate), max(reported, server_rate)
    finally:
        await engine.close()
    log(f"socket: client {client:.1f} tokens/s, the server's engine reports {reported:.1f}, "
        f"the engine in this process {in_process:.1f}")
    return {"tokens": tokens, "client_tokens_per_s": client,
            "server_reported_tokens_per_s": reported, "engine_tokens_per_s": in_process,
            "ratio": client / in_process, "ratio_to_server_engine": client / reported}


def socket_throughput(model_dir: Path, data_dir: Path, args: argparse.Namespace,
                      log: Log) -> dict[str, Any]:
    return asyncio.run(_socket(model_dir, data_dir, args, log))


# --- prefix: the shared agent prefix ----------------------------------------------------------------
PREFIX_LINE = "- Rule {i}: a review names the file, the line and the reason; keep each note short.\n"


async def _prefix(data_dir: Path, args: argparse.Namespace, log: Log) -> dict[str, Any]:
    """First token of new conversations with an agent whose Markdown context is long: the first
    conversation prefills the prefix and keeps it, the next ones start from a copy."""
    from ..engines.local import LocalEngine
    from ..settings import Settings

    models = args.models_dir or Settings.from_env().models_path
    engine = LocalEngine(Settings(engine="local", model=args.prefix_model, data_dir=data_dir,
                                  models_dir=models, device="cpu", dtype="float32",
                                  window_tokens=args.window_tokens, max_new_tokens=2,
                                  compile=False))
    await engine.start()
    try:
        prompts = engine.prompts
        assert prompts is not None
        lines: list[str] = []
        while len(prompts.encode_text("# Handbook\n" + "".join(lines))) < args.prefix_tokens:
            lines.append(PREFIX_LINE.format(i=len(lines)))
        system = "You review code.\n\n# Handbook\n" + "".join(lines)
        tokens = len(prompts.encode_text(prompts.agent_prefix([{"role": "system",
                                                                "content": system}])))
        ttft: list[float] = []
        for n in range(1, args.repeats + 2):
            _, usage = await _ask(engine, f"prefix-{n}", [("system", system),
                                                          ("user", "Hello, who are you?")], 2)
            ttft.append(usage.time_to_first_token_ms)
            log(f"prefix: conversation {n}: first token {ttft[-1]:.0f} ms "
                f"({usage.cached_tokens} of {usage.prompt_tokens} prompt tokens copied)")
        name = (await engine.health()).model
    finally:
        await engine.close()
    later = min(ttft[1:])
    return {"model": name, "prefix_tokens": tokens, "first_ms": ttft[0], "next_ms": later,
            "speedup": ttft[0] / later}


def shared_prefix(data_dir: Path, args: argparse.Namespace, log: Log) -> dict[str, Any]:
    return asyncio.run(_prefix(data_dir, args, log))


# --- report --------------------------------------------------------------------------------------
def _table(figures: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str]] = []
    unit = "CPU ms" if figures["model"]["threads"] == 1 else "ms"
    for name, f in figures.get("decode", {}).items():
        sink = name.startswith("sink")
        rows.append((f"decode {name}: {unit}/token at {figures['early_tokens']} -> "
                     f"{figures['late_tokens']} seen",
                     f"{f['early_ms_per_token']:.2f} -> {f['late_ms_per_token']:.2f} "
                     f"(x{f['latency_ratio']:.2f})", "<= 1.15" if sink else "(grows)"))
        rows.append((f"decode {name}: KV bytes",
                     f"{f['early_kv_bytes'] / 2**20:.1f} -> {f['late_kv_bytes'] / 2**20:.1f} MiB "
                     f"(x{f['kv_bytes_ratio']:.2f})", "flat" if sink else "(grows)"))
    for size, f in figures.get("recompute", {}).items():
        for label, text in (("evict_1", "evict 1"),
                            ("evict_chunked", f"evict {f['evict_chunk']}")):
            rows.append((f"speed-up over recomputation, cache {size}, {text}",
                         f"x{f[f'speedup_{label}']:.1f} ({f['recompute_ms_per_token']:.1f} vs "
                         f"{f[f'sink_{label}_ms_per_token']:.2f} {unit}/token)",
                         ">= 20" if size == "1024" else ""))
    if "turns" in figures:
        t = figures["turns"]
        n = t["turns"]
        rows.append((f"first token, turn {n} vs 1, cache reuse",
                     f"{t['reuse_first_ms']:.1f} -> {t['reuse_last_ms']:.1f} ms "
                     f"(x{t['reuse_ratio']:.2f})", "<= 1.3"))
        rows.append((f"first token, turn {n} vs 1, no cache kept (bounded rebuild)",
                     f"{t['replay_first_ms']:.1f} -> {t['replay_last_ms']:.1f} ms "
                     f"(x{t['replay_ratio']:.2f})", "(grows)"))
    if "socket" in figures:
        s = figures["socket"]
        rows.append(("socket tokens/s / engine decode-loop tokens/s",
                     f"{s['ratio']:.3f} ({s['client_tokens_per_s']:.1f} / "
                     f"{s['engine_tokens_per_s']:.1f})", ">= 0.95"))
        rows.append(("socket tokens/s / the server's own engine tokens/s",
                     f"{s['ratio_to_server_engine']:.3f} ({s['client_tokens_per_s']:.1f} / "
                     f"{s['server_reported_tokens_per_s']:.1f})", ">= 0.95"))
    if "prefix" in figures:
        p = figures["prefix"]
        rows.append((f"first token of a new conversation, {p['prefix_tokens']}-token agent "
                     f"prefix, {p['model']}: first vs next",
                     f"{p['first_ms']:.0f} -> {p['next_ms']:.0f} ms (x{p['speedup']:.1f} faster)",
                     ">= 5"))
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    m = figures["model"]
    lines = [f"model: {m.get('name', 'random-weight Llama')}, {m['layers']} layers x {m['hidden']} hidden, {m['parameters'] / 1e6:.1f}M "
             f"parameters, {m['dtype']} on {m['device']}, {m['threads']} thread(s); sink cache "
             f"{figures['sink_tokens']} + {figures['window_tokens']} tokens",
             f"{'figure':<{width}}  {'measured':<{vwidth}}  goal",
             "-" * (width + vwidth + 10)]
    lines += [f"{a:<{width}}  {b:<{vwidth}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"bench cache: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}",
              file=sys.stderr)
        return 2
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars would clutter the report
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="streaming-llm-bench-") as tmp:
        work = Path(tmp)
        if args.model == RANDOM:
            model_dir = work / "model"
            model = write_bench_model(model_dir, args)
            name = "random-weight Llama"
        else:
            loaded, name, source = load(args.model, args.models_dir, log)
            model, model_dir = loaded.model, Path(source)
            del loaded
        config = model.config
        params = sum(p.numel() for p in model.parameters())
        figures: dict[str, Any] = {
            "model": {"name": name, "layers": config.num_hidden_layers,
                      "hidden": config.hidden_size, "heads": config.num_attention_heads,
                      "parameters": params, "vocab": config.vocab_size,
                      "dtype": "float32", "device": "cpu", "threads": torch.get_num_threads()},
            "sink_tokens": args.sink_tokens, "window_tokens": args.window_tokens,
            "early_tokens": args.early, "late_tokens": args.late, "steps": args.steps,
            "repeats": args.repeats,
        }
        log(f"model: {name}, {config.num_hidden_layers} layers x {config.hidden_size} hidden, "
            f"{params / 1e6:.1f}M parameters, {torch.get_num_threads()} thread(s), in {model_dir}")
        if "decode" in parts:
            figures["decode"] = decode_late_vs_early(model, args, log)
        if "recompute" in parts:
            figures["recompute"] = recompute_speedup(model, args, log)
        del model
        if "turns" in parts:
            figures["turns"] = turn_latency(model_dir, work / "turns", args, log)
        if "socket" in parts:
            figures["socket"] = socket_throughput(model_dir, work / "socket", args, log)
        if "prefix" in parts:
            figures["prefix"] = shared_prefix(work / "prefix", args, log)
    print(json.dumps(figures, indent=2) if args.json else _table(figures))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streaming_llm.bench.cache",
                                     description=(__doc__ or "").splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
