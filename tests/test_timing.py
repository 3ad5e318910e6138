"""Timings in ``done`` usage: time to first token and decode rate, measured by the server when
the engine does not report them."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator

import pytest
from starlette.testclient import TestClient

from streaming_llm.app import create_app
from streaming_llm.chat.conversations import TurnInProgress
from streaming_llm.engines.base import (
    Chunk,
    EngineRequest,
    Finished,
    GenerationOptions,
    TextChunk,
    Usage,
)
from streaming_llm.settings import Settings

from .conftest import put_agent
from .fakes import ScriptedEngine
from .test_chat import recv_turn


def make_turn(started: float, first: float | None, last: float | None,
              pieces: int) -> TurnInProgress:
    request = EngineRequest("r", "c", [], GenerationOptions(), 10)
    turn = TurnInProgress("r", "c", "t", request, started=started, first_token_at=first,
                          last_token_at=last)
    turn.pieces = ["x"] * pieces
    return turn


def test_timed_fills_what_the_engine_left_empty() -> None:
    turn = make_turn(started=10.0, first=10.5, last=11.5, pieces=3)
    usage = turn.timed(Usage(prompt_tokens=7, completion_tokens=5))
    # 500 ms to the first piece; the 4 tokens after the first took 1 s.
    assert (usage.time_to_first_token_ms, usage.decode_tokens_per_s) == (500.0, 4.0)
    assert usage.prompt_tokens == 7
    reported = Usage(completion_tokens=5, time_to_first_token_ms=1.5, decode_tokens_per_s=99.0)
    assert turn.timed(reported) == reported
    assert turn.partial_usage() == Usage(completion_tokens=3, time_to_first_token_ms=500.0,
                                         decode_tokens_per_s=2.0)


@pytest.mark.parametrize(("first", "last", "pieces"), [(None, None, 0), (10.5, 10.5, 1)])
def test_no_rate_without_two_tokens(first: float | None, last: float | None,
                                    pieces: int) -> None:
    usage = make_turn(10.0, first, last, pieces).partial_usage()
    assert usage.decode_tokens_per_s is None
    assert usage.time_to_first_token_ms == (None if first is None else 500.0)


def test_socket_done_carries_timings(client: TestClient, settings: Settings,
                                     scripted: ScriptedEngine) -> None:
    scripted.delay = 0.02  # each of the 4 pieces comes 20 ms after the previous
    put_agent(client, "helper")
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"type": "chat", "agent_id": "helper", "message": "Hi"})
        _, _, done = recv_turn(ws)
    usage = done["usage"]
    assert usage["time_to_first_token_ms"] >= 15
    assert 0 < usage["decode_tokens_per_s"] <= 3 / 0.055  # 3 tokens in at least ~60 ms
    with sqlite3.connect(settings.data_dir / "streaming_llm.db") as db:
        [(stored,)] = db.execute("SELECT usage FROM turns WHERE role = 'assistant'").fetchall()
    assert json.loads(stored) == usage


class ReportingEngine(ScriptedEngine):
    """An engine that measures its own timings."""

    async def stream(self, request: EngineRequest) -> AsyncIterator[Chunk]:
        yield TextChunk("a")
        yield TextChunk("b")
        yield Finished("stop", Usage(completion_tokens=2, time_to_first_token_ms=1.25,
                                     decode_tokens_per_s=321.0))


def test_engine_timings_win(settings: Settings) -> None:
    with TestClient(create_app(settings, engine=ReportingEngine())) as client:
        put_agent(client, "helper")
        with client.websocket_connect("/ws/chat") as ws:
            ws.send_json({"type": "chat", "agent_id": "helper", "message": "Hi"})
            _, _, done = recv_turn(ws)
    assert done["usage"]["time_to_first_token_ms"] == 1.25
    assert done["usage"]["decode_tokens_per_s"] == 321.0
