"""Structured output: validity of constrained answers, decode speed constrained vs free, compile time.

Runs the real local engine (its scheduler, its batched decode step, its sampler with the
per-row token masks of :mod:`streaming_llm.engines.constraints`) on ``--model`` (default: the
default model) and reports:

``validity``
    for each kind, ``--answers`` answers sampled at ``--temperature`` (seeds 0, 1, ...; up to
    ``--batch`` decoded together): a JSON schema (an invented person), any JSON object, a regular
    expression (a time ``HH:MM``) and a tool call (one of two tools, the generic
    ``<tool_call>`` format). An answer is *valid* when it parses and validates independently of
    the grammar library (``json`` + ``jsonschema``, ``re.fullmatch``); *complete* when it ended by
    itself (``stop``) rather than at ``--max-new-tokens`` (an answer cut there is what was
    generated, a valid prefix, and is counted apart).
``decode tokens/s``
    the engine's own per-turn decode rate (mean over the turns), the schema-constrained prompt
    with and without its constraint, at batch 1 (``--speed-turns`` turns one after another) and
    batch ``--batch`` (that many at once), and the ratio (the goal: constrained >= 0.9 x free).
``mask per token``
    filling one row's mask and advancing its matcher with the sampled token, median over the
    tokens of a valid answer (what a constrained row adds to a step).
``compile``
    the grammar library's view of the vocabulary (once per model), a schema compiled cold (a
    new schema each time) and cached (the same one again: the LRU cache by schema hash).

Run ``streaming-llm bench structured --help``; the machine it runs on is shared, so the speed
figures move by 10-20 % from run to run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
from typing import Any

from .models import add_model_arguments

PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "London", "Tokyo", "Lima", "Cairo"]},
        "likes_tea": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "likes_tea"],
    "additionalProperties": False,
}
TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]"
TOOLS: tuple[dict[str, Any], ...] = (
    {"name": "get_weather", "description": "The weather in a city",
     "parameters": {"type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 20},
                                   "unit": {"enum": ["celsius", "fahrenheit"]}},
                    "required": ["city", "unit"], "additionalProperties": False}},
    {"name": "add", "description": "Add two numbers",
     "parameters": {"type": "object",
                    "properties": {"a": {"type": "integer", "minimum": -999, "maximum": 999},
                                   "b": {"type": "integer", "minimum": -999, "maximum": 999}},
                    "required": ["a", "b"], "additionalProperties": False}},
)
TOOL_SYSTEM = (
    "You can call these tools:\n" + "\n".join(json.dumps(t) for t in TOOLS)
    + "\nTo call one, write <tool_call>\n{\"name\": ..., \"arguments\": {...}}\n</tool_call>")
KINDS = ("schema", "object", "regex", "tool")
PROMPTS = {
    "schema": (None, "Invent a person: their name, age, city and whether they like tea."),
    "object": (None, "Describe today's weather in Paris as a small JSON object."),
    "regex": (None, "What time does the bakery open? Answer with the time only."),
    "tool": (TOOL_SYSTEM, "What is the weather like in Oslo?"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--answers", type=int, default=50, help="sampled answers per kind (50)")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="answer length cap (64)")
    parser.add_argument("--batch", type=int, default=8,
                        help="answers decoded together, and the batch of the speed test (8)")
    parser.add_argument("--speed-turns", type=int, default=4,
                        help="turns per speed figure at batch 1 (4)")
    parser.add_argument("--compiles", type=int, default=5,
                        help="schemas compiled cold, and cached (5)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared machine more threads wait on each "
                             "other; 0 = torch's default)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def constraint_of(kind: str) -> Any:
    from ..engines.base import Constraint

    return {"schema": Constraint("json_schema", schema=PERSON),
            "object": Constraint("json_object"),
            "regex": Constraint("regex", pattern=TIME),
            "tool": Constraint("tool_calls", tools=TOOLS, parallel=False)}[kind]


def valid(kind: str, text: str) -> bool:
    """Whether ``text`` is a valid answer of ``kind``, checked without the grammar library."""
    import jsonschema

    try:
        if kind == "regex":
            return re.fullmatch(TIME, text) is not None
        if kind == "tool":
            from ..engines.constraints import parse_tool_calls

            before, calls = parse_tool_calls(text)
            if before or len(calls) != 1:
                return False
            tool = next((t for t in TOOLS if t["name"] == calls[0].name), None)
            if tool is None:
                return False
            jsonschema.validate(calls[0].arguments, tool["parameters"])
            return True
        value = json.loads(text)
        if kind == "schema":
            jsonschema.validate(value, PERSON)
        return isinstance(value, dict)
    except (ValueError, jsonschema.ValidationError):
        return False


async def _turn(engine: Any, key: str, kind: str, constraint: Any, seed: int, temperature: float,
                max_new: int) -> tuple[str, Any]:
    from ..engines.base import ChatMessage, EngineRequest, Finished, GenerationOptions, TextChunk

    system, question = PROMPTS[kind]
    messages = ([ChatMessage("system", system)] if system else []) + [ChatMessage("user",
                                                                                  question)]
    request = EngineRequest(request_id=key, conversation_id=key, messages=messages,
                            options=GenerationOptions(temperature=temperature, seed=seed),
                            max_new_tokens=max_new, constraint=constraint)
    pieces: list[str] = []
    finished = None
    async for chunk in engine.stream(request):
        if isinstance(chunk, TextChunk):
            pieces.append(chunk.text)
        elif isinstance(chunk, Finished):
            finished = chunk
    engine.forget(key)
    return "".join(pieces), finished


async def _many(engine: Any, kind: str, constraint: Any, seeds: range, args: argparse.Namespace,
                tag: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for start in range(seeds.start, seeds.stop, args.batch):
        group = range(start, min(start + args.batch, seeds.stop))
        out += await asyncio.gather(*(
            _turn(engine, f"{tag}-{kind}-{s}", kind, constraint, s, args.temperature,
                  args.max_new_tokens) for s in group))
    return out


def _rate(results: list[tuple[str, Any]]) -> float:
    rates = [f.usage.decode_tokens_per_s for _, f in results if f.usage.decode_tokens_per_s]
    return statistics.mean(rates) if rates else 0.0


async def _measure(args: argparse.Namespace, kinds: list[str], log: Any) -> dict[str, Any]:
    from ..engines.base import Constraint
    from ..engines.constraints import advance, fill_masks
    from ..engines.local import LocalEngine
    from ..settings import Settings

    engine = LocalEngine(Settings.from_env(engine="local", model=args.model,
                                           models_dir=args.models_dir, dtype="float32",
                                           max_batch=args.batch, log_level="warning",
                                           compile=False))  # no compile beside the timings
    await engine.start()
    name = (await engine.health()).model
    grammars = engine.grammars
    assert grammars is not None
    figures: dict[str, Any] = {"model": name, "answers": args.answers,
                               "temperature": args.temperature,
                               "max_new_tokens": args.max_new_tokens, "batch": args.batch}
    try:
        # -- compile: the vocabulary once, then schemas cold and cached ----------------------
        started = time.perf_counter()
        grammars.check(Constraint("json_object"))
        figures["vocabulary_s"] = time.perf_counter() - started
        cold: list[float] = []
        cached: list[float] = []
        for i in range(args.compiles):
            schema = {**PERSON, "properties": {**PERSON["properties"],
                                               f"field_{i}_{time.time_ns()}": {"type": "string"}}}
            for times in (cold, cached):
                started = time.perf_counter()
                grammars.state(Constraint("json_schema", schema=schema))
                times.append(time.perf_counter() - started)
        figures["compile_cold_ms"] = statistics.median(cold) * 1e3
        figures["compile_cached_ms"] = statistics.median(cached) * 1e3
        log(f"compile: vocabulary {figures['vocabulary_s']:.2f} s, schema cold "
            f"{figures['compile_cold_ms']:.1f} ms, cached {figures['compile_cached_ms']:.3f} ms")

        # -- validity ------------------------------------------------------------------------
        validity: dict[str, Any] = {}
        for kind in kinds:
            started = time.perf_counter()
            results = await _many(engine, kind, constraint_of(kind), range(args.answers), args,
                                  "v")
            complete = [t for t, f in results if f.reason == "stop"]
            validity[kind] = {
                "answers": len(results), "complete": len(complete),
                "valid": sum(valid(kind, t) for t in complete),
                "example": complete[0] if complete else results[0][0]}
            log(f"{kind}: {validity[kind]['valid']}/{len(complete)} complete answers valid, "
                f"{len(results) - len(complete)} cut at max tokens "
                f"({time.perf_counter() - started:.0f} s)")
        figures["validity"] = validity

        # -- mask cost per token -------------------------------------------------------------
        example = validity.get("schema", {}).get("example") or json.dumps(
            {"name": "Ada", "age": 36, "city": "London", "likes_tea": True})
        state = grammars.state(constraint_of("schema"))
        costs = []
        assert engine.prompts is not None
        for token in engine.prompts.encode_text(example):
            started = time.perf_counter()
            fill_masks([state], grammars.vocab)
            advance([state], [token])
            costs.append(time.perf_counter() - started)
        figures["mask_us_per_token"] = statistics.median(costs) * 1e6

        # -- speed: the schema prompt with and without its constraint ------------------------
        speed: dict[str, Any] = {}
        for batch in sorted({1, args.batch}):
            row = {}
            for label, constraint in (("free", None), ("constrained", constraint_of("schema"))):
                turns = args.speed_turns if batch == 1 else batch
                seeds = range(100, 100 + turns)
                saved, args.batch = args.batch, batch
                try:
                    results = await _many(engine, "schema", constraint, seeds, args, "s")
                finally:
                    args.batch = saved
                row[label] = _rate(results)
            row["ratio"] = row["constrained"] / row["free"] if row["free"] else 0.0
            speed[str(batch)] = row
            log(f"batch {batch}: free {row['free']:.1f}, constrained {row['constrained']:.1f} "
                f"tokens/s per turn ({row['ratio']:.2f}x)")
        figures["speed"] = speed
    finally:
        await engine.close()
    return figures


def run(args: argparse.Namespace) -> int:
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or set(kinds) - set(KINDS):
        print(f"streaming-llm bench structured: --kinds takes {', '.join(KINDS)}, got "
              f"{args.kinds!r}", file=sys.stderr)
        return 2
    if args.answers < 1 or args.batch < 1 or args.speed_turns < 1 or args.compiles < 1:
        print("streaming-llm bench structured: --answers, --batch, --speed-turns and --compiles "
              "must be >= 1", file=sys.stderr)
        return 2
    if not 0 <= args.temperature <= 2 or args.max_new_tokens < 1:
        print("streaming-llm bench structured: --temperature must be in 0..2, "
              "--max-new-tokens >= 1", file=sys.stderr)
        return 2
    try:
        import jsonschema  # noqa: F401 - the answers are checked without the grammar library
    except ImportError:
        print("streaming-llm bench structured: needs jsonschema (pip install jsonschema)",
              file=sys.stderr)
        return 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    figures = asyncio.run(_measure(args, kinds, log))
    print(json.dumps(figures, indent=2) if args.json else _table(figures))
    return 0


def _table(f: dict[str, Any]) -> str:
    lines = [f"model {f['model']}, temperature {f['temperature']}, answers of at most "
             f"{f['max_new_tokens']} tokens, batch {f['batch']}", "",
             "| kind | answers | complete | valid (of complete) |", "|---|---|---|---|"]
    for kind, v in f["validity"].items():
        share = 100 * v["valid"] / v["complete"] if v["complete"] else 0
        lines.append(f"| {kind} | {v['answers']} | {v['complete']} | {v['valid']} "
                     f"({share:.0f} %) |")
    lines += ["", "| batch | free tokens/s | constrained tokens/s | ratio |", "|---|---|---|---|"]
    for batch, s in f["speed"].items():
        lines.append(f"| {batch} | {s['free']:.1f} | {s['constrained']:.1f} | "
                     f"{s['ratio']:.2f} |")
    lines += ["", f"mask + advance per token: {f['mask_us_per_token']:.0f} µs (median); "
              f"vocabulary view {f['vocabulary_s']:.2f} s once; schema compile cold "
              f"{f['compile_cold_ms']:.1f} ms, cached {f['compile_cached_ms']:.3f} ms"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streaming_llm.bench.structured",
                                     description=(__doc__ or "").splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
