"""End to end with the local engine: a real server process, the real socket, real models.

What a client reads from ``token`` frames must be exactly the text the server stores, also when
the message and the answer are made of multi-byte characters (CJK, emoji) whose bytes span
several tokens.
"""

from __future__ import annotations

import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from .engines.model_dirs import write_chain_model
from .server import http, start_server
from .test_e2e import turn

pytestmark = pytest.mark.e2e

MESSAGE = "日本語で話して 🎉🙂 — ça va? 中文"


def stored_answers(db_path: Path, conversation_id: str) -> list[tuple[str, str]]:
    with sqlite3.connect(db_path) as db:
        return db.execute("SELECT role, content FROM turns WHERE conversation_id=? ORDER BY seq",
                          (conversation_id,)).fetchall()


def read_turn(ws: Any, timeout: float = 60, **frame: Any) -> tuple[str, list[str], dict[str, Any]]:
    """Like ``turn`` but keeps each token frame, to check none carries a broken character."""
    ws.send(json.dumps({"type": "chat", **frame}))
    start = json.loads(ws.recv(timeout=timeout))
    assert start["type"] == "start", start
    tokens: list[str] = []
    pieces = 0
    while True:
        event = json.loads(ws.recv(timeout=timeout))
        if event["type"] != "token":
            return start["conversation_id"], tokens, event
        assert event["seq"] == pieces  # a frame carries `count` pieces when they queued
        pieces += event.get("count", 1)
        tokens.append(event["token"])


def test_demo_model_streams_exactly_what_is_stored(tmp_path: Path) -> None:
    with start_server(tmp_path, {"STREAMING_LLM_ENGINE": "local",
                                 "STREAMING_LLM_MODEL": "demo"}) as server:
        status, health = http("GET", server.base_url + "/health")
        assert status == 200 and health["ready"] is True and health["engine"] == "local"
        assert "meaningless" in health["detail"] and "STREAMING_LLM_MODEL" in health["detail"]
        status, _ = http("PUT", server.base_url + "/agents/polyglot", {
            "name": "Polyglot", "system_prompt": "Réponds en 日本語.",
            "markdown_context": "# Glossaire\n- 🎉: fête"})
        assert status == 201

        with connect(server.ws_url) as ws:
            conv, tokens, done = read_turn(ws, agent_id="polyglot", message=MESSAGE,
                                           options={"max_new_tokens": 40})
            assert done["type"] == "done" and done["finish_reason"] in ("stop", "length")
            assert done["usage"]["completion_tokens"] > 0
            _, text, done2 = turn(ws, agent_id="polyglot", conversation_id=conv,
                                       message="もう一度 🎉", options={"max_new_tokens": 20})
            assert done2["finish_reason"] in ("stop", "length")
            assert done2["usage"]["cached_tokens"] > 0  # the first turn's cache was reused

        answers = stored_answers(server.db_path, conv)
        assert answers == [("user", MESSAGE), ("assistant", "".join(tokens)),
                           ("user", "もう一度 🎉"), ("assistant", text)]
        status, history = http("GET", f"{server.base_url}/conversations/{conv}")
        assert [t["content"] for t in history["turns"]] == [a[1] for a in answers]
    assert "demo model" in server.log()


def test_multibyte_answer_streams_whole_characters(tmp_path: Path) -> None:
    answer = "日語 🎉"
    model = write_chain_model(tmp_path / "chain", answer)  # answers exactly this, byte by byte
    env = {"STREAMING_LLM_ENGINE": "local", "STREAMING_LLM_MODEL": str(model)}
    with start_server(tmp_path, env) as server:
        http("PUT", server.base_url + "/agents/chain",
             {"name": "Chain", "system_prompt": "", "markdown_context": ""})
        with connect(server.ws_url) as ws:
            conv, tokens, done = read_turn(ws, agent_id="chain", message=MESSAGE)
        assert done["finish_reason"] == "stop"
        assert done["usage"]["completion_tokens"] == len(answer.encode())  # one token per byte
        # Each frame holds whole characters (never half of one: no U+FFFD); frames that queued
        # while the previous one was written are coalesced, so how many there are is timing.
        assert "".join(tokens) == answer and all("\ufffd" not in t for t in tokens)
        assert all(t in {"日", "語", " ", "🎉", "日語", "語 ", " 🎉", "日語 ", "語 🎉", answer}
                   for t in tokens)
        assert stored_answers(server.db_path, conv) == [("user", MESSAGE), ("assistant", answer)]


