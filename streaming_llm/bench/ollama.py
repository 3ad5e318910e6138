"""Ollama proxy overhead: tokens/s through the service vs. straight from Ollama, and added latency.

A fake Ollama (``streaming_llm.testing.fake_ollama``, its own process) streams N tokens as fast as
it can. In the same run, alternating round by round, we time

- **direct**: a client posting ``/api/chat`` to the fake and reading its NDJSON itself, and
- **service**: a socket client → a real ``streaming-llm serve`` process (engine ``ollama``, own
  process, loopback port) → the same fake,

each answer from sending the request: the streaming rate of each path (tokens/s from the first
token to the last, so the first-token latency is not counted twice) and its first-token latency.
Each round runs both paths back to back, so the ratio (goal ≥ 0.9) and the added first-token
latency (goal < 5 ms; it includes storing the user turn before generation starts) are taken per
round and the medians over rounds reported, which keeps slow drifts in machine load out of them. Three processes share the
machine's cores, so on a small or busy machine the ratio measures the machine as much as the
service; the 1-minute load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import msgspec

from ..testing.server import child_env, start_server, stop

RATIO_GOAL = 0.9
ADDED_FIRST_TOKEN_GOAL_MS = 5.0
AGENT = {"name": "Bench", "system_prompt": "You are a benchmark.", "markdown_context": ""}
MODEL = "llama3.2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=5000, help="tokens per answer (default 5000)")
    parser.add_argument("--rounds", type=int, default=15, help="measured rounds (default 15)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first (default 2)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a goal is missed (ratio >= 0.9, added first token < 5 ms)")


@dataclass
class Sample:
    tokens: int
    first_token_ms: float  # request sent → first token
    last_token_ms: float  # request sent → last token
    total_ms: float  # request sent → end of the answer (done)
    start_ms: float | None = None  # service only: request sent → `start` (user turn stored)

    @property
    def tokens_per_s(self) -> float:
        """Streaming rate: tokens after the first over the time from the first to the last."""
        return (self.tokens - 1) / max(1e-9, (self.last_token_ms - self.first_token_ms) / 1000)


@dataclass
class PathFigures:
    tokens_per_s: float
    first_token_ms: float
    total_ms: float
    start_event_ms: float | None = None

    @classmethod
    def median(cls, samples: list[Sample]) -> PathFigures:
        starts = [s.start_ms for s in samples if s.start_ms is not None]
        return cls(tokens_per_s=round(statistics.median(s.tokens_per_s for s in samples), 1),
                   first_token_ms=round(statistics.median(s.first_token_ms for s in samples), 3),
                   total_ms=round(statistics.median(s.total_ms for s in samples), 2),
                   start_event_ms=round(statistics.median(starts), 3) if starts else None)


class _Piece(msgspec.Struct):
    content: str = ""


class _Line(msgspec.Struct):
    message: _Piece | None = None
    done: bool = False


_line_decoder = msgspec.json.Decoder(_Line)


def run(args: argparse.Namespace) -> int:
    if args.tokens < 2 or args.rounds < 1 or args.warmup < 0:
        print("streaming-llm bench ollama: --tokens must be >= 2, --rounds >= 1, --warmup >= 0",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-ollama-") as tmp, \
            _fake_ollama(args.tokens) as fake_url, \
            _service(Path(tmp), fake_url, args.tokens) as (base_url, service_pid):
        direct, service, service_cpu_s = asyncio.run(
            _measure(fake_url, base_url, service_pid, args))
    figures = {
        "tokens": args.tokens,
        "rounds": args.rounds,
        "direct": asdict(PathFigures.median(direct)),
        "service": asdict(PathFigures.median(service)),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
        # the service process's CPU time per streamed token: its own cost, whatever the load
        "service_cpu_us_per_token": (None if service_cpu_s is None else
                                     round(service_cpu_s / (args.rounds * args.tokens) * 1e6, 2)),
    }
    pairs = list(zip(direct, service, strict=True))
    ratio = round(statistics.median(s.tokens_per_s / d.tokens_per_s for d, s in pairs), 3)
    added = round(statistics.median(s.first_token_ms - d.first_token_ms for d, s in pairs), 3)
    figures.update(
        throughput_ratio=ratio, added_first_token_ms=added,
        goals={"throughput_ratio": f">= {RATIO_GOAL}",
               "added_first_token_ms": f"< {ADDED_FIRST_TOKEN_GOAL_MS}"},
        met={"throughput_ratio": ratio >= RATIO_GOAL,
             "added_first_token_ms": added < ADDED_FIRST_TOKEN_GOAL_MS},
    )
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(_table(figures))
    return 1 if args.check and not all(figures["met"].values()) else 0


def _table(f: dict) -> str:
    d, s = f["direct"], f["service"]
    ratio_ok = "met" if f["met"]["throughput_ratio"] else "MISSED"
    latency_ok = "met" if f["met"]["added_first_token_ms"] else "MISSED"
    rows = [
        (f"ollama proxy: {f['tokens']} tokens per answer, median of {f['rounds']} rounds "
         f"({f['cpu_count']} cores, load average {f['load_average_1m']})"),
        "",
        f"{'path':<34}{'tokens/s':>12}{'first token ms':>16}{'total ms':>11}",
        (f"{'direct (client reads fake NDJSON)':<34}{d['tokens_per_s']:>12.0f}"
         f"{d['first_token_ms']:>16.2f}{d['total_ms']:>11.1f}"),
        (f"{'service (socket → serve → fake)':<34}{s['tokens_per_s']:>12.0f}"
         f"{s['first_token_ms']:>16.2f}{s['total_ms']:>11.1f}"),
        "",
        "medians over rounds of the per-round figures:",
        (f"throughput ratio service/direct  {f['throughput_ratio']:.3f}      "
         f"goal >= {RATIO_GOAL}   {ratio_ok}"),
        (f"added first-token latency        {f['added_first_token_ms']:.2f} ms   "
         f"goal < {ADDED_FIRST_TOKEN_GOAL_MS:g} ms   {latency_ok}"),
        (f"  of which before the engine: the `start` event (user turn stored) came after "
         f"{s['start_event_ms']:.2f} ms"),
        (f"service CPU per streamed token   {f['service_cpu_us_per_token']} µs "
         "(its own cost, independent of machine load)"),
    ]
    return "\n".join(rows)


# --- measuring ----------------------------------------------------------------------------------
async def _measure(fake_url: str, base_url: str, service_pid: int, args: argparse.Namespace,
                   ) -> tuple[list[Sample], list[Sample], float | None]:
    ws_url = base_url.replace("http://", "ws://") + "/ws/chat"
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{base_url}/agents/bench", json=AGENT) as resp:
            resp.raise_for_status()
        async with http.ws_connect(ws_url, max_msg_size=0) as ws:
            direct: list[Sample] = []
            service: list[Sample] = []
            service_cpu: float | None = 0.0
            for i in range(args.warmup + args.rounds):
                # alternate which path goes first so neither always runs on a warmer machine
                order = [("direct", direct), ("service", service)]
                for name, samples in order if i % 2 == 0 else reversed(order):
                    if name == "direct":
                        sample = await _direct(http, fake_url, args.tokens, i)
                    else:
                        cpu_before = _cpu_seconds(service_pid)
                        sample = await _through_service(ws, args.tokens, i)
                        cpu_after = _cpu_seconds(service_pid)
                        if i >= args.warmup and service_cpu is not None:
                            if cpu_before is None or cpu_after is None:
                                service_cpu = None
                            else:
                                service_cpu += cpu_after - cpu_before
                    if sample.tokens != args.tokens:
                        raise RuntimeError(f"{name}: got {sample.tokens} tokens, "
                                           f"expected {args.tokens}")
                    if i >= args.warmup:
                        samples.append(sample)
    return direct, service, service_cpu


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux ``/proc``; None elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _direct(http: aiohttp.ClientSession, fake_url: str, tokens: int, i: int) -> Sample:
    body = {"model": MODEL, "stream": True, "keep_alive": "5m", "options": {"num_predict": tokens},
            "messages": [{"role": "system", "content": AGENT["system_prompt"]},
                         {"role": "user", "content": f"round {i}"}]}
    count = 0
    first = last = 0.0
    started = time.perf_counter()
    async with http.post(f"{fake_url}/api/chat", json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:  # aiohttp's own line reader
            line = _line_decoder.decode(raw)
            if line.message is not None and line.message.content:
                last = time.perf_counter()
                if not count:
                    first = last
                count += 1
            if line.done:
                break
        ended = time.perf_counter()
    return Sample(count, (first - started) * 1000, (last - started) * 1000,
                  (ended - started) * 1000)


async def _through_service(ws: aiohttp.ClientWebSocketResponse, tokens: int, i: int) -> Sample:
    frame = {"type": "chat", "agent_id": "bench", "message": f"round {i}", "request_id": f"b{i}",
             "options": {"max_new_tokens": tokens}}
    count = 0
    first = last = 0.0
    start_ms: float | None = None
    started = time.perf_counter()
    await ws.send_str(json.dumps(frame))
    while True:
        event = json.loads(await ws.receive_str())
        kind = event["type"]
        if kind == "token":
            last = time.perf_counter()
            if not count:
                first = last
            count += event.get("count", 1)  # pieces that came while the last frame went out
        elif kind == "start":
            start_ms = (time.perf_counter() - started) * 1000
        elif kind == "done":
            break
        elif kind == "error":
            raise RuntimeError(f"the service answered an error: {event}")
    ended = time.perf_counter()
    return Sample(count, (first - started) * 1000, (last - started) * 1000,
                  (ended - started) * 1000, start_ms)


# --- processes ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _fake_ollama(tokens: int) -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "streaming_llm.testing.fake_ollama", "--tokens", str(tokens)],
        stdout=subprocess.PIPE, env=child_env())
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().decode().strip()
        if not url.startswith("http://"):
            raise RuntimeError(f"the fake Ollama did not start (exit code {proc.poll()})")
        yield url
    finally:
        stop(proc)
        if proc.stdout is not None:
            proc.stdout.close()


@contextlib.contextmanager
def _service(tmp: Path, fake_url: str, tokens: int) -> Iterator[tuple[str, int]]:
    env = {
        "STREAMING_LLM_ENGINE": "ollama", "STREAMING_LLM_OLLAMA_URL": fake_url,
        "STREAMING_LLM_OLLAMA_MODEL": MODEL, "STREAMING_LLM_LOG_LEVEL": "warning",
        "STREAMING_LLM_MAX_NEW_TOKENS": str(tokens),
        # The ceiling must admit the default, or the server refuses to start.
        "STREAMING_LLM_MAX_NEW_TOKENS_LIMIT": str(max(tokens, 4096)),
    }
    with start_server(tmp, env, log_path=tmp / "serve.log", timeout=60) as server:
        yield server.base_url, server.proc.pid


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m streaming_llm.bench.ollama",
                                      description=__doc__.split("\n\n")[0])
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
