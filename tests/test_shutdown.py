"""Graceful shutdown of a real ``streaming-llm serve`` process on SIGTERM.

The echo engine with a delay stands in for a long answer: SIGTERM arrives mid-answer, and the
client, the database, the logs and the exit status tell what the server did.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import sqlite3
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from streaming_llm.http.shutdown import LiveSockets
from streaming_llm.logs import LOG_FILE

from .server import ServerProcess, start_server


def put_agent(server: ServerProcess) -> None:
    body = json.dumps({"name": "Echo", "system_prompt": "", "markdown_context": ""}).encode()
    req = urllib.request.Request(server.base_url + "/agents/echo", data=body, method="PUT",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 201


def frames_until_closed(ws: ClientConnection, timeout: float) -> tuple[list[dict[str, Any]], int]:
    """Every frame the server sends until it closes the socket, and the close code."""
    frames: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            frames.append(json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic()))))
        except ConnectionClosed as exc:
            assert exc.rcvd is not None, "the server dropped the connection without a close frame"
            return frames, exc.rcvd.code


def refuses_connections(port: int, within: float) -> bool:
    """uvicorn looks at its exit flag every 100 ms: poll until the port refuses a connection."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        time.sleep(0.05)
    return False


def stored_answer(server: ServerProcess, conversation_id: str) -> list[tuple[str, str, str | None]]:
    with sqlite3.connect(server.db_path) as db:
        return db.execute("SELECT role, content, finish_reason FROM turns"
                          " WHERE conversation_id = ? ORDER BY seq", (conversation_id,)).fetchall()


@pytest.mark.e2e
def test_running_turn_finishes_within_grace(tmp_path: Path) -> None:
    words = [f"zebra{i} " for i in range(15)]  # 15 words, 100 ms apart: 1.5 s of answer
    message = "".join(words).strip()
    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "100",
           "STREAMING_LLM_SHUTDOWN_GRACE_S": "10", "STREAMING_LLM_LOG_DIR": str(tmp_path / "logs")}
    with start_server(tmp_path, env) as server:
        put_agent(server)
        with connect(server.ws_url, proxy=None) as ws:
            ws.send(json.dumps({"type": "chat", "agent_id": "echo", "message": message,
                                "request_id": "req-long"}))
            start = json.loads(ws.recv(timeout=10))
            assert start["type"] == "start"
            first = json.loads(ws.recv(timeout=10))
            assert first["type"] == "token"

            server.proc.send_signal(signal.SIGTERM)
            assert refuses_connections(server.port, within=5)  # stopped accepting
            ws.send(json.dumps({"type": "chat", "agent_id": "echo", "message": "one more",
                                "request_id": "req-late"}))
            frames, code = frames_until_closed(ws, timeout=15)

        assert code == 1001
        done = [f for f in frames if f["type"] == "done"]
        assert len(done) == 1 and done[0]["request_id"] == "req-long"
        assert done[0]["finish_reason"] == "stop"  # finished within the grace: not cancelled
        late = [f for f in frames if f.get("request_id") == "req-late"]
        assert [(f["type"], f["code"]) for f in late] == [("error", "shutting_down")]
        text = first["token"] + "".join(f["token"] for f in frames if f["type"] == "token")
        assert text == message

        assert server.proc.wait(timeout=15) == 0
        assert stored_answer(server, start["conversation_id"]) == [
            ("user", message, None), ("assistant", message, "stop")]

    log_file = (tmp_path / "logs" / LOG_FILE).read_text()
    for log in (server.log(), log_file):
        assert "turn req-long started" in log and "turn req-long finished: stop" in log
        assert "grace of" not in log  # the drain never had to cancel
        assert "zebra" not in log  # message contents stay out of info-level logs
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO ", log_file, re.M)


@pytest.mark.e2e
def test_turn_past_grace_is_cancelled_and_stored(tmp_path: Path) -> None:
    message = " ".join(f"w{i}" for i in range(400))  # 400 words, 50 ms apart: 20 s of answer
    grace = 0.5
    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "50",
           "STREAMING_LLM_SHUTDOWN_GRACE_S": str(grace)}
    with start_server(tmp_path, env) as server:
        put_agent(server)
        with connect(server.ws_url, proxy=None) as ws:
            ws.send(json.dumps({"type": "chat", "agent_id": "echo", "message": message,
                                "request_id": "req-endless"}))
            start = json.loads(ws.recv(timeout=10))
            assert start["type"] == "start"
            server.proc.send_signal(signal.SIGTERM)
            frames, code = frames_until_closed(ws, timeout=15)

        assert code == 1001
        assert frames[-1]["type"] == "done" and frames[-1]["finish_reason"] == "cancelled"
        tokens = [f["token"] for f in frames if f["type"] == "token"]
        assert 0 < len(tokens) < 400  # streamed on through the grace, then cut short
        assert frames[-1]["usage"]["completion_tokens"] == len(tokens)

        assert server.proc.wait(timeout=15) == 0
        assert stored_answer(server, start["conversation_id"]) == [
            ("user", message, None), ("assistant", "".join(tokens), "cancelled")]
    # In this order: the drain began, waited out its grace, then cancelled the turn.
    log = server.log()
    began = log.index("shutdown: no new turns; 1 running")
    assert log.index(f"shutdown: grace of {grace:.1f}s is over, cancelling 1 turn(s)") > began