# --- the default model: an agent keeps its facts however long the conversation -----------------
FACTS = {"name": "Bluefin", "system_prompt": "You are the assistant of Project Bluefin.",
         "markdown_context": "# Facts\n- The project codename is BLUEFIN.\n- The release date is March 3."}
# Unrelated text, ~170 tokens a turn: the prefill is cheap, so the window is passed quickly.
FILLER = ("Here is a note about gardening, unrelated to anything else. Tomatoes need sun, water "
          "and patience; basil grows well beside them, and marigolds keep some pests away. "
          "Water early in the morning, mulch the beds, and pick the fruit when it is deep red. ") * 3


def ask(ws: Any, conversation: str | None, message: str, max_new_tokens: int) -> tuple[str, str, dict[str, Any]]:
    frame: dict[str, Any] = {"agent_id": "bluefin", "message": message,
                             "options": {"temperature": 0, "max_new_tokens": max_new_tokens}}
    if conversation:
        frame["conversation_id"] = conversation
    # A generous per-frame timeout: on a loaded 2-core box a prefill can take a minute.
    conv, tokens, done = read_turn(ws, timeout=600, **frame)
    assert done["type"] == "done", done
    return conv, "".join(tokens), done["usage"]


def facts_after_evictions(tmp_path: Path, models_dir: Path, pin: bool) -> tuple[str, str, int]:
    env = {"STREAMING_LLM_ENGINE": "local", "STREAMING_LLM_MODELS_DIR": str(models_dir),
           "STREAMING_LLM_WINDOW_TOKENS": "300", "STREAMING_LLM_DEVICE": "cpu",
           "STREAMING_LLM_PIN_AGENT_PREFIX": str(pin).lower(),
           "OMP_NUM_THREADS": "1"}  # one core each: the pinned and unpinned servers run side by side
    with start_server(tmp_path, env, timeout=300) as server:
        _, health = http("GET", server.base_url + "/health")
        assert health["model"] == "SmolLM2-135M-Instruct.Q4_1"
        assert http("PUT", server.base_url + "/agents/bluefin", FACTS)[0] == 201
        with connect(server.ws_url) as ws:
            conv, early, _ = ask(ws, None, "What is the project codename?", 16)
            assert "BLUEFIN" in early  # known before anything is evicted, pinned or not
            evicted = 0
            while evicted <= 1500:
                # The filler's answer does not matter: one token keeps the turn cheap.
                _, _, usage = ask(ws, conv, FILLER + "Reply with one word.", 1)
                evicted = usage["evicted_tokens"]
            _, codename, _ = ask(ws, conv, "What is the project codename?", 16)
            _, date, usage = ask(ws, conv, "When is the release date?", 24)
    return codename, date, usage["evicted_tokens"]


@pytest.fixture(scope="module")
def facts_runs(tmp_path_factory: pytest.TempPathFactory,
               default_models_dir: Path) -> dict[bool, tuple[str, str, int]]:
    """The same conversation on two servers, pin on and pin off, run side by side (one torch
    thread each, so on 2 cores the pair costs about the wall time of one): pin -> (codename
    answer, release-date answer, evicted tokens)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {pin: pool.submit(facts_after_evictions, tmp_path_factory.mktemp(f"pin-{pin}"),
                                    default_models_dir, pin) for pin in (True, False)}
        return {pin: future.result() for pin, future in futures.items()}


@pytest.mark.slow
def test_default_model_keeps_the_agents_facts_past_the_window(
        facts_runs: dict[bool, tuple[str, str, int]]) -> None:
    codename, date, evicted = facts_runs[True]
    assert evicted > 1500
    assert "BLUEFIN" in codename and "March 3" in date


@pytest.mark.slow
def test_default_model_loses_the_facts_without_the_pin(
        facts_runs: dict[bool, tuple[str, str, int]]) -> None:
    codename, date, evicted = facts_runs[False]
    assert evicted > 1500
    assert "BLUEFIN" not in codename and "March 3" not in date
