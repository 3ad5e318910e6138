"""Resume after reconnect against a real server (echo engine): a socket cut mid-answer, a new one
sends ``resume``, and the tokens of both add up to the stored answer, none twice, none missing."""

from __future__ import annotations

import json
import socket
import sqlite3
import struct
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from .server import ServerProcess, http, start_server
from .test_careless_clients import client_socket, put_echoer, wait_for

pytestmark = pytest.mark.e2e

MESSAGE = "".join(f"word{i} " for i in range(60)).rstrip()
KEY_A = "a" * 16 + "-resume-key-a"
KEY_B = "b" * 16 + "-resume-key-b"


def open_socket(server: ServerProcess, key: str | None = None) -> tuple[ClientConnection, socket.socket]:
    sock = client_socket(server, "127.0.0.1")
    url = server.ws_url + (f"?token={key}" if key else "")
    return connect(url, sock=sock, open_timeout=10, legacy=True), sock


def cut(ws: ClientConnection, sock: socket.socket) -> None:
    """Drop the connection without a close frame (a reset), as a lost network would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    ws.close_socket()


def frames(ws: ClientConnection, timeout: float = 20) -> list[dict[str, Any]]:
    """Frames up to and including the ending (``done`` or ``error``)."""
    out = []
    while True:
        frame = json.loads(ws.recv(timeout=timeout))
        out.append(frame)
        if frame["type"] in ("done", "error"):
            return out


def stored_answer(db_path: Path, turn_id: str) -> tuple[str, str]:
    with sqlite3.connect(db_path) as db:
        row = db.execute("SELECT content, finish_reason FROM turns WHERE id = ?", (turn_id,)).fetchone()
    assert row is not None, turn_id
    return row[0], row[1]


def answers(db_path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db_path) as db:
        return list(db.execute("SELECT content, finish_reason FROM turns WHERE role = 'assistant'"))


def start_and_cut(server: ServerProcess, request_id: str, tokens: int,
                  key: str | None = None) -> list[dict[str, Any]]:
    """Chat, read ``start`` and ``tokens`` tokens, then cut the socket; the frames read."""
    ws, sock = open_socket(server, key)
    ws.send(json.dumps({"type": "chat", "agent_id": "echoer", "message": MESSAGE,
                        "request_id": request_id}))
    got = [json.loads(ws.recv(timeout=20)) for _ in range(tokens + 1)]
    assert got[0]["type"] == "start" and all(f["type"] == "token" for f in got[1:]), got
    cut(ws, sock)
    return got


def resume(server: ServerProcess, request_id: str, after_seq: int,
           key: str | None = None) -> list[dict[str, Any]]:
    ws, _ = open_socket(server, key)
    with ws:
        ws.send(json.dumps({"type": "resume", "request_id": request_id, "after_seq": after_seq}))
        return frames(ws)


def assert_contiguous(tokens: list[dict[str, Any]]) -> None:
    """Every piece once, in order: each frame starts where the previous one's pieces ended."""
    seq = 0
    for frame in tokens:
        assert frame["seq"] == seq, (frame, seq)
        seq += frame.get("count", 1)


def last_seq(frames: list[dict[str, Any]]) -> int:
    tokens = [f for f in frames if f["type"] == "token"]
    return tokens[-1]["seq"] + tokens[-1].get("count", 1) - 1


def check_whole(before: list[dict[str, Any]], after: list[dict[str, Any]],
                db_path: Path) -> None:
    tokens = [f for f in before + after if f["type"] == "token"]
    assert_contiguous(tokens)
    done = after[-1]
    assert done["type"] == "done" and done["finish_reason"] == "stop", done
    content, reason = stored_answer(db_path, done["turn_id"])
    assert "".join(f["token"] for f in tokens) == content == MESSAGE
    assert reason == "stop"


def test_a_cut_socket_resumes_mid_answer_without_a_token_lost_or_repeated(tmp_path: Path) -> None:
    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "30"}
    with start_server(tmp_path, env) as server:
        put_echoer(server)
        before = start_and_cut(server, "r-mid", 3)
        after = resume(server, "r-mid", last_seq(before))
        assert after[0]["type"] == "token" and after[0]["seq"] == last_seq(before) + 1
        assert len(answers(server.db_path)) == 1  # not finished when resumed: still running
        check_whole(before, after, server.db_path)
        # and again, from the start, once it finished: the same tokens and the same done
        again = resume(server, "r-mid", -1)
        replayed = [f for f in again if f["type"] == "token"]  # in as few frames as fit
        assert_contiguous(replayed)
        assert "".join(f["token"] for f in replayed) == MESSAGE
        assert again[-1] == after[-1]


def test_a_resume_after_the_answer_finished_returns_the_rest_and_done(tmp_path: Path) -> None:
    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "5"}
    with start_server(tmp_path, env) as server:
        put_echoer(server)
        before = start_and_cut(server, "r-late", 2)
        wait_for(lambda: len(answers(server.db_path)) == 1, 30, "the answer was not stored")
        assert answers(server.db_path)[0][1] == "stop"  # it generated on without its client
        after = resume(server, "r-late", last_seq(before))
        check_whole(before, after, server.db_path)


