"""Sampling defaults by measurement: repetition loops and an agent's facts, per setting.

Small models such as the default (SmolLM2-135M-Instruct) fall into repetition loops even at
temperature 0.2. This benchmark runs the real local engine (its decode loop, its sampler, its
penalty window of the answer's last ``PENALTY_WINDOW`` tokens) over a few open-ended prompts and
the agent-facts questions of ``bench quality``, at each ``--temperatures`` and for each
``--settings`` (repetition penalty and min-p; everything else at the engine's defaults), and
reports per temperature and setting:

``repeated 4-grams``
    of the answer's token 4-grams, the fraction that already occurred earlier in the same answer
    (mean over the prompts): 0 for text that never repeats itself, near 1 for a loop.
``longest loop``
    the longest stretch of answer tokens each equal to the token ``p`` places before it, for the
    best period ``p`` <= 32: a loop of period ``p`` repeated ``k`` times is ``(k - 1) * p`` long
    (the longest over the prompts).
``stopped``
    answers that ended by themselves (end-of-sequence) rather than at ``--max-new-tokens``.
``facts``
    the agent's four facts (in its Markdown context) asked one question each in a fresh
    conversation: answers that contain the fact.
``knowledge``
    a few questions a new user asks first ("What is the capital of France?"), with the system
    prompt of a plain helpful agent: answers that contain the answer.

Each answer is one fresh conversation; the prompts use seed ``--seed``, so settings are compared
on the same random stream, and the short questions (facts, knowledge) are asked with each of
``--seeds`` seeds from ``--seed`` on. Run ``streaming-llm bench sampling --help``; a quick run:
``--prompts 1 --max-new-tokens 48 --temperatures 0.2``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from .models import add_model_arguments

PROMPTS = (
    "Write a long story about a dragon who learns to bake bread.",
    "List as many tips as you can for keeping a garden healthy.",
    "Explain in detail how a bicycle works.",
    "Describe a day in the life of a lighthouse keeper.",
)
KNOWLEDGE = (
    ("What is the capital of France?", "Paris"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
)
HELPER = "You are a helpful assistant."
PARTS = ("loops", "facts", "knowledge")
# name=repetition_penalty:min_p
SETTINGS = "off=1:0,rp1.05+minp=1.05:0.05,rp1.1=1.1:0,rp1.1+minp=1.1:0.05,rp1.15+minp=1.15:0.05"
MAX_PERIOD = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--temperatures", default="0.2,0.7", help="comma-separated (0.2,0.7)")
    parser.add_argument("--settings", default=SETTINGS,
                        help="comma-separated name=repetition_penalty:min_p "
                             f"(default {SETTINGS})")
    parser.add_argument("--prompts", type=int, default=3,
                        help=f"how many of the {len(PROMPTS)} open-ended prompts (3)")
    parser.add_argument("--max-new-tokens", type=int, default=96,
                        help="answer length cap for the prompts (96)")
    parser.add_argument("--answer-tokens", type=int, default=24,
                        help="answer length cap for the facts (24)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=1,
                        help="seeds per short question (facts, knowledge) (1)")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts to run, of {', '.join(PARTS)}")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared machine more threads wait on each "
                             "other; 0 = torch's default)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


# --- the loop measures --------------------------------------------------------------------------
def repeated_ngrams(ids: Sequence[int], n: int = 4) -> float:
    """The fraction of ``ids``' n-grams that already occurred earlier in ``ids`` (0 if none)."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        return 0.0
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams)


def longest_loop(ids: Sequence[int], max_period: int = MAX_PERIOD) -> int:
    """The longest run of tokens each equal to the token ``p`` before it, best ``p`` <= max."""
    best = 0
    for p in range(1, max_period + 1):
        run = 0
        for i in range(p, len(ids)):
            run = run + 1 if ids[i] == ids[i - p] else 0
            best = max(best, run)
    return best


def parse_settings(text: str) -> list[tuple[str, float, float]]:
    """``name=repetition_penalty:min_p,...`` as (name, repetition_penalty, min_p) triples."""
    out = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        try:
            name, values = item.split("=", 1)
            penalty, min_p = (float(v) for v in values.split(":", 1))
        except ValueError:
            raise ValueError(f"--settings: {item!r} is not name=repetition_penalty:min_p") from None
        if not (0.5 <= penalty <= 2 and 0 <= min_p <= 1):
            raise ValueError(f"--settings: {item!r}: repetition_penalty must be in 0.5..2, "
                             "min_p in 0..1")
        out.append((name, penalty, min_p))
    if not out:
        raise ValueError("--settings is empty")
    return out


# --- the run ------------------------------------------------------------------------------------
async def _answer(engine: Any, conversation: str, messages: list[tuple[str, str]],
                  options: Any) -> tuple[str, str]:
    """One fresh conversation's answer through the engine: (text, finish reason)."""
    from ..engines.base import ChatMessage, EngineRequest, Finished, TextChunk

    request = EngineRequest(
        request_id=conversation, conversation_id=conversation,
        messages=[ChatMessage(role=r, content=c) for r, c in messages],  # type: ignore[arg-type]
        options=options, max_new_tokens=options.max_new_tokens)
    text: list[str] = []
    reason = ""
    async for chunk in engine.stream(request):
        if isinstance(chunk, TextChunk):
            text.append(chunk.text)
        elif isinstance(chunk, Finished):
            reason = chunk.reason
    engine.forget(conversation)
    return "".join(text), reason


