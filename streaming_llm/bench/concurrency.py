"""Concurrency: many conversations decoding at once through the local engine's batched scheduler.

Starts ``streaming-llm serve`` with the local engine (the default model, or ``--model``) on a free
loopback port, unless ``--url`` names a running server, and talks to it over real WebSockets,
one socket and one conversation per simulated agent. For every N in ``--conversations``
(default 1,2,4,8), N fresh conversations each take a short warm-up turn, then all N send their
measured turn at once (greedy, ``--max-new-tokens``). Figures per N, from the client's clock:

* ``aggregate_tokens_per_s``: tokens after each conversation's first, over the span from the
  earliest first token to the latest last token (so it includes the prompts joining one after
  another, and the tail where answers that ended early left the batch);
* ``steady_tokens_per_s``: the token frames all N conversations received while every one of
  them was streaming (from the latest first token to the earliest last), per second: the rate
  of a full batch;
* ``per_conversation_tokens_per_s``: each conversation's own decode rate (tokens after the first
  over its first-to-last span), min and median;
* ``first_token_p50_ms`` / ``p99``: from sending the chat frame to its first token frame;
* ``batch_size``: the largest batch the server reports (``usage.batch_size``).

Then the *joiner*: N-1 conversations decode and, once all of them stream, one more conversation
sends its turn; its first-token time is compared with the same turn's alone (N = 1).

With ``--llama-batched-bench PATH``, llama.cpp's own ``llama-batched-bench`` then runs on the
GGUF file the model came from (the default model's Q4_1; see :mod:`.llama_cpp`): N sequences
decoding at once for every N, each ``--max-new-tokens`` tokens after as many prompt tokens as
our longest measured prompt, with our server's threads. Its aggregate decode rate stands in every
row (``llama_cpp_tokens_per_s``), and the ratios ours / llama.cpp (``aggregate_N_over_llama_cpp``,
``steady_N_over_llama_cpp``) and llama.cpp's own ``llama_cpp_N_over_1`` join the others. With
``--url``, ``--model`` must name the running server's model.

Goals on a 2-core machine (issue 13): aggregate(8) >= 4x aggregate(1); every conversation at
8 keeps >= 0.5x the alone rate; the joiner's first token within 2x the alone first token. The
run prints the ratios within this one run (a shared machine moves every figure; the ratios of
one run are what to quote). Run ``streaming-llm bench concurrency --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .llama_cpp import add_binary_argument, batched_bench, binary_error, model_gguf
from .load import _percentile as percentile
from .served import add_server_arguments, measure_served, server_env

SYSTEM = "You are a patient assistant who answers at length."
# Tasks whose greedy answers (penalties off) run to --max-new-tokens on the default model; each
# answer's length is reported (answer_tokens). An answer that ends early leaves the batch and the
# figures then measure fewer conversations than they say: with stories and explanations, half
# of the 8 answers ended after 13-19 tokens, and "Continue this list" after the warm-up
# turn answered with a greeting.
MESSAGES = ("Write the numbers from {n} to {m}, one per line.",)
WARM_UP = "Hello, say hi."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--conversations", default="1,2,4,8",
                        help="comma-separated numbers of conversations at once (1,2,4,8)")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="tokens per measured answer (64)")
    add_server_arguments(parser)
    parser.add_argument("--max-batch", type=int, default=0,
                        help="STREAMING_LLM_MAX_BATCH for the spawned server (0: its default)")
    parser.add_argument("--window-tokens", type=int, default=0,
                        help="STREAMING_LLM_WINDOW_TOKENS for the spawned server (0: default)")
    parser.add_argument("--quantize", default="", choices=["", "auto", "none", "fp16", "int8"],
                        help="STREAMING_LLM_QUANTIZE for the spawned server (default: auto)")
    parser.add_argument("--device", default="", choices=["", "auto", "cpu", "cuda"],
                        help="STREAMING_LLM_DEVICE for the spawned server (default: auto)")
    parser.add_argument("--dtype", default="", choices=["", "auto", "float32", "bfloat16",
                                                        "float16"],
                        help="STREAMING_LLM_DTYPE for the spawned server (default: auto)")
    add_binary_argument(parser, "llama-batched-bench",
                        "run on the model's GGUF file after ours, N sequences at once at our "
                        "prompt length, its decode tok/s and the ratios beside ours")


@dataclass
class Turn:
    sent_at: float = 0.0
    token_at: list[float] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def tokens(self) -> int:
        """Tokens generated (the server's count: one text frame may carry several tokens)."""
        return int(self.usage.get("completion_tokens") or len(self.token_at))

    @property
    def first_token_ms(self) -> float:
        return (self.token_at[0] - self.sent_at) * 1000

    @property
    def decode_tokens_per_s(self) -> float | None:
        if self.tokens < 2 or self.token_at[-1] <= self.token_at[0]:
            return None
        return (self.tokens - 1) / (self.token_at[-1] - self.token_at[0])


class Conversation:
    """One socket, one conversation: a warm-up turn, then measured turns."""

    def __init__(self, ws: Any, agent_id: str, n: int, max_new_tokens: int) -> None:
        self.ws, self.agent_id, self.n, self.max_new_tokens = ws, agent_id, n, max_new_tokens
        self.conversation_id: str | None = None
        self.streaming = asyncio.Event()  # set at the first token of the running turn

    async def turn(self, message: str, max_new_tokens: int) -> Turn:
        import msgspec

        frame: dict[str, Any] = {"type": "chat", "agent_id": self.agent_id, "message": message,
                                 "options": {"temperature": 0, "max_new_tokens": max_new_tokens,
                                             "repetition_penalty": 1.0, "min_p": 0.0}}
        if self.conversation_id:
            frame["conversation_id"] = self.conversation_id
        self.streaming.clear()
        result = Turn(sent_at=time.perf_counter())
        await self.ws.send(msgspec.json.encode(frame).decode())
        while True:
            event = msgspec.json.decode(await self.ws.recv())
            kind = event["type"]
            if kind == "token":
                result.token_at.append(time.perf_counter())
                self.streaming.set()
            elif kind == "start":
                self.conversation_id = event["conversation_id"]
            elif kind == "done":
                result.usage = event.get("usage") or {}
                return result
            elif kind == "error":
                result.error = f"{event['code']}: {event['message']}"
                self.streaming.set()
                return result

    def message(self) -> str:
        start = 1 + 37 * self.n  # every conversation its own numbers
        return MESSAGES[self.n % len(MESSAGES)].format(n=start, m=start + 300)


def _summary(n: int, turns: list[Turn]) -> dict[str, Any]:
    errors = [t.error for t in turns if t.error]
    good = [t for t in turns if not t.error and t.token_at]
    rates = [r for t in good if (r := t.decode_tokens_per_s) is not None]
    span = (max(t.token_at[-1] for t in good) - min(t.token_at[0] for t in good)) if good else 0
    after_first = sum(t.tokens - 1 for t in good)
    ttft = [t.first_token_ms for t in good]
    steady = None
    if good:
        start, end = max(t.token_at[0] for t in good), min(t.token_at[-1] for t in good)
        if end > start:
            frames = sum(1 for t in good for at in t.token_at if start < at <= end)
            steady = round(frames / (end - start), 2)
    return {
        "conversations": n,
        "tokens": sum(t.tokens for t in good),
        # The context each answer decoded after (llama-batched-bench's -npp, beside ours).
        "prompt_tokens": max((int(t.usage.get("prompt_tokens") or 0) for t in good), default=0),
        "answer_tokens": sorted(t.tokens for t in good),
        "aggregate_tokens_per_s": round(after_first / span, 2) if span > 0 else None,
        "steady_tokens_per_s": steady,
        "per_conversation_min_tokens_per_s": round(min(rates), 2) if rates else None,
        "per_conversation_median_tokens_per_s": round(statistics.median(rates), 2) if rates else None,
        "first_token_p50_ms": round(percentile(ttft, 0.5), 1),
        "first_token_p99_ms": round(percentile(ttft, 0.99), 1),
        "batch_size": max((int(t.usage.get("batch_size") or 0) for t in good), default=0),
        "errors": errors,
    }


async def _open(ws_url: str, count: int, agent_id: str, start: int, max_new: int,
                stack: Any) -> list[Conversation]:
    from websockets.asyncio.client import connect

    conversations = []
    for i in range(count):
        ws = await stack.enter_async_context(connect(ws_url, max_size=None, ping_interval=None))
        conversations.append(Conversation(ws, agent_id, start + i, max_new))
    # Warm-up turns one after another: each conversation holds its cache (and the agent's
    # prefix) before the measured turns.
    for c in conversations:
        warm = await c.turn(WARM_UP, 4)
        if warm.error:
            raise RuntimeError(f"warm-up turn failed: {warm.error}")
    return conversations


async def _measure(base_url: str, args: argparse.Namespace, sizes: list[int],
                   log: Any) -> dict[str, Any]:
    import contextlib

    import aiohttp

    agent_id = "concurrency-bench"
    async with aiohttp.ClientSession() as http:
        agent = {"name": "Bench", "system_prompt": SYSTEM, "markdown_context": ""}
        async with http.put(f"{base_url}/agents/{agent_id}", json=agent) as resp:
            resp.raise_for_status()
    ws_url = base_url.replace("http", "ws", 1) + "/ws/chat"
    rows, start = [], 0
    for n in sizes:
        async with contextlib.AsyncExitStack() as stack:
            conversations = await _open(ws_url, n, agent_id, start, args.max_new_tokens, stack)
            start += n
            turns = await asyncio.gather(*(c.turn(c.message(), args.max_new_tokens)
                                           for c in conversations))
        row = _summary(n, list(turns))
        log(f"{n} conversation(s): aggregate {row['aggregate_tokens_per_s']} tokens/s, "
            f"per conversation min {row['per_conversation_min_tokens_per_s']}, first token p50 "
            f"{row['first_token_p50_ms']} ms, batch {row['batch_size']}")
        rows.append(row)

    joiner: dict[str, Any] = {}
    most = max(sizes)
    if most > 1:
        async with contextlib.AsyncExitStack() as stack:
            alone = (await _open(ws_url, 1, agent_id, start, args.max_new_tokens, stack))[0]
            start += 1
            alone_turn = await alone.turn(alone.message(), args.max_new_tokens)
            others = await _open(ws_url, most - 1, agent_id, start, args.max_new_tokens, stack)
            start += most - 1
            # The same conversation, the same kind of turn, now arriving while the others decode.
            running = [asyncio.ensure_future(c.turn(c.message(), 4 * args.max_new_tokens))
                       for c in others]
            await asyncio.gather(*(c.streaming.wait() for c in others))
            joined_turn = await alone.turn(alone.message(), args.max_new_tokens)
            still = sum(1 for task in running if not task.done())
            await asyncio.gather(*running)
        joiner = {"decoding_when_joined": still,
                  "alone_first_token_ms": round(alone_turn.first_token_ms, 1),
                  "joined_first_token_ms": round(joined_turn.first_token_ms, 1),
                  "ratio": round(joined_turn.first_token_ms / alone_turn.first_token_ms, 2),
                  "errors": [t.error for t in (alone_turn, joined_turn) if t.error]}
        log(f"joiner: first token alone {joiner['alone_first_token_ms']} ms, while {still} "
            f"decode {joiner['joined_first_token_ms']} ms")
    return {"rows": rows, "joiner": joiner, "ratios": _ratios(rows, joiner)}


def _ratios(rows: list[dict[str, Any]], joiner: dict[str, Any]) -> dict[str, Any]:
    by_n = {row["conversations"]: row for row in rows}
    if 1 not in by_n or not by_n[1]["aggregate_tokens_per_s"]:
        return {}
    alone = by_n[1]
    out: dict[str, Any] = {}
    for n, row in by_n.items():
        if n == 1 or not row["aggregate_tokens_per_s"]:
            continue
        out[f"aggregate_{n}_over_1"] = round(row["aggregate_tokens_per_s"]
                                             / alone["aggregate_tokens_per_s"], 2)
        if row["steady_tokens_per_s"] and alone["steady_tokens_per_s"]:
            out[f"steady_{n}_over_1"] = round(row["steady_tokens_per_s"]
                                              / alone["steady_tokens_per_s"], 2)
        out[f"per_conversation_min_{n}_over_1"] = round(
            row["per_conversation_min_tokens_per_s"] / alone["per_conversation_min_tokens_per_s"], 2)
    if joiner:
        out["joiner_first_token_over_alone"] = joiner["ratio"]
    return out


def _table(figures: dict[str, Any]) -> str:
    peer = figures.get("llama_cpp")
    beside = (" llama.cpp tok/s | aggregate ÷ llama.cpp |", "---|---|") if peer else ("", "")
    lines = ["| conversations | aggregate tok/s | all streaming tok/s | per conversation tok/s "
             "(min / median) | first token p50 / p99 ms | batch |" + beside[0],
             "|---|---|---|---|---|---|" + beside[1]]
    for r in figures["rows"]:
        n = r["conversations"]
        theirs = (f" {r['llama_cpp_tokens_per_s']} | "
                  f"{figures['ratios'].get(f'aggregate_{n}_over_llama_cpp', '-')} |"
                  if peer else "")
        lines.append(f"| {n} | {r['aggregate_tokens_per_s']} | "
                     f"{r['steady_tokens_per_s']} | "
                     f"{r['per_conversation_min_tokens_per_s']} / "
                     f"{r['per_conversation_median_tokens_per_s']} | {r['first_token_p50_ms']} / "
                     f"{r['first_token_p99_ms']} | {r['batch_size']} |" + theirs)
    if peer:
        lines.append(f"\nllama.cpp: llama-batched-bench on {Path(peer['gguf']).name}, N "
                     f"sequences of {peer['prompt_tokens']} prompt + {peer['max_new_tokens']} "
                     f"tokens at once, {peer['threads']} threads (decode tok/s of all N)")
    lines.append("\nanswer lengths (tokens; shorter than --max-new-tokens = ended early and left "
                 "the batch): " + "; ".join(f"{r['conversations']}: {r.get('answer_tokens')}"
                                             for r in figures["rows"]))
    j = figures["joiner"]
    if j:
        lines.append(f"\njoiner: first token alone {j['alone_first_token_ms']} ms, arriving while "
                     f"{j['decoding_when_joined']} decode {j['joined_first_token_ms']} ms "
                     f"({j['ratio']}x)")
    for key, value in figures["ratios"].items():
        lines.append(f"{key}: {value}")
    return "\n".join(lines)


def _server_env(args: argparse.Namespace) -> dict[str, str]:
    env = server_env(args) | {"STREAMING_LLM_MAX_CONCURRENT_GENERATIONS": "64"}
    if args.max_batch:
        env["STREAMING_LLM_MAX_BATCH"] = str(args.max_batch)
    if args.window_tokens:
        env["STREAMING_LLM_WINDOW_TOKENS"] = str(args.window_tokens)
    if args.quantize:
        env["STREAMING_LLM_QUANTIZE"] = args.quantize
    if args.device:
        env["STREAMING_LLM_DEVICE"] = args.device
    if args.dtype:
        env["STREAMING_LLM_DTYPE"] = args.dtype
    return env


def run(args: argparse.Namespace) -> int:
    try:
        sizes = sorted({int(x) for x in args.conversations.split(",") if x.strip()})
    except ValueError:
        print(f"--conversations: not a list of numbers: {args.conversations!r}", file=sys.stderr)
        return 2
    if not sizes or sizes[0] < 1:
        print("--conversations: numbers must be >= 1", file=sys.stderr)
        return 2

    gguf = None
    if args.llama_batched_bench is not None:
        if error := binary_error(args.llama_batched_bench, "llama-batched-bench"):
            print(error, file=sys.stderr)
            return 2
        gguf = model_gguf(args.model)
        if gguf is None or not gguf.is_file():
            print(f"--llama-batched-bench runs on the model's GGUF file: --model {args.model!r} "
                  "is none (the default model is one)", file=sys.stderr)
            return 2

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    figures = measure_served(args, _server_env(args), "concurrency",
                             lambda base_url: _measure(base_url, args, sizes, log))
    failed = any(r["errors"] for r in figures["rows"]) or bool(figures["joiner"].get("errors"))
    if gguf is not None:
        # After ours, with our server stopped: the two never share the CPU.
        try:
            _beside_llama_cpp(figures, args.llama_batched_bench, gguf, args, sizes, log)
        except (subprocess.CalledProcessError, ValueError) as exc:
            log(f"llama-batched-bench failed: {getattr(exc, 'stderr', None) or exc}")
            failed = True
    print(json.dumps(figures, indent=2) if args.json else _table(figures))
    return 1 if failed else 0


def _beside_llama_cpp(figures: dict[str, Any], binary: Path, gguf: Path,
                      args: argparse.Namespace, sizes: list[int], log: Any) -> None:
    """llama-batched-bench on ``gguf``: N sequences at once for every N of ours, each decoding
    ``--max-new-tokens`` after as many prompt tokens as our longest measured prompt, with the
    threads our server had; its aggregate decode rate goes into every row
    (``llama_cpp_tokens_per_s``) and the ratios."""
    import torch  # torch's default thread count is the spawned server's when --threads is 0

    prompt = max(row["prompt_tokens"] for row in figures["rows"]) or 1
    threads = args.threads or torch.get_num_threads()
    log(f"llama-batched-bench: {gguf.name}, {prompt} prompt + {args.max_new_tokens} tokens, "
        f"{threads} threads")
    peer = batched_bench(binary, gguf, prompt=prompt, generate=args.max_new_tokens,
                         parallel=sizes, threads=threads)
    figures["llama_cpp"] = {"gguf": str(gguf), "prompt_tokens": prompt,
                            "max_new_tokens": args.max_new_tokens, "threads": threads,
                            "rows": {str(n): row for n, row in peer.items()}}
    for row in figures["rows"]:
        row["llama_cpp_tokens_per_s"] = peer[row["conversations"]]["decode_tokens_per_s"]
    figures["ratios"].update(_llama_cpp_ratios(figures["rows"]))


def _llama_cpp_ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Ours over llama.cpp's at every N (aggregate and all streaming), and llama.cpp's own N
    over 1 (the scaling ours is held to)."""
    out: dict[str, float] = {}
    alone = next((r["llama_cpp_tokens_per_s"] for r in rows if r["conversations"] == 1), None)
    for row in rows:
        n, theirs = row["conversations"], row["llama_cpp_tokens_per_s"]
        for key in ("aggregate", "steady"):
            if row[f"{key}_tokens_per_s"] and theirs:
                out[f"{key}_{n}_over_llama_cpp"] = round(row[f"{key}_tokens_per_s"] / theirs, 2)
        if n != 1 and alone and theirs:
            out[f"llama_cpp_{n}_over_1"] = round(theirs / alone, 2)
    return out


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="streaming-llm bench concurrency", description=__doc__)
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