def test_unknown_and_expired_requests_are_unknown_request(tmp_path: Path) -> None:
    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "100",
           "STREAMING_LLM_RESUME_GRACE_S": "0.5"}
    with start_server(tmp_path, env) as server:
        put_echoer(server)
        [error] = resume(server, "never-sent", -1)
        assert error["type"] == "error" and error["code"] == "unknown_request", error
        assert error["request_id"] == "never-sent"
        start_and_cut(server, "r-gone", 1)
        # nobody resumes it within the grace: cancelled, stored as cancelled, then forgotten
        wait_for(lambda: len(answers(server.db_path)) == 1, 30, "the answer was not stored")
        content, reason = answers(server.db_path)[0]
        assert reason == "cancelled" and MESSAGE.startswith(content) and content != MESSAGE
        [error] = resume(server, "r-gone", 0)
        assert error["code"] == "unknown_request", error
        assert "Traceback" not in server.log()


def test_another_keys_request_is_unknown_request(tmp_path: Path) -> None:
    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "30",
           "STREAMING_LLM_API_KEY": f"{KEY_A},{KEY_B}"}
    with start_server(tmp_path, env) as server:
        headers = {"authorization": f"Bearer {KEY_A}"}
        assert http("PUT", server.base_url + "/agents/echoer", {"name": "Echoer"},
                    headers=headers)[0] == 201
        before = start_and_cut(server, "r-key", 2, key=KEY_A)
        [error] = resume(server, "r-key", last_seq(before), key=KEY_B)
        assert error["code"] == "unknown_request", error
        after = resume(server, "r-key", last_seq(before), key=KEY_A)
        check_whole(before, after, server.db_path)


def test_cancel_on_the_resuming_socket_cancels_the_turn(tmp_path: Path) -> None:
    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "50"}
    with start_server(tmp_path, env) as server:
        put_echoer(server)
        before = start_and_cut(server, "r-cancel", 1)
        ws, _ = open_socket(server)
        with ws:
            ws.send(json.dumps({"type": "resume", "request_id": "r-cancel",
                                "after_seq": last_seq(before)}))
            first = json.loads(ws.recv(timeout=20))
            assert first["type"] == "token", first
            ws.send(json.dumps({"type": "cancel", "request_id": "r-cancel"}))
            rest = frames(ws)
        tokens = [f for f in [*before, first, *rest] if f["type"] == "token"]
        assert_contiguous(tokens)
        assert rest[-1]["type"] == "done" and rest[-1]["finish_reason"] == "cancelled"
        content, reason = stored_answer(server.db_path, rest[-1]["turn_id"])
        assert reason == "cancelled" and content == "".join(f["token"] for f in tokens)


# --- attacks on resume (issue 24) ----------------------------------------------------------------
def peak_rss_mb(server: ServerProcess) -> float:
    """The server process's peak resident memory (VmHWM), in MiB."""
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    (line,) = [ln for ln in status.splitlines() if ln.startswith("VmHWM:")]
    return int(line.split()[1]) / 1024


def test_a_resume_flood_from_a_socket_that_never_reads_stays_bounded(tmp_path: Path) -> None:
    """A thousand ``resume`` frames for an ended 100 KB answer, from a socket that never reads:
    one replay runs at a time per socket and the rest are refused, so the server's peak memory
    grows by far less than the ~100 MB that a thousand waiting replays of the answer hold."""
    answer = " ".join("z" * 999 for _ in range(100))  # 100 pieces, 100 KB
    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "0",
           "STREAMING_LLM_RESUME_GRACE_S": "60", "STREAMING_LLM_SEND_TIMEOUT_S": "3",
           "STREAMING_LLM_MAX_MESSAGE_CHARS": "200000"}
    with start_server(tmp_path, env) as server:
        put_echoer(server)
        ws, sock = open_socket(server)
        ws.send(json.dumps({"type": "chat", "agent_id": "echoer", "message": answer,
                            "request_id": "flooded"}))
        assert frames(ws)[-1]["type"] == "done"
        before = peak_rss_mb(server)
        resume_frame = json.dumps({"type": "resume", "request_id": "flooded", "after_seq": -1})
        sent, replayed, refused = 0, 0, 0
        try:
            for _ in range(1000):  # not reading meanwhile: the server's writes back up
                ws.send(resume_frame)
                sent += 1
            ws.send(json.dumps({"type": "ping", "request_id": "last"}))
            while (frame := json.loads(ws.recv(timeout=30)))["type"] != "pong":
                replayed += frame["type"] == "done"
                refused += frame.get("code") == "busy"
        except (ConnectionClosed, OSError):
            pass  # the server gave up on the non-reader (the send timeout): fine too
        finally:
            cut(ws, sock)
        grown = peak_rss_mb(server) - before
        print(f"{sent} resumes: {replayed} replayed, {refused} refused; peak RSS grew "
              f"{grown:.1f} MiB")
        assert grown < 30, f"peak RSS grew {grown:.1f} MiB under {sent} resume frames"
        assert resume(server, "flooded", 98)[-1]["type"] == "done"  # and it still answers
