"""Load: many sockets chatting at once against a real server; latency, throughput, nothing lost.

Starts ``streaming-llm serve`` as a subprocess (echo engine, ``--echo-delay-ms`` between words,
its own temporary data directory) unless ``--url`` names a running server, then opens
``--sockets`` WebSockets that each run ``--turns`` turns back to back in one conversation. Each
message is unique (``s<socket>t<turn> w1 w2 ...``), so the echo answer is known. By default the
sockets start over ``--ramp-s`` 2 s and pause ``--think-ms`` 1 s between a ``done`` and their next
chat, as people or agents reading answers do; ``--ramp-s 0 --think-ms 0`` sends everything at
once, back to back, and so measures the server's saturation throughput instead (first-token
latency is then queueing time). ``--postgres`` stores in a throwaway PostgreSQL server
(:mod:`streaming_llm.testing.postgres`) instead of SQLite.

Figures: first-token latency (from sending the chat frame to the first ``token`` frame, as the
client sees it) p50 / p99 / max, tokens per second over the whole run, turns per second. Then
the database is read: every acknowledged turn must be stored, in order (``seq`` 0, 1, 2, ...
alternating user and assistant, contents as sent and as streamed) — ``lost`` and ``reordered``
count the turns that are not. The exit status is 0 when nothing is lost, reordered or failed;
latency goals are reported, not enforced (they depend on the machine).

Goal on a 2-core machine: 200 sockets x 5 turns, 0 lost or reordered, p99 first token < 100 ms.
Run ``streaming-llm bench load --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..testing.server import start_server

GOAL_P99_MS = 100.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sockets", type=int, default=200, help="concurrent sockets (200)")
    parser.add_argument("--turns", type=int, default=5, help="turns per socket (5)")
    parser.add_argument("--words", type=int, default=16, help="words per message = tokens per answer (16)")
    parser.add_argument("--echo-delay-ms", type=float, default=1.0,
                        help="echo engine delay between words, for the spawned server (1.0)")
    parser.add_argument("--ramp-s", type=float, default=2.0,
                        help="spread the sockets' first turns over this many seconds (2; 0: all "
                             "at once)")
    parser.add_argument("--think-ms", type=float, default=1000.0,
                        help="pause between a turn's done and the socket's next chat, as a reader "
                             "would (1000; 0: back to back, which measures saturation)")
    parser.add_argument("--url", help="use this running server (http://host:port) instead of "
                                      "spawning one; needs --db to verify storage")
    parser.add_argument("--db", type=Path, help="its SQLite file, read to verify storage")
    parser.add_argument("--postgres", action="store_true",
                        help="the spawned server stores in a throwaway PostgreSQL server "
                             "(initdb + pg_ctl; needs PostgreSQL and streaming-llm[postgres])")
    parser.add_argument("--api-key", default=os.environ.get("STREAMING_LLM_API_KEY", "").split(",")[0],
                        help="API key to send (default: the first of STREAMING_LLM_API_KEY)")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="give up after this long")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


@dataclass
class SocketResult:
    conversation_id: str | None = None
    sent: list[str] = field(default_factory=list)  # messages acknowledged with start, in order
    answers: list[str] = field(default_factory=list)  # streamed text of each turn that ended done
    first_token_ms: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)


def message_for(sock: int, turn: int, words: int) -> str:
    return " ".join([f"s{sock}t{turn}", *(f"w{i}" for i in range(1, words))])


async def _socket(n: int, ws_url: str, args: argparse.Namespace, agent_id: str,
                  delay_s: float) -> SocketResult:
    import msgspec
    from websockets.asyncio.client import connect

    result = SocketResult()
    decode = msgspec.json.decode
    if delay_s:
        await asyncio.sleep(delay_s)
    protocols = ["bearer", args.api_key] if args.api_key else None
    try:
        async with connect(ws_url, subprotocols=protocols, max_size=None,  # type: ignore[arg-type]
                           open_timeout=args.timeout_s, ping_interval=None) as ws:
            for turn in range(args.turns):
                if turn and args.think_ms:
                    await asyncio.sleep(args.think_ms / 1000)
                message = message_for(n, turn, args.words)
                frame: dict[str, Any] = {"type": "chat", "agent_id": agent_id, "message": message,
                                         "request_id": f"s{n}t{turn}"}
                if result.conversation_id:
                    frame["conversation_id"] = result.conversation_id
                sent_at = time.perf_counter()
                await ws.send(msgspec.json.encode(frame).decode())
                text, first = "", True
                while True:
                    event = decode(await ws.recv())
                    kind = event["type"]
                    if kind == "token":
                        if first:
                            result.first_token_ms.append((time.perf_counter() - sent_at) * 1000)
                            first = False
                        text += event["token"]
                        result.tokens += 1
                    elif kind == "start":
                        result.conversation_id = event["conversation_id"]
                        result.sent.append(message)
                    elif kind == "done":
                        result.answers.append(text)
                        break
                    elif kind == "error":
                        result.errors.append(f"{event['code']}: {event['message']}")
                        break
                if kind == "error":
                    break
    except Exception as exc:  # noqa: BLE001 - a failed socket is a reported figure, not a crash
        result.errors.append(f"{exc.__class__.__name__}: {exc}")
    return result


async def _drive(args: argparse.Namespace, ws_url: str, agent_id: str) -> tuple[list[SocketResult], float]:
    step = args.ramp_s / args.sockets if args.sockets else 0.0
    started = time.perf_counter()
    results = await asyncio.wait_for(
        asyncio.gather(*(_socket(n, ws_url, args, agent_id, n * step) for n in range(args.sockets))),
        args.timeout_s)
    return list(results), time.perf_counter() - started


TURNS = "SELECT seq, role, content FROM turns WHERE conversation_id = :c ORDER BY seq"


def _stored(db: Path | str, conversations: list[str]) -> dict[str, list[tuple[int, str, str]]]:
    """``(seq, role, content)`` of each conversation's turns: from a SQLite file (``Path``, read
    only) or any database by its SQLAlchemy async URL (``str``)."""
    if isinstance(db, Path):
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            return {c: conn.execute(TURNS.replace(":c", "?"), (c,)).fetchall()
                    for c in conversations}

    async def read() -> dict[str, list[tuple[int, str, str]]]:
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(db)
        try:
            async with engine.connect() as conn:
                return {c: [(r[0], r[1], r[2]) for r in await conn.execute(text(TURNS), {"c": c})]
                        for c in conversations}
        finally:
            await engine.dispose()

    return asyncio.run(read())


def verify(db: Path | str, results: list[SocketResult]) -> dict[str, int]:
    """Compare the database with what the sockets were told: stored, in order, nothing lost."""
    lost = reordered = 0
    stored_turns = _stored(db, [r.conversation_id for r in results if r.conversation_id])
    for r in results:
        if r.conversation_id is None:
            continue
        rows = stored_turns[r.conversation_id]
        expected: list[tuple[str, str]] = []
        for i, message in enumerate(r.sent):
            expected.append(("user", message))
            if i < len(r.answers):
                expected.append(("assistant", r.answers[i]))
        stored = [(role, content) for _, role, content in rows]
        lost += sum(1 for e in expected if e not in stored)
        in_order = [e for e in stored if e in expected]
        if in_order != [e for e in expected if e in stored] or [
                s for s, _, _ in rows] != list(range(len(rows))):
            reordered += 1
    return {"lost": lost, "reordered": reordered}


@contextmanager
def spawned_server(args: argparse.Namespace) -> Iterator[tuple[str, Path | str]]:
    """A ``streaming-llm serve`` subprocess on a free loopback port with its own data dir (and,
    with ``--postgres``, its own PostgreSQL server); yields its URL and its database."""
    env = {
        "STREAMING_LLM_ENGINE": "echo",
        "STREAMING_LLM_ECHO_DELAY_MS": str(args.echo_delay_ms),
        "STREAMING_LLM_LOG_LEVEL": "warning",
    }
    if args.api_key:
        env["STREAMING_LLM_API_KEY"] = args.api_key
    with contextlib.ExitStack() as stack:
        database: Path | str | None = None
        if args.postgres:
            from ..testing.postgres import postgres_server

            database = stack.enter_context(postgres_server()).create_database()
            env["STREAMING_LLM_DATABASE_URL"] = database
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="streaming-llm-load-"))
        server = stack.enter_context(start_server(Path(tmp), env))
        yield server.base_url, database or server.db_path


def _put_agent(base_url: str, api_key: str, agent_id: str) -> None:
    headers = {"content-type": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    body = json.dumps({"name": "Load", "system_prompt": "Echo."}).encode()
    req = urllib.request.Request(f"{base_url}/agents/{agent_id}", data=body, method="PUT",
                                 headers=headers)
    with urllib.request.urlopen(req, timeout=10):
        pass


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 1000) - 1]


def measure(args: argparse.Namespace, base_url: str, db_path: Path | str | None) -> dict[str, Any]:
    agent_id = "load-bench"
    _put_agent(base_url, args.api_key, agent_id)
    ws_url = base_url.replace("http", "ws", 1) + "/ws/chat"
    results, elapsed = asyncio.run(_drive(args, ws_url, agent_id))
    latencies = [ms for r in results for ms in r.first_token_ms]
    tokens = sum(r.tokens for r in results)
    turns = sum(len(r.answers) for r in results)
    figures: dict[str, Any] = {
        "sockets": args.sockets, "turns_per_socket": args.turns, "words": args.words,
        "ramp_s": args.ramp_s, "think_ms": args.think_ms,
        "echo_delay_ms": args.echo_delay_ms if not args.url else None,
        "turns_done": turns, "turns_expected": args.sockets * args.turns,
        "errors": sum(len(r.errors) for r in results),
        "first_token_p50_ms": round(_percentile(latencies, 0.5), 2),
        "first_token_p99_ms": round(_percentile(latencies, 0.99), 2),
        "first_token_max_ms": round(max(latencies, default=float("nan")), 2),
        "tokens_per_s": round(tokens / elapsed, 1),
        "turns_per_s": round(turns / elapsed, 1),
        "elapsed_s": round(elapsed, 2),
        "error_samples": sorted({e for r in results for e in r.errors})[:5],
    }
    if db_path is not None:
        figures.update(verify(db_path, results))
    figures["goal_p99_met"] = figures["first_token_p99_ms"] < GOAL_P99_MS
    return figures


def run(args: argparse.Namespace) -> int:
    if args.url:
        figures = measure(args, args.url.rstrip("/"), args.db)
    else:
        with spawned_server(args) as (base_url, db_path):
            figures = measure(args, base_url, db_path)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"{'figure':<22} value")
        for key, value in figures.items():
            print(f"{key:<22} {value}")
    ok = (figures["errors"] == 0 and figures["turns_done"] == figures["turns_expected"]
          and figures.get("lost", 0) == 0 and figures.get("reordered", 0) == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="streaming-llm bench load", description=__doc__)
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
