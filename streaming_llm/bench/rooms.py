"""Rooms: several agents answering in turn in one conversation, each with its own cache.

Starts ``streaming-llm serve`` with the local engine (the default model, or ``--model``) on a free
loopback port, unless ``--url`` names a running server. Creates ``--agents`` agents (default 4),
each with its own system prompt and Markdown context, and one room of all of them; then for
``--rounds`` rounds (default 20) sends one chat frame asking every agent to answer in turn
(``agent_ids``: each sees the answers before its own), greedy, ``--max-new-tokens`` each.

Figures:

* first token per speaker, per round: from the chat frame (the round's first speaker) or from the
  previous speaker's ``done`` (the others) to the speaker's first token, client clock; the
  median over the speakers of each round, and ``round_last_over_round_2`` (goal: flat, at most
  1.5); on a shared machine one slow answer moves a round's median, so also the median over
  every answer of the last three rounds against rounds 2-4 (``late_over_early``). Each speaker's cache holds the room up to its last answer, so what it prefills per round
  (the answers since, and the user's message) does not grow with the room;
* prefill: the tokens each answer prefilled (``prompt_tokens - cached_tokens``), summed, against
  the tokens the same answers would prefill if the transcript were copied into a fresh prompt
  for each agent every time (a stateless call, nothing cached: the whole ``prompt_tokens``);
* bytes per room: the KV caches the server holds afterwards (``/health`` ``kv_bytes``: the
  agents' caches of the room and their shared prefixes; a fresh server holds nothing else) and
  the room's stored JSON export.

Run ``streaming-llm bench rooms --help``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

from .served import add_server_arguments, measure_served, server_env

NAMES = ("Ada", "Boris", "Chloe", "Dmitri", "Emma", "Farid", "Grace", "Hugo")
TOPICS = ("databases", "compilers", "networks", "user interfaces", "testing", "security",
          "deployment", "documentation")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--agents", type=int, default=4, help="agents in the room (4; at most 8)")
    parser.add_argument("--rounds", type=int, default=20, help="rounds: every agent answers (20)")
    parser.add_argument("--max-new-tokens", type=int, default=8,
                        help="tokens per answer (8: short answers)")
    add_server_arguments(parser)


@dataclass
class Answer:
    round: int
    agent_id: str
    first_token_ms: float | None  # None: no token came
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    error: str | None = None

    @property
    def prefilled(self) -> int:
        return max(self.prompt_tokens - self.cached_tokens, 0)


def _agent(i: int) -> tuple[str, dict[str, str]]:
    name, topic = NAMES[i], TOPICS[i]
    return name.lower(), {
        "name": name,
        "system_prompt": f"You are {name}, an engineer who specializes in {topic}. Answer briefly.",
        "markdown_context": f"# {name}'s notes\n- Favourite subject: {topic}.\n"
                            f"- Team number: {100 + i}.\n- Prefers short answers.",
    }


async def _round(ws: Any, frame: dict[str, Any], number: int) -> list[Answer]:
    import msgspec

    sent = time.perf_counter()
    await ws.send(msgspec.json.encode(frame).decode())
    since, first = sent, None
    answers: list[Answer] = []
    speakers: list[str] = []
    while True:
        event = msgspec.json.decode(await ws.recv())
        kind = event["type"]
        if kind == "start":
            speakers = event["agent_ids"]
        elif kind == "token":
            if first is None:
                first = (time.perf_counter() - since) * 1000
        elif kind in ("done", "error"):
            usage = event.get("usage") or {}
            agent = event.get("agent_id") or (speakers[len(answers)] if speakers else "?")
            answers.append(Answer(number, agent, first, int(usage.get("prompt_tokens") or 0),
                                  int(usage.get("cached_tokens") or 0),
                                  int(usage.get("completion_tokens") or 0),
                                  None if kind == "done" else
                                  f"{event['code']}: {event['message']}"))
            since, first = time.perf_counter(), None
            if kind == "error" or len(answers) >= len(speakers):
                return answers


async def _measure(base_url: str, args: argparse.Namespace, log: Any) -> dict[str, Any]:
    import aiohttp
    from websockets.asyncio.client import connect

    agents = [_agent(i) for i in range(args.agents)]
    async with aiohttp.ClientSession() as http:
        for agent_id, body in agents:
            async with http.put(f"{base_url}/agents/{agent_id}", json=body) as resp:
                resp.raise_for_status()
        async with http.post(f"{base_url}/conversations",
                             json={"agent_ids": [a for a, _ in agents],
                                   "title": "bench rooms"}) as resp:
            resp.raise_for_status()
            room = (await resp.json())["id"]
        ws_url = base_url.replace("http", "ws", 1) + "/ws/chat"
        answers: list[Answer] = []
        async with connect(ws_url, max_size=None, ping_interval=None) as ws:
            for number in range(1, args.rounds + 1):
                frame = {"type": "chat", "conversation_id": room,
                         "agent_ids": [a for a, _ in agents],
                         "message": f"Round {number}: in one sentence, what would you check next?",
                         "options": {"temperature": 0, "max_new_tokens": args.max_new_tokens}}
                got = await _round(ws, frame, number)
                answers += got
                firsts = [a.first_token_ms for a in got if a.first_token_ms is not None]
                log(f"round {number}: first token median "
                    f"{statistics.median(firsts) if firsts else None:.0f} ms, prefilled "
                    f"{sum(a.prefilled for a in got)} of {sum(a.prompt_tokens for a in got)} "
                    "prompt tokens")
                if any(a.error for a in got):
                    break
        async with http.get(f"{base_url}/health") as resp:
            health = await resp.json()
        async with http.get(f"{base_url}/conversations/{room}/export?format=json") as resp:
            stored = len(await resp.read())
    return _figures(answers, args, health, stored)


def _figures(answers: list[Answer], args: argparse.Namespace, health: dict[str, Any],
             stored_bytes: int) -> dict[str, Any]:
    rounds: list[dict[str, Any]] = []
    for number in sorted({a.round for a in answers}):
        got = [a for a in answers if a.round == number]
        firsts = [a.first_token_ms for a in got if a.first_token_ms is not None]
        rounds.append({
            "round": number,
            "first_token_ms": {a.agent_id: None if a.first_token_ms is None
                               else round(a.first_token_ms, 1) for a in got},
            "first_token_median_ms": round(statistics.median(firsts), 1) if firsts else None,
            "prompt_tokens": sum(a.prompt_tokens for a in got),
            "prefilled_tokens": sum(a.prefilled for a in got),
        })
    by_round = {r["round"]: r["first_token_median_ms"] for r in rounds}
    last = max(by_round, default=0)
    ratio = (round(by_round[last] / by_round[2], 2)
             if last > 2 and by_round.get(2) and by_round.get(last) else None)
    def window(first: int, last: int) -> float | None:
        times = [a.first_token_ms for a in answers
                 if first <= a.round <= last and a.first_token_ms is not None]
        return round(statistics.median(times), 1) if times else None

    early, late = window(2, 4), window(last - 2, last)
    prefilled = sum(a.prefilled for a in answers)
    copied = sum(a.prompt_tokens for a in answers)
    extra = health.get("engine_info") or {}
    return {
        "agents": args.agents, "rounds": args.rounds, "max_new_tokens": args.max_new_tokens,
        "model": health.get("model"),
        "rounds_table": rounds,
        "round_last_over_round_2": ratio,
        "early_first_token_ms": early, "late_first_token_ms": late,
        "late_over_early": round(late / early, 2) if last >= 5 and early and late else None,
        "prefill": {"room_tokens": prefilled, "copied_transcript_tokens": copied,
                    "saved_tokens": copied - prefilled,
                    "saved_fraction": round(1 - prefilled / copied, 3) if copied else None},
        "kv_bytes": extra.get("kv_bytes"),
        "cached_conversations": extra.get("cached_conversations"),
        "stored_bytes": stored_bytes,
        "errors": [a.error for a in answers if a.error],
    }


def _table(figures: dict[str, Any]) -> str:
    rows = figures["rounds_table"]
    speakers = list(rows[0]["first_token_ms"]) if rows else []
    lines = ["| round | " + " | ".join(f"{s} first token ms" for s in speakers)
             + " | median | prompt tokens | prefilled |",
             "|---" * (len(speakers) + 4) + "|"]
    for r in rows:
        cells = [str(r["first_token_ms"].get(s)) for s in speakers]
        lines.append(f"| {r['round']} | " + " | ".join(cells)
                     + f" | {r['first_token_median_ms']} | {r['prompt_tokens']} | "
                       f"{r['prefilled_tokens']} |")
    p = figures["prefill"]
    lines += [
        "",
        f"round {rows[-1]['round'] if rows else '-'} over round 2 (median first token): "
        f"{figures['round_last_over_round_2']} (goal <= 1.5); every answer of the last 3 rounds "
        f"over rounds 2-4 (medians {figures['late_first_token_ms']} / "
        f"{figures['early_first_token_ms']} ms): {figures['late_over_early']}",
        f"prefill: {p['room_tokens']} tokens in the room against {p['copied_transcript_tokens']} "
        f"copying the transcript into a fresh prompt per answer: {p['saved_tokens']} saved "
        f"({p['saved_fraction']})",
        f"bytes per room: {figures['kv_bytes']} bytes of KV cache "
        f"({figures['cached_conversations']} cached conversations), "
        f"{figures['stored_bytes']} bytes stored (JSON export)",
    ]
    if figures["errors"]:
        lines.append(f"errors: {figures['errors']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.agents <= len(NAMES) or args.rounds < 1 or args.max_new_tokens < 1:
        print(f"--agents must be 1 to {len(NAMES)}; --rounds and --max-new-tokens at least 1",
              file=sys.stderr)
        return 2

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    figures = measure_served(args, server_env(args), "rooms",
                             lambda base_url: _measure(base_url, args, log))
    print(json.dumps(figures, indent=2) if args.json else _table(figures))
    return 1 if figures["errors"] else 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="streaming-llm bench rooms", description=__doc__)
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