async def _measure(args: argparse.Namespace, temperatures: list[float],
                   settings: list[tuple[str, float, float]], parts: list[str],
                   log: Any) -> dict[str, Any]:
    from ..engines.base import GenerationOptions
    from ..engines.local import LocalEngine
    from ..settings import Settings
    from .quality import FACTS, agent_system_message

    engine = LocalEngine(Settings.from_env(engine="local", model=args.model,
                                           models_dir=args.models_dir, dtype="float32",
                                           cached_conversations=1, log_level="warning",
                                           compile=False))
    await engine.start()
    name = (await engine.health()).model
    prompts = engine.prompts
    assert prompts is not None
    system = agent_system_message()
    rows: list[dict[str, Any]] = []
    try:
        for temperature in temperatures:
            for label, penalty, min_p in settings:
                started = time.perf_counter()

                def options(max_new: int, penalty: float = penalty, min_p: float = min_p,
                            seed: int = args.seed,
                            temperature: float = temperature) -> GenerationOptions:
                    return GenerationOptions(temperature=temperature, seed=seed,
                                             repetition_penalty=penalty, min_p=min_p,
                                             max_new_tokens=max_new)

                answers: list[dict[str, Any]] = []
                for i, prompt in enumerate(PROMPTS[:args.prompts] if "loops" in parts else ()):
                    text, reason = await _answer(engine, f"p{i}", [("user", prompt)],
                                                 options(args.max_new_tokens))
                    ids = prompts.encode_text(text)
                    answers.append({"prompt": prompt, "answer": text, "finish_reason": reason,
                                    "tokens": len(ids), "repeated_4grams": repeated_ngrams(ids),
                                    "longest_loop": longest_loop(ids)})
                questions = [*(("facts", system, q, e) for _, q, e in FACTS
                               if "facts" in parts),
                             *(("knowledge", HELPER, q, e) for q, e in KNOWLEDGE
                               if "knowledge" in parts)]
                checked: dict[str, list[dict[str, Any]]] = {"facts": [], "knowledge": []}
                for j, (part, prompt_system, question, expected) in enumerate(questions):
                    for seed in range(args.seed, args.seed + args.seeds):
                        text, _ = await _answer(engine, f"q{j}-{seed}",
                                                [("system", prompt_system), ("user", question)],
                                                options(args.answer_tokens, seed=seed))
                        checked[part].append({"question": question, "expected": expected,
                                              "seed": seed, "answer": text,
                                              "correct": expected.lower() in text.lower()})
                row: dict[str, Any] = {
                    "temperature": temperature, "setting": label,
                    "repetition_penalty": penalty, "min_p": min_p, "prompts": len(answers),
                }
                if answers:
                    row.update({
                        "repeated_4grams": (sum(a["repeated_4grams"] for a in answers)
                                            / len(answers)),
                        "longest_loop": max(a["longest_loop"] for a in answers),
                        "stopped": sum(a["finish_reason"] == "stop" for a in answers),
                        "answers": answers})
                for part, results in checked.items():
                    if results:
                        row[f"{part}_correct"] = sum(r["correct"] for r in results)
                        row[part] = len(results)
                        row[f"{part}_answers"] = results
                rows.append(row)
                log(f"T={temperature} {label}: {_cells(row)} "
                    f"({time.perf_counter() - started:.0f} s)")
    finally:
        await engine.close()
    return {"model": name, "seed": args.seed, "max_new_tokens": args.max_new_tokens,
            "rows": rows}


def run(args: argparse.Namespace) -> int:
    try:
        temperatures = [float(t) for t in args.temperatures.split(",") if t.strip()]
        settings = parse_settings(args.settings)
    except ValueError as exc:
        print(f"streaming-llm bench sampling: {exc}", file=sys.stderr)
        return 2
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    if not parts or set(parts) - set(PARTS):
        print(f"streaming-llm bench sampling: --only takes parts of {', '.join(PARTS)}, got "
              f"{args.only!r}", file=sys.stderr)
        return 2
    if args.seeds < 1:
        print("streaming-llm bench sampling: --seeds must be >= 1", file=sys.stderr)
        return 2
    if not 1 <= args.prompts <= len(PROMPTS):
        print(f"streaming-llm bench sampling: --prompts must be in 1..{len(PROMPTS)}",
              file=sys.stderr)
        return 2
    if not temperatures or any(not 0 <= t <= 2 for t in temperatures):
        print("streaming-llm bench sampling: --temperatures must be in 0..2", file=sys.stderr)
        return 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    figures = asyncio.run(_measure(args, temperatures, settings, parts, log))
    print(json.dumps(figures, indent=2) if args.json else _table(figures))
    return 0


def _cells(row: dict[str, Any]) -> str:
    cells = []
    if row["prompts"]:
        cells.append(f"repeated 4-grams {row['repeated_4grams']:.2f}, longest loop "
                     f"{row['longest_loop']}, stopped {row['stopped']}/{row['prompts']}")
    for part in ("facts", "knowledge"):
        if part in row:
            cells.append(f"{part} {row[f'{part}_correct']}/{row[part]}")
    return ", ".join(cells)


def _table(figures: dict[str, Any]) -> str:
    lines = [f"model {figures['model']}, seed {figures['seed']}, answers of at most "
             f"{figures['max_new_tokens']} tokens"]
    for r in figures["rows"]:
        lines.append(f"T={r['temperature']} {r['setting']} (repetition_penalty "
                     f"{r['repetition_penalty']}, min_p {r['min_p']}): {_cells(r)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streaming_llm.bench.sampling",
                                     description=(__doc__ or "").splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

