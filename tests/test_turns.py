"""The turn runner on its own: every way a started turn ends is classified and stored, and the
slot comes back (the real app's lifespan and SQLite, a scripted engine, a recording writer)."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import pytest
from starlette.testclient import TestClient

from streaming_llm.chat.conversations import TurnInProgress
from streaming_llm.chat.turns import ClientGone, Ending, TurnCancelled, TurnControl, TurnSpec
from streaming_llm.settings import Settings
from streaming_llm.wire import GenerationOptions

from .conftest import put_agent
from .fakes import ScriptedEngine


class Recorder:
    """A writer that records, and can go away or cancel the turn after some pieces."""

    def __init__(self, *, gone_after: int | None = None, control: TurnControl | None = None,
                 cancel_after: int | None = None) -> None:
        self.started: list[str] = []
        self.pieces: list[str] = []
        self.ended: list[Ending] = []
        self.gone_after, self.control, self.cancel_after = gone_after, control, cancel_after

    async def start(self, turn: TurnInProgress) -> None:
        self.started.append(turn.user_turn_id)

    async def piece(self, turn: TurnInProgress, text: str) -> None:
        if self.gone_after is not None and len(self.pieces) == self.gone_after:
            raise ClientGone
        self.pieces.append(text)
        if self.control is not None and len(self.pieces) == self.cancel_after:
            self.control.cancel()

    async def end(self, turn: TurnInProgress, ending: Ending) -> None:
        self.ended.append(ending)


def run(client: TestClient, writer: Any, control: TurnControl | None = None,
        **spec: Any) -> Ending:
    services = client.app_state["services"]
    fields = {"request_id": "r", "agent_id": "helper", "message": "hi",
              "options": GenerationOptions(), **spec}
    return client.portal.call(services.turns.run, TurnSpec(**fields), writer, control)


def stored(settings: Settings) -> list[tuple[str, str, str | None]]:
    with sqlite3.connect(settings.data_dir / "streaming_llm.db") as db:
        return db.execute("SELECT role, content, finish_reason FROM turns ORDER BY rowid").fetchall()


@pytest.fixture
def helper(client: TestClient, scripted: ScriptedEngine) -> TestClient:
    put_agent(client, "helper")
    scripted.pieces = ["a ", "b ", "c ", "d"]
    scripted.delay = 0.01
    return client


def test_the_engines_finish(helper: TestClient, settings: Settings) -> None:
    writer = Recorder()
    ending = run(helper, writer)
    assert (ending.reason, ending.failure, writer.pieces) == ("stop", None, ["a ", "b ", "c ", "d"])
    assert stored(settings) == [("user", "hi", None), ("assistant", "a b c d", "stop")]


def test_a_cancel_ends_it_cancelled_and_the_route_still_writes(helper: TestClient,
                                                               settings: Settings) -> None:
    control = TurnControl()
    ending = run(helper, Recorder(control=control, cancel_after=2), control)
    assert ending.reason == "cancelled" and ending.turn_id is not None
    assert stored(settings)[-1] == ("assistant", "a b ", "cancelled")


def test_a_cancel_before_the_start_stores_nothing(helper: TestClient, settings: Settings) -> None:
    control = TurnControl()
    control.cancel()
    with pytest.raises(TurnCancelled):
        run(helper, Recorder(), control)
    assert stored(settings) == []


def test_a_client_gone_stores_the_partial_answer_and_raises(helper: TestClient,
                                                            settings: Settings) -> None:
    with pytest.raises(ClientGone):
        run(helper, Recorder(gone_after=3))
    assert stored(settings)[-1] == ("assistant", "a b c ", "cancelled")


def test_an_engine_failure_is_stored_as_error(helper: TestClient, settings: Settings,
                                              scripted: ScriptedEngine) -> None:
    scripted.fail_after = 1
    ending = run(helper, Recorder())
    assert ending.reason == "error" and ending.failure is not None
    assert ending.failure.code == "engine_error" and ending.turn_id is not None
    assert stored(settings)[-1] == ("assistant", "a ", "error")


def test_a_task_cancelled_mid_answer_stores_cancelled(helper: TestClient,
                                                      settings: Settings) -> None:
    services = helper.app_state["services"]

    async def cancel_midway() -> None:
        task = asyncio.ensure_future(services.turns.run(
            TurnSpec("r", "helper", "hi", GenerationOptions()), Recorder()))
        await asyncio.sleep(0.025)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    helper.portal.call(cancel_midway)
    (_, (_, content, reason)) = stored(settings)
    assert reason == "cancelled" and "a b c d".startswith(content)
    assert services.gate.running == 0 and len(services.turns.locks) == 0
