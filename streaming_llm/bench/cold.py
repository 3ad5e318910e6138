"""Cold conversations: the first token of the next turn, warm vs from disk vs rebuilt.

For each history length (``--histories``, tokens), one conversation is built through the local
engine (user messages of filler text, one-token answers), then the next turn's time to first
token is measured four ways, each on the same conversation with a fresh short question:

``warm``
    its cache is in memory (the turn before was its own);
``evicted``
    its cache was pushed out of memory by another conversation (``cached_conversations=1``)
    and written to the disk tier; the turn reads it back;
``restart``
    the engine was stopped gracefully (every cached conversation written) and started again on
    the same data dir; the turn reads the file;
``rebuilt``
    no file (a second engine with the disk tier off, as after ``kill -9`` or on another
    instance): the cache is rebuilt from the agent prefix and the last window of the history.

Each with its ratio to warm, and the rebuild beside the first token of a new conversation whose
first message is one window long (the same prefill, no history). Goals: evicted and restart <=
2x warm at every length, flat in the history; rebuilt <= one window's prefill, flat in the
history. Also: the file's size, and the
disk tier's write and load times. Timings are wall time on the machine as it is (the best of
``--repeats``); on a shared box quote ratios from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .models import add_model_arguments

FILLER = ("Here is a note about gardening, unrelated to anything else. Tomatoes need sun, water "
          "and patience; basil grows well beside them, and marigolds keep some pests away. ")
SYSTEM = ("You are the assistant of Project Bluefin.\n\n# Facts\n- The project codename is "
          "BLUEFIN.\n- The release date is March 3.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, default="default")
    parser.add_argument("--histories", default="2000,8000,32000",
                        help="history lengths to measure, in tokens (comma-separated)")
    parser.add_argument("--window-tokens", type=int, default=2000)
    parser.add_argument("--chunk-tokens", type=int, default=1500,
                        help="tokens per user message while the history is built")
    parser.add_argument("--repeats", type=int, default=2, help="questions per case (best is kept)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")


def _settings(model: str, data: Path, args: argparse.Namespace, **overrides: Any) -> Any:
    from ..settings import Settings

    # The eager step (compile=False): a compile in the background would run beside the timings.
    return Settings(engine="local", model=model, data_dir=data, device="cpu", dtype="float32",
                    window_tokens=args.window_tokens, instance_id="bench", log_level="warning",
                    **{"compile": False, **overrides})


async def _ask(engine: Any, cid: str, messages: list[tuple[str, str]], n: int) -> tuple[str, Any]:
    from ..engines.base import ChatMessage, EngineRequest, Finished, GenerationOptions, TextChunk

    request = EngineRequest(
        request_id=f"{cid}-{len(messages)}", conversation_id=cid,
        messages=[ChatMessage(role=r, content=c) for r, c in messages],  # type: ignore[arg-type]
        options=GenerationOptions(temperature=0.0, max_new_tokens=n), max_new_tokens=n)
    text, usage = [], None
    async for chunk in engine.stream(request):
        if isinstance(chunk, TextChunk):
            text.append(chunk.text)
        elif isinstance(chunk, Finished):
            usage = chunk.usage
    await engine.idle()
    return "".join(text), usage


async def _build(engine: Any, cid: str, tokens: int, args: argparse.Namespace,
                 ) -> list[tuple[str, str]]:
    messages: list[tuple[str, str]] = [("system", SYSTEM)]
    prompt = 0
    chunk = FILLER * max(1, args.chunk_tokens // 40)
    while prompt < tokens:
        messages.append(("user", chunk + "Reply with one word."))
        answer, usage = await _ask(engine, cid, messages, 1)
        messages.append(("assistant", answer))
        prompt = usage.prompt_tokens
    return messages


async def _question(engine: Any, cid: str, messages: list[tuple[str, str]], i: int,
                    ) -> tuple[float, Any, list[tuple[str, str]]]:
    asked = [*messages, ("user", f"Question {i}: what is the project codename?")]
    answer, usage = await _ask(engine, cid, asked, 4)
    return usage.time_to_first_token_ms, usage, [*asked, ("assistant", answer)]


async def _measure(model: str, root: Path, tokens: int, args: argparse.Namespace,
                   log: Any) -> dict[str, Any]:
    from ..engines.local import LocalEngine

    data = root / f"h{tokens}"
    engine = LocalEngine(_settings(model, data, args, cached_conversations=1))
    await engine.start()
    started = time.perf_counter()
    messages = await _build(engine, "c", tokens, args)
    log(f"{tokens}: history built in {time.perf_counter() - started:.0f} s")
    row: dict[str, Any] = {"history_tokens": 0}
    best: dict[str, float] = {}
    i = 0
    for case in ("warm", "evicted"):
        for _ in range(args.repeats):
            if case == "evicted":
                await _ask(engine, "other", [("system", SYSTEM), ("user", "hi")], 1)
                engine.caches.disk.flush()  # type: ignore[union-attr]
            i += 1
            ms, usage, messages = await _question(engine, "c", messages, i)
            assert usage.cache_source == ("memory" if case == "warm" else "disk"), usage
            best[case] = min(best.get(case, float("inf")), ms)
            row["history_tokens"] = usage.prompt_tokens
    health: dict[str, Any] = (await engine.health()).extra or {}
    row["file_bytes"] = (engine.settings.kv_path / "c.kv").stat().st_size
    row["write_ms"] = round(1000 * health["kv_disk_write_seconds"] / max(1, health["kv_disk_writes"]), 1)
    row["load_ms"] = round(1000 * health["kv_disk_load_seconds"] / max(1, health["kv_disk_loads"]), 1)
    for _ in range(args.repeats):
        await engine.close()
        engine = LocalEngine(_settings(model, data, args, cached_conversations=1))
        await engine.start()
        i += 1
        ms, usage, messages = await _question(engine, "c", messages, i)
        assert usage.cache_source == "disk", usage
        best["restart"] = min(best.get("restart", float("inf")), ms)
    await engine.close()
    rebuild = LocalEngine(_settings(model, root / f"r{tokens}", args, kv_disk_bytes=0))
    await rebuild.start()
    for r in range(args.repeats):
        i += 1
        ms, usage, _ = await _question(rebuild, f"c{r}", messages, i)
        assert usage.cache_source == "rebuilt", usage
        best["rebuilt"] = min(best.get("rebuilt", float("inf")), ms)
        # The yardstick of the rebuild's goal: a new conversation whose first message is one
        # window long, prefilled from the agent's kept prefix (the same work, no history).
        first = FILLER * max(1, args.window_tokens // 38)
        _, usage = await _ask(rebuild, f"w{r}", [("system", SYSTEM), ("user", first)], 4)
        best["window"] = min(best.get("window", float("inf")), usage.time_to_first_token_ms)
    await rebuild.close()
    row["window_prefill_ms"] = round(best["window"], 1)
    row["rebuilt_vs_window"] = round(best["rebuilt"] / best["window"], 2)
    warm = best["warm"]
    for case in ("warm", "evicted", "restart", "rebuilt"):
        row[f"{case}_ms"] = round(best[case], 1)
        row[f"{case}_x"] = round(best[case] / warm, 2)
    log(json.dumps(row))
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    head = ("| history (tokens) | warm ms | evicted ms (x warm) | after restart ms (x) | rebuilt ms (x) "
            "| one window's prefill ms (rebuilt / it) | file MB | write ms | load ms |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['history_tokens']:,} | {r['warm_ms']} | {r['evicted_ms']} "
                     f"({r['evicted_x']}) | {r['restart_ms']} ({r['restart_x']}) | "
                     f"{r['rebuilt_ms']} ({r['rebuilt_x']}) | {r['window_prefill_ms']} "
                     f"({r['rebuilt_vs_window']}) | {r['file_bytes'] / 1e6:.1f} | "
                     f"{r['write_ms']} | {r['load_ms']} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..engines.local.loading import model_name, resolve_source
    from ..settings import Settings

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    settings = Settings.from_env(model="" if args.model == "default" else args.model,
                                 models_dir=args.models_dir)
    source = str(resolve_source(settings, lambda step: log(f"{model_name(settings.model)}: {step}")))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-cold-") as tmp:
        for tokens in (int(t) for t in args.histories.split(",")):
            rows.append(asyncio.run(_measure(source, Path(tmp), tokens, args, log)))
    print(_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0
