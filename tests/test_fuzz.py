"""Property-based fuzzing (hypothesis) of what clients send: socket frames and REST bodies.

Budgeted for ``make test`` (a few hundred examples each, a few seconds); set
``FUZZ_EXAMPLES=20000`` for a long, randomized run. Whatever arrives, the frame handler never raises, and
answers with exactly one well-formed ``error`` (a known code, a message) or ``pong`` — or queues
exactly one turn whose fields are within every bound. REST bodies never get a 500.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from typing import Any
from urllib.parse import quote

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from streaming_llm.app import create_app
from streaming_llm.chat.limits import Limits
from streaming_llm.http.routes.chat import ChatSocket
from streaming_llm.http.shutdown import LiveSockets
from streaming_llm.metrics import Metrics
from streaming_llm.protocol import Chat
from streaming_llm.settings import Settings

# Per test, not a global profile: other hypothesis tests (schemathesis) keep their own budget.
# In make test the examples are the same every run (no flaky CI); FUZZ_EXAMPLES=N explores anew.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize="FUZZ_EXAMPLES" not in os.environ)

LIMITS = Limits(max_frame_bytes=4096, max_message_chars=500, max_new_tokens=256,
                max_queued_turns=3)
FRAME_CODES = {"invalid_json", "invalid_frame", "unknown_type", "frame_too_large",
               "message_too_large", "max_new_tokens_too_large", "busy", "duplicate_request_id",
               "unknown_request"}
AGENT_ID = re.compile(r"[a-z0-9_-]{1,64}")


class RecordingSocket:
    """Stands in for the WebSocket: the frame handler only sends text."""

    client = None

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send_text(self, text: str) -> None:
        self.sent.append(text)


class ParkedRunner:
    """A turn runner whose turns never end, so accepted chats stay queued behind the first."""

    async def run(self, *args: Any) -> None:
        await asyncio.Event().wait()


def handle_all(texts: list[str], queued_before: int = 0) -> tuple[list[Any], list[dict[str, Any]]]:
    """The jobs the reader accepted (queued, in order) and its replies."""

    async def go() -> tuple[list[Any], list[dict[str, Any]]]:
        ws = RecordingSocket()
        sock = ChatSocket(ws, ParkedRunner(), LiveSockets(), LIMITS, Metrics(),  # type: ignore[arg-type]
                          send_timeout_s=5)
        for i in range(queued_before):  # as if the worker were busy with earlier turns
            await sock.handle(json.dumps({"type": "chat", "agent_id": "a", "message": "m",
                                          "request_id": f"earlier-{i}"}))
        for text in texts:
            await sock.handle(text)
        accepted = list(sock.turns.values())
        tasks = [job.task for job in accepted if job.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return accepted, [json.loads(t) for t in ws.sent]

    return asyncio.run(go())


def check_reply(frame: dict[str, Any]) -> None:
    assert frame["type"] in ("error", "pong"), frame
    rid = frame.get("request_id")
    assert rid is None or (isinstance(rid, str) and 0 < len(rid) <= 128), frame
    if frame["type"] == "error":
        assert frame["code"] in FRAME_CODES, frame
        assert isinstance(frame["message"], str) and frame["message"], frame


def check_job(chat: Chat) -> None:
    assert AGENT_ID.fullmatch(chat.agent_id)
    assert 1 <= len(chat.message) <= LIMITS.max_message_chars
    max_new = chat.options.max_new_tokens
    assert max_new is None or 1 <= max_new <= LIMITS.max_new_tokens
    for value in (chat.conversation_id, chat.request_id):
        assert value is None or 1 <= len(value) <= 128


def check_one(text: str) -> None:
    jobs, replies = handle_all([text])
    if jobs:  # accepted: queued once, nothing said
        assert replies == [] and len(jobs) == 1
        check_job(jobs[0].frame)
    else:  # refused or answered: one reply (a bare cancel of nothing says nothing)
        assert len(replies) <= 1, replies
        for reply in replies:
            check_reply(reply)
        if not replies:
            assert msgspec.json.decode(text)["type"] == "cancel"


# --- strategies -------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10),
                                                                      children, max_size=4),
    max_leaves=12)
option_names = st.sampled_from(["temperature", "max_new_tokens", "top_p", "top_k", "stop", "seed",
                                "bogus"])
near_valid_options = st.dictionaries(option_names, json_values | st.integers(-5, 300)
                                     | st.floats(-1, 3) | st.lists(st.text(max_size=5), max_size=20),
                                     max_size=4)
ids = st.text(max_size=140) | st.sampled_from(["helper", "../x", "CON", "%2e%2e", "a\x00b",
                                               "\uff48\uff45\uff4c\uff50", "x" * 65])
near_valid_frames = st.fixed_dictionaries(
    {"type": st.sampled_from(["chat", "cancel", "ping", "dance"]) | json_values},
    optional={"agent_id": ids | json_values, "message": st.text(max_size=600) | json_values,
              "conversation_id": ids | json_values, "request_id": ids | json_values,
              "options": near_valid_options | json_values, "extra": json_values})


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


@fuzz
@given(st.text(max_size=5000))
def test_any_text(text: str) -> None:
    check_one(text)


@fuzz
@given(json_values.map(_dumps))
def test_any_json(text: str) -> None:
    check_one(text)


@fuzz
@given(near_valid_frames.map(_dumps))
def test_near_valid_frames(text: str) -> None:
    check_one(text)


@fuzz
@given(near_valid_frames.map(_dumps), st.integers(0, 200))
def test_truncated_frames(text: str, cut: int) -> None:
    check_one(text[: max(0, len(text) - cut)])


@fuzz
@given(st.builds(
    dict, type=st.just("chat"), agent_id=st.from_regex(AGENT_ID, fullmatch=True),
    message=st.text(min_size=1, max_size=500),
    request_id=st.text(min_size=1, max_size=128),
    options=st.fixed_dictionaries({}, optional={
        "temperature": st.floats(0, 2), "max_new_tokens": st.integers(1, 256),
        "top_p": st.floats(0, 1, exclude_min=True), "top_k": st.integers(0, 100_000),
        "stop": st.lists(st.text(min_size=1, max_size=256), max_size=16),
        "seed": st.integers(0, 2**63 - 1)})))
def test_valid_chats_are_queued_unchanged(frame: dict[str, Any]) -> None:
    jobs, replies = handle_all([_dumps(frame)])
    assert replies == []
    (job,) = jobs
    assert job.request_id == frame["request_id"]
    assert msgspec.to_builtins(job.frame.options) == frame["options"]
    assert (job.frame.agent_id, job.frame.message) == (frame["agent_id"], frame["message"])


@settings(fuzz, max_examples=max(1, EXAMPLES // 3))
@given(st.lists(near_valid_frames.map(_dumps), min_size=1, max_size=12))
def test_sequences_keep_the_queue_bounded(texts: list[str]) -> None:
    jobs, replies = handle_all(texts, queued_before=2)
    for reply in replies:
        check_reply(reply)
    assert len(jobs) <= LIMITS.max_queued_turns
    assert len({job.request_id for job in jobs}) == len(jobs)


# --- REST bodies ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rest(tmp_path_factory: pytest.TempPathFactory) -> Any:
    data = tmp_path_factory.mktemp("fuzz")
    app = create_app(Settings(data_dir=data, engine="echo", echo_delay_ms=0, max_body_bytes=8192,
                             allowed_hosts="testserver"))
    with TestClient(app) as client:
        yield client, data


agent_bodies = (st.binary(max_size=300)
                | json_values.map(lambda v: _dumps(v).encode())
                | st.fixed_dictionaries({}, optional={
                    "name": st.text(max_size=220) | json_values,
                    "system_prompt": st.text(max_size=50) | json_values,
                    "markdown_context": st.text(max_size=50) | json_values,
                    "id": ids | json_values}).map(lambda v: _dumps(v).encode()))


@fuzz
@given(body=agent_bodies, agent_id=ids)
def test_agent_bodies_never_fail_the_server(rest: Any, body: bytes, agent_id: str) -> None:
    client, data = rest
    resp = client.put(f"/agents/{quote(agent_id, safe='')}", content=body,
                      headers={"content-type": "application/json"})
    assert resp.status_code in (200, 201, 400, 413, 422), (resp.status_code, resp.text)
    payload = resp.json()
    if resp.status_code >= 400:
        assert payload["error"]["code"] and payload["error"]["message"]
    else:
        assert AGENT_ID.fullmatch(payload["id"]) and payload["name"].strip()
    # The agents directory mirrors the table exactly: nothing refused ever reached it.
    stored = {a["id"] for a in client.get("/agents").json()}
    agents_dir = data / "agents"
    files = sorted(p.name for p in agents_dir.iterdir()) if agents_dir.exists() else []
    assert files == sorted(f"{i}.md" for i in stored)