# --- LiveSockets on its own: the bounds that the process tests cannot reach cheaply ------------
class FakeSocket:
    """A chat socket reduced to what the drain uses: busy for ``work_s`` unless cancelled."""

    def __init__(self, live: LiveSockets, work_s: float, *, close_hangs: bool = False,
                 name: str = "", events: list[str] | None = None) -> None:
        self.live, self.work_s, self.close_hangs = live, work_s, close_hangs
        self.name = name
        self.events = events if events is not None else []  # "<name> finished", ... in order
        self.started = time.monotonic()
        self.cancelled = False
        self.closed_with: int | None = None
        self.gone = asyncio.Event()

    @property
    def busy(self) -> bool:
        if self.cancelled:
            return False
        if time.monotonic() - self.started < self.work_s:
            return True
        if f"{self.name} finished" not in self.events:
            self.events.append(f"{self.name} finished")
        return False

    async def cancel(self, request_id: str | None) -> None:
        self.cancelled = True
        self.events.append(f"{self.name} cancelled")

    async def close(self, code: int, reason: str) -> None:
        if self.close_hangs:
            await asyncio.Event().wait()
        self.closed_with = code
        self.gone.set()

    async def handler(self) -> None:
        """What the endpoint does: tracked until the socket is gone."""
        with self.live.track(self):
            await self.gone.wait()


async def drain_with(live: LiveSockets, sockets: list[FakeSocket], grace_s: float) -> None:
    """Drain ``sockets``; the drain must return (the long turn is 60 s, a stuck close forever),
    which the generous ``wait_for`` only keeps from hanging the run."""
    handlers = [asyncio.create_task(s.handler()) for s in sockets]
    await asyncio.sleep(0)
    assert len(live) == len(sockets)
    await asyncio.wait_for(live.drain(grace_s), 30)
    for task in handlers:
        task.cancel()
    await asyncio.wait(handlers)


async def test_drain_waits_for_short_turns_and_cancels_long_ones() -> None:
    live, events = LiveSockets(), []
    short, long, idle = (FakeSocket(live, 0.1, name="short", events=events),
                         FakeSocket(live, 60, name="long", events=events),
                         FakeSocket(live, 0, name="idle", events=events))
    await drain_with(live, [short, long, idle], grace_s=0.3)
    assert live.draining
    assert not short.cancelled and not idle.cancelled and long.cancelled
    # the drain waited for the short turn to finish before it cancelled the long one
    assert events.index("short finished") < events.index("long cancelled"), events
    assert [s.closed_with for s in (short, long, idle)] == [1001, 1001, 1001]
    assert len(live) == 0


async def test_drain_does_not_hang_on_a_socket_that_will_not_close() -> None:
    live = LiveSockets(close_timeout_s=0.2)
    stuck, fine = FakeSocket(live, 0, close_hangs=True), FakeSocket(live, 0)
    await drain_with(live, [stuck, fine], grace_s=5)  # returns: the close timeout is bounded
    assert fine.closed_with == 1001 and stuck.closed_with is None


@pytest.mark.e2e
def test_stop_is_bounded_with_clients_that_stopped_reading(tmp_path: Path) -> None:
    """SIGTERM with 4 sockets and 2 ``/v1`` streams whose clients never read: the stop fits
    the unit's budget (uvicorn alone waits its graceful timeout out for the streams)."""
    from streaming_llm.http.shutdown import stop_budget_s

    from .test_connections import handshake, open_socket, ws_frame

    grace = 1.0
    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "0",
           "STREAMING_LLM_SHUTDOWN_GRACE_S": str(grace),
           # answers far larger than what the kernel buffers on loopback (~4 MB a socket)
           "STREAMING_LLM_MAX_MESSAGE_CHARS": "9000000", "STREAMING_LLM_MAX_FRAME_BYTES": "16777216",
           "STREAMING_LLM_MAX_NEW_TOKENS_LIMIT": "1000000"}
    with start_server(tmp_path, env) as server:
        put_agent(server)
        message = " ".join(["x" * 4000] * 2000)  # 8 MB of answer, 4 KB a token
        frame = ws_frame(0x1, json.dumps({"type": "chat", "agent_id": "echo", "message": message,
                                          "options": {"max_new_tokens": 1_000_000}}).encode())
        stalled = []
        for _ in range(4):
            sock = open_socket(server, rcvbuf=4096)
            handshake(sock)
            sock.sendall(frame)
            stalled.append(sock)
        body = json.dumps({"model": "echo", "stream": True, "max_tokens": 1_000_000,
                           "messages": [{"role": "user", "content": message}]}).encode()
        for _ in range(2):
            sock = open_socket(server, rcvbuf=4096)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            stalled.append(sock)
        time.sleep(4)  # the answers fill the kernel's buffers (a few MB) and the sends block
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=60)
        took = time.monotonic() - started
        for sock in stalled:
            sock.close()
        log = server.log()
    print(f"stop with 4 stalled sockets and 2 stalled streams: {took:.1f}s "
          f"(the unit's budget: {grace + stop_budget_s():.1f}s)")
    assert code == 0, log[-3000:]
    # Bounded by our own steps, not uvicorn's graceful timeout: the grace ran out and the
    # stalled sockets were cancelled and dropped.
    assert "timeout graceful shutdown exceeded" not in log, log[-6000:]
    assert f"grace of {grace:.1f}s is over, cancelling" in log, log[-3000:]
