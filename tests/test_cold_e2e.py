"""Conversations that never go cold, end to end on the real default model: a conversation pushed
out of memory, or carried over a graceful restart, answers exactly as its twin that stayed in
memory (greedy: the same tokens) from its file; one whose file was never written (killed with -9)
rebuilds from its last window and still answers."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from .server import http, start_server
from .test_local_e2e import FACTS, FILLER, ask

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

WINDOW = 1000  # a smaller window than the default keeps the prefill of the histories short


def env(models_dir: Path) -> dict[str, str]:
    return {"STREAMING_LLM_ENGINE": "local", "STREAMING_LLM_MODELS_DIR": str(models_dir),
            "STREAMING_LLM_DEVICE": "cpu", "STREAMING_LLM_WINDOW_TOKENS": str(WINDOW),
            # two conversations in memory: a third pushes the least recent one out
            "STREAMING_LLM_CACHED_CONVERSATIONS": "2",
            # the port changes between the test's starts; the cache folder must not
            "STREAMING_LLM_INSTANCE_ID": "cold-test"}


def say(ws: Any, conversation: str | None, message: str, max_new_tokens: int = 1,
        ) -> tuple[str, str, dict[str, Any]]:
    return ask(ws, conversation, message, max_new_tokens)


def history(ws: Any) -> str:
    """A conversation of ~3,000 tokens (three windows' worth is more than the cache holds)."""
    conv, _, usage = say(ws, None, FILLER * 6 + "Reply with one word.")
    for _ in range(2):
        _, _, usage = say(ws, conv, FILLER * 6 + "Reply with one word.")
    assert usage["prompt_tokens"] > 2 * WINDOW and usage["evicted_tokens"] > 0
    return conv


QUESTION_1 = "Now, in one sentence: what did the notes say about tomatoes?"
QUESTION_2 = "What is the project codename?"


@pytest.mark.timeout(1800)
def test_an_evicted_or_restarted_conversation_answers_as_its_twin(
        tmp_path: Path, default_models_dir: Path) -> None:
    data = tmp_path / "data"
    with start_server(tmp_path, env(default_models_dir), data_dir=data, timeout=300) as server:
        assert http("PUT", server.base_url + "/agents/bluefin", FACTS)[0] == 201
        with connect(server.ws_url) as ws:
            evicted, twin = history(ws), history(ws)
            say(ws, None, "Hello.")  # a third conversation: `evicted` leaves memory
            written = data / "kv" / "cold-test" / f"{evicted}.kv"
            deadline = time.monotonic() + 120
            while not written.is_file() and time.monotonic() < deadline:
                time.sleep(0.1)  # written off the scheduler's thread; read back once it is there
            _, warm_1, warm_usage = say(ws, twin, QUESTION_1, 24)
            _, cold_1, cold_usage = say(ws, evicted, QUESTION_1, 24)
            assert warm_usage["cache_source"] == "memory" and cold_usage["cache_source"] == "disk"
            assert cold_1 == warm_1  # greedy: the same tokens
            assert cold_usage["cached_tokens"] == warm_usage["cached_tokens"]
            print(f"first token: warm {warm_usage['time_to_first_token_ms']} ms, "
                  f"from disk {cold_usage['time_to_first_token_ms']} ms")
            _, warm_2, warm_usage = say(ws, twin, QUESTION_2, 16)  # still in memory
            assert warm_usage["cache_source"] == "memory"
        _, health = http("GET", server.base_url + "/health")
        info = health["engine_info"]
        assert info["kv_disk_loads"] >= 1 and info["cache_hits_disk"] >= 1
        server.proc.send_signal(signal.SIGTERM)  # graceful: every cached conversation is written
        assert server.proc.wait(timeout=120) == 0
    assert (data / "kv" / "cold-test" / f"{evicted}.kv").is_file()

    with start_server(tmp_path, env(default_models_dir), data_dir=data, timeout=300) as server:
        with connect(server.ws_url) as ws:
            _, restarted_2, usage = say(ws, evicted, QUESTION_2, 16)
            assert usage["cache_source"] == "disk"
            assert restarted_2 == warm_2  # as if the server had never stopped
            unsaved = history(ws)  # only ever in memory: killed before any write
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=60)

    with start_server(tmp_path, env(default_models_dir), data_dir=data, timeout=300) as server:
        with connect(server.ws_url) as ws:
            _, answer, usage = say(ws, unsaved, QUESTION_2, 16)
            assert usage["cache_source"] == "rebuilt" and answer.strip()
            # bounded: the model read the agent prefix and one window, not ~3,000 tokens
            assert usage["evicted_tokens"] >= usage["prompt_tokens"] - 2 * WINDOW
        status, stored = http("GET", f"{server.base_url}/conversations/{unsaved}")
        assert status == 200 and stored["turns"][-1]["content"] == answer  # nothing lost
