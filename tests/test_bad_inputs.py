"""The bad-input catalogue: one real server, every kind of bad input, each with its clear error.

Every case goes to the same ``streaming-llm serve`` process (echo engine, small limits) over real
HTTP and real WebSockets. Each case checks its status and stable error code and that the server
still answers; socket cases also check the socket is still usable where it should be. The last
test checks what is left behind: the database holds exactly the turns of the good requests made
alongside (nothing from a bad one: bad messages carry a marker), the agents directory holds
exactly the good agent's file, SQLite's integrity check passes and the log holds no traceback.

Single-purpose tests elsewhere (test_agents, test_chat, test_limits, test_auth, test_origins)
cover the same rules in-process; this file is the one place that lists them all against the real
server.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import sqlite3
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from streaming_llm.chat.agent_files import AgentFiles

from .server import ServerProcess, start_server

pytestmark = pytest.mark.e2e

MARK = "☠"  # every bad message carries it; nothing carrying it may be stored
LIMITS = {
    "STREAMING_LLM_MAX_FRAME_BYTES": "8192",
    "STREAMING_LLM_MAX_BODY_BYTES": "16384",
    "STREAMING_LLM_MAX_MESSAGE_CHARS": "2000",
    "STREAMING_LLM_MAX_NEW_TOKENS_LIMIT": "256",
    "STREAMING_LLM_MAX_NEW_TOKENS": "128",
    "STREAMING_LLM_MAX_QUEUED_TURNS": "2",
}
APP_ORIGIN = "https://app.example"  # the one listed origin (CORS)
GOOD_CONVERSATIONS: list[str] = []  # conversations made by the good requests of this module
CASES_RUN: list[str] = []


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "3",
           "STREAMING_LLM_ALLOWED_ORIGINS": APP_ORIGIN, **LIMITS}
    with start_server(tmp_path_factory.mktemp("catalogue"), env) as srv:
        status, _ = request(srv, "PUT", "/agents/helper",
                            json.dumps({"name": "Helper", "system_prompt": "Echo."}).encode())
        assert status == 201
        yield srv


def request(server: ServerProcess, method: str, path: str, body: Any = None,
            headers: dict[str, str] | None = None, **kwargs: Any) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {}, **kwargs)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw) if raw else None
    except ValueError:
        return resp.status, raw.decode(errors="replace")


def assert_alive(server: ServerProcess) -> None:
    assert server.proc.poll() is None, server.log()
    assert request(server, "GET", "/health")[0] == 200


# --- REST -------------------------------------------------------------------------------------
def _nested(depth: int) -> bytes:
    return b'{"name": ' + b"[" * depth + b"]" * depth + b"}"


def _chunks(total: int) -> Iterator[bytes]:
    yield b'{"name": "n", "system_prompt": "' + MARK.encode()
    for _ in range(total // 1000):
        yield b"x" * 1000
    yield b'"}'


J = {"content-type": "application/json"}
REST_CASES: list[tuple[str, str, str, Any, int, str]] = [
    # (case, method, path, body, status, code)
    ("body: not JSON", "PUT", "/agents/a1", b"not json", 400, "invalid_json"),
    ("body: empty", "PUT", "/agents/a1", b"", 400, "invalid_json"),
    ("body: truncated JSON", "PUT", "/agents/a1", b'{"name": "n', 400, "invalid_json"),
    ("body: invalid UTF-8", "PUT", "/agents/a1", b'{"name": "\xff\xfe"}', 400, "invalid_json"),
    ("body: JSON array", "PUT", "/agents/a1", b"[1, 2]", 422, "validation_error"),
    ("body: JSON string", "PUT", "/agents/a1", b'"name"', 422, "validation_error"),
    ("body: name missing", "PUT", "/agents/a1", b'{"system_prompt": "x"}', 422, "validation_error"),
    ("body: name wrong type", "PUT", "/agents/a1", b'{"name": 5}', 422, "validation_error"),
    ("body: name null", "PUT", "/agents/a1", b'{"name": null}', 422, "validation_error"),
    ("body: name blank", "PUT", "/agents/a1", b'{"name": "   "}', 400, "validation_error"),
    ("body: name over 200 chars", "PUT", "/agents/a1",
     json.dumps({"name": MARK * 201}).encode(), 422, "validation_error"),
    ("body: huge number", "PUT", "/agents/a1", b'{"name": "n", "system_prompt": 1e999}', 422,
     "validation_error"),
    ("body: NaN literal", "PUT", "/agents/a1", b'{"name": NaN}', 400, "invalid_json"),
    ("body: deep nesting", "PUT", "/agents/a1", _nested(5000), 422, "validation_error"),
    ("body: deep nesting in an unknown field", "PUT", "/agents/a1",
     b'{"name": "n", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "invalid_json"),
    ("body: id differs from path", "PUT", "/agents/a1", b'{"name": "n", "id": "a2"}', 400,
     "id_mismatch"),
    ("body: over the size limit", "PUT", "/agents/a1",
     json.dumps({"name": "n", "markdown_context": MARK * 20_000}).encode(), 413,
     "payload_too_large"),
    ("body: chunked over the limit", "PUT", "/agents/a1", "chunked", 413, "payload_too_large"),
    ("id: ../x", "GET", "/agents/..%2Fx", None, 400, "invalid_id"),
    ("id: %2e%2e", "GET", "/agents/%2e%2e", None, 400, "invalid_id"),
    ("id: raw ../ in path", "PUT", "/agents/../health", b'{"name": "n"}', 400, "invalid_id"),
    ("id: CON", "PUT", "/agents/CON", b'{"name": "n"}', 400, "invalid_id"),
    ("id: con (reserved device)", "PUT", "/agents/con", b'{"name": "n"}', 400, "invalid_id"),
    ("id: lpt1 (reserved device)", "PUT", "/agents/lpt1", b'{"name": "n"}', 400, "invalid_id"),
    ("id: NUL byte", "PUT", "/agents/a%00b", b'{"name": "n"}', 400, "invalid_id"),
    ("id: over 64 chars", "PUT", "/agents/" + "x" * 65, b'{"name": "n"}', 400, "invalid_id"),
    ("id: fullwidth letters", "PUT", "/agents/%EF%BD%81%EF%BD%82", b'{"name": "n"}', 400,
     "invalid_id"),
    ("id: fullwidth dots", "GET", "/agents/%EF%BC%8E%EF%BC%8E", None, 400, "invalid_id"),
    ("id: dot file", "PUT", "/agents/.hidden", b'{"name": "n"}', 400, "invalid_id"),
    ("id: trailing space", "PUT", "/agents/ok%20", b'{"name": "n"}', 400, "invalid_id"),
    ("id: upper case", "DELETE", "/agents/Helper", None, 400, "invalid_id"),
    ("id: backslash", "GET", "/agents/..%5Cx", None, 400, "invalid_id"),
    ("unknown agent: GET", "GET", "/agents/nobody", None, 404, "agent_not_found"),
    ("unknown agent: DELETE", "DELETE", "/agents/nobody", None, 404, "agent_not_found"),
    ("unknown conversation: GET", "GET", "/conversations/conv_missing", None, 404,
     "conversation_not_found"),
    ("unknown conversation: DELETE", "DELETE", "/conversations/conv_missing", None, 404,
     "conversation_not_found"),
    ("conversation id: path-like", "GET", "/conversations/..%2F..%2Fetc%2Fpasswd", None, 400,
     "invalid_id"),
    ("conversation id: NUL byte", "GET", "/conversations/conv%00x", None, 400, "invalid_id"),
    ("conversation id: over 128 chars", "GET", "/conversations/" + "c" * 129, None, 400,
     "invalid_id"),
    ("query: limit not a number", "GET", "/conversations?limit=abc", None, 400, "bad_request"),
    ("query: limit zero", "GET", "/conversations?limit=0", None, 400, "bad_request"),
    ("query: limit huge", "GET", "/conversations?limit=99999999999999999999", None, 400,
     "bad_request"),
    ("query: negative offset", "GET", "/conversations?offset=-5", None, 400, "bad_request"),
    ("query: agent_id path-like", "GET", "/conversations?agent_id=../x", None, 400, "invalid_id"),
    ("method not allowed", "POST", "/agents", b"{}", 405, "method_not_allowed"),
    ("unknown route", "GET", "/admin", None, 404, "not_found"),
]


@pytest.mark.parametrize(("case", "method", "path", "body", "status", "code"), REST_CASES,
                         ids=[c[0] for c in REST_CASES])
def test_rest(server: ServerProcess, case: str, method: str, path: str, body: Any, status: int,
              code: str) -> None:
    kwargs: dict[str, Any] = {}
    if body == "chunked":
        body, kwargs = _chunks(20_000), {"encode_chunked": True}
    got, payload = request(server, method, path, body, J, **kwargs)
    assert got == status, (case, payload)
    assert payload["error"]["code"] == code and payload["error"]["message"], payload
    assert_alive(server)
    CASES_RUN.append(case)


def test_rest_malformed_request_line(server: ServerProcess) -> None:
    # A NUL byte in the raw request line never reaches the app: the HTTP parser refuses it.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /agents/a\x00b HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")
    assert_alive(server)
    CASES_RUN.append("raw NUL in request line")


# --- socket -----------------------------------------------------------------------------------
def chat(message: str = f"{MARK} bad", **fields: Any) -> str:
    return json.dumps({"type": "chat", "agent_id": "helper", "message": message, **fields},
                      ensure_ascii=False)


SOCKET_CASES: list[tuple[str, str, str]] = [
    # (case, frame, code)
    ("frame: not JSON", f"{MARK} hello", "invalid_json"),
    ("frame: empty", "", "invalid_json"),
    ("frame: NaN literal", chat(options="NaN").replace('"NaN"', "NaN"), "invalid_json"),
    ("frame: lone surrogate escape", chat().replace("bad", "\\ud800"), "invalid_json"),
    ("frame: JSON array", "[]", "invalid_frame"),
    ("frame: JSON number", "42", "invalid_frame"),
    ("frame: no type", json.dumps({"agent_id": "helper", "message": MARK}), "invalid_frame"),
    ("frame: unknown type", json.dumps({"type": "dance"}), "unknown_type"),
    ("frame: type wrong type", json.dumps({"type": 7}), "unknown_type"),
    ("frame: unknown field", chat(extra=1), "invalid_frame"),
    ("frame: deep nesting", '{"type": "chat", "agent_id": "helper", "message": ' + "[" * 2000
     + "]" * 2000 + "}", "invalid_frame"),
    ("frame: deep nesting in an unknown field", '{"type": "ping", "x": ' + "[" * 3000
     + "]" * 3000 + "}", "invalid_frame"),
    ("message: missing", json.dumps({"type": "chat", "agent_id": "helper"}), "invalid_frame"),
    ("message: empty", chat(""), "invalid_frame"),
    ("message: wrong type", json.dumps({"type": "chat", "agent_id": "helper", "message": 123}),
     "invalid_frame"),
    ("message: over the limit", chat(MARK * 2001), "message_too_large"),
    ("frame: over the limit", chat(MARK + "x" * 9000), "frame_too_large"),
    ("options: negative temperature", chat(options={"temperature": -1}), "invalid_frame"),
    ("options: temperature as string", chat(options={"temperature": "hot"}), "invalid_frame"),
    ("options: huge temperature", chat(options={"temperature": 1e308}), "invalid_frame"),
    ("options: negative max_new_tokens", chat(options={"max_new_tokens": -5}), "invalid_frame"),
    ("options: float max_new_tokens", chat(options={"max_new_tokens": 1e30}), "invalid_frame"),
    ("options: max_new_tokens over the ceiling", chat(options={"max_new_tokens": 100_000}),
     "max_new_tokens_too_large"),
    ("options: zero top_p", chat(options={"top_p": 0}), "invalid_frame"),
    ("options: negative seed", chat(options={"seed": -1}), "invalid_frame"),
    ("options: 2**64 seed", chat(options={"seed": 2**64}), "invalid_frame"),
    ("options: stop not a list", chat(options={"stop": "x"}), "invalid_frame"),
    ("options: too many stops", chat(options={"stop": ["s"] * 17}), "invalid_frame"),
    ("options: empty stop string", chat(options={"stop": [""]}), "invalid_frame"),
    ("options: unknown option", chat(options={"beam": 4}), "invalid_frame"),
    ("agent_id: ../x", chat(agent_id="../x"), "invalid_frame"),
    ("agent_id: CON", chat(agent_id="CON"), "invalid_frame"),
    ("agent_id: fullwidth", chat(agent_id="\uff48\uff45\uff4c\uff50\uff45\uff52"), "invalid_frame"),
    ("agent_id: NUL byte", chat(agent_id="help\u0000er"), "invalid_frame"),
    ("agent_id: unknown", chat(agent_id="nobody"), "agent_not_found"),
    ("agent_id: reserved device name", chat(agent_id="nul"), "agent_not_found"),
    ("conversation_id: unknown", chat(conversation_id="conv_missing"), "conversation_not_found"),
    ("conversation_id: path-like", chat(conversation_id="../../etc/passwd"), "invalid_id"),
    ("conversation_id: %2e%2e", chat(conversation_id="%2e%2e"), "invalid_id"),
    ("conversation_id: NUL byte", chat(conversation_id="conv\u0000x"), "invalid_id"),
    ("conversation_id: over 128 chars", chat(conversation_id="c" * 129), "invalid_frame"),
    ("request_id: empty", chat(request_id=""), "invalid_frame"),
    ("request_id: wrong type", chat(request_id=5), "invalid_frame"),
    ("cancel: unknown request", json.dumps({"type": "cancel", "request_id": "ghost"}),
     "unknown_request"),
    ("cancel: unknown field", json.dumps({"type": "cancel", "everything": True}), "invalid_frame"),
    ("ping: request_id wrong type", json.dumps({"type": "ping", "request_id": []}),
     "invalid_frame"),
]


def ping_pong(ws: ClientConnection) -> None:
    ws.send(json.dumps({"type": "ping", "request_id": "alive"}))
    assert json.loads(ws.recv(timeout=10)) == {"type": "pong", "request_id": "alive"}


@pytest.mark.parametrize(("case", "frame", "code"), SOCKET_CASES, ids=[c[0] for c in SOCKET_CASES])
def test_socket(server: ServerProcess, case: str, frame: str, code: str) -> None:
    with connect(server.ws_url, max_size=None) as ws:
        ws.send(frame)
        error = json.loads(ws.recv(timeout=10))
        assert (error["type"], error["code"]) == ("error", code), (case, error)
        assert error["message"]
        ping_pong(ws)  # the socket stays usable
    CASES_RUN.append(case)


def run_turn(ws: ClientConnection, message: str, **fields: Any) -> tuple[dict[str, Any], str, dict[str, Any]]:
    ws.send(json.dumps({"type": "chat", "agent_id": "helper", "message": message, **fields}))
    start = json.loads(ws.recv(timeout=10))
    assert start["type"] == "start", start
    text = ""
    while (frame := json.loads(ws.recv(timeout=10)))["type"] == "token":
        text += frame["token"]
    return start, text, frame


def test_socket_binary_frame(server: ServerProcess) -> None:
    with connect(server.ws_url) as ws:
        ws.send(b"\x00\x01binary")
        assert json.loads(ws.recv(timeout=10))["code"] == "bad_frame"
        ping_pong(ws)
    CASES_RUN.append("binary frame")


def test_socket_frame_beyond_the_transport_cap_closes_only_that_socket(server: ServerProcess) -> None:
    with connect(server.ws_url, max_size=None) as ws:
        ws.send("x" * (4 * 8192 + 1))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009  # message too big
    with connect(server.ws_url) as ws:
        ping_pong(ws)
    assert_alive(server)
    CASES_RUN.append("frame beyond the transport cap")


def test_socket_second_chat_queues_extra_ones_are_busy_duplicates_refused(
        server: ServerProcess) -> None:
    words = " ".join(f"w{i}" for i in range(40))
    with connect(server.ws_url) as ws:
        for rid in ("t0", "t1", "t2"):
            if rid == "t1":
                assert json.loads(ws.recv(timeout=10))["type"] == "start"  # t0 runs
            ws.send(chat(words, request_id=rid).replace(MARK, ""))
        ws.send(chat(request_id="t1"))  # duplicate of a queued request
        ws.send(chat(request_id="t3"))  # t1 and t2 fill the socket's queue (limit 2)
        frames = []
        while sum(f["type"] == "done" for f in frames) < 3:
            frames.append(json.loads(ws.recv(timeout=20)))
        ping_pong(ws)
    errors = [(f["request_id"], f["code"]) for f in frames if f["type"] == "error"]
    assert errors == [("t1", "duplicate_request_id"), ("t3", "busy")]
    starts = [f["request_id"] for f in frames if f["type"] == "start"]
    assert starts == ["t1", "t2"]  # t0's start was read above; the queued ones run in order
    GOOD_CONVERSATIONS.extend(f["conversation_id"] for f in frames if f["type"] == "done")
    CASES_RUN.extend(["second chat while one runs", "duplicate request id", "socket queue full"])


def test_socket_good_turn_after_bad_ones(server: ServerProcess) -> None:
    with connect(server.ws_url) as ws:
        for frame, _ in [(c[1], c[2]) for c in SOCKET_CASES[:5]]:
            ws.send(frame)
            assert json.loads(ws.recv(timeout=10))["type"] == "error"
        start, text, done = run_turn(ws, "still fine")
    assert text == "still fine" and done["type"] == "done"
    GOOD_CONVERSATIONS.append(start["conversation_id"])


def test_socket_conversation_of_another_agent(server: ServerProcess) -> None:
    assert request(server, "PUT", "/agents/other", b'{"name": "Other"}', J)[0] == 201
    try:
        with connect(server.ws_url) as ws:
            start, _, _ = run_turn(ws, "mine")
            GOOD_CONVERSATIONS.append(start["conversation_id"])
            ws.send(chat(agent_id="other", conversation_id=start["conversation_id"]))
            assert json.loads(ws.recv(timeout=10))["code"] == "conversation_agent_mismatch"
            ping_pong(ws)
    finally:
        assert request(server, "DELETE", "/agents/other")[0] == 204
    CASES_RUN.append("conversation of another agent")


def _ws_frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload)) + mask + masked


def _raw_socket(server: ServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws/chat HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                  "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    assert sock.recv(4096).startswith(b"HTTP/1.1 101")
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def test_socket_frames_after_close(server: ServerProcess) -> None:
    sock = _raw_socket(server)
    # One write, so the frames after the close frame reach the server with it.
    sock.sendall(_ws_frame(0x8, struct.pack("!H", 1000))
                 + _ws_frame(0x1, b'{"type": "chat", "agent_id": "helper", "message": "' + MARK.encode() + b'"}')
                 + _ws_frame(0x1, b'{"type": "ping"}'))
    data = _read_until_closed(sock)
    sock.close()
    assert b"pong" not in data and b"start" not in data  # nothing after close is handled
    assert_alive(server)
    CASES_RUN.append("frames after close")


def test_socket_invalid_utf8_text_frame(server: ServerProcess) -> None:
    sock = _raw_socket(server)
    sock.sendall(_ws_frame(0x1, b'{"type": "ping", "request_id": "\xff"}'))
    data = _read_until_closed(sock)
    sock.close()
    assert data[:1] == b"\x88" and struct.unpack("!H", data[2:4])[0] == 1007  # invalid payload
    assert_alive(server)
    CASES_RUN.append("invalid UTF-8 in a text frame")


def test_socket_from_a_foreign_origin_is_refused(server: ServerProcess) -> None:
    with pytest.raises(InvalidStatus) as refused:
        connect(server.ws_url, origin="https://evil.example")  # type: ignore[arg-type]
    assert refused.value.response.status_code == 403
    status, payload = request(server, "PUT", "/agents/evil", b'{"name": "n"}',
                              {**J, "Origin": "https://evil.example"})
    assert (status, payload["error"]["code"]) == (403, "origin_not_allowed")
    CASES_RUN.extend(["socket from a foreign origin", "REST from a foreign origin"])


def _handshake(server: ServerProcess, host: str, origin: str) -> bytes:
    """The status line a raw WebSocket handshake with this ``Host`` and ``Origin`` gets."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall((f"GET /ws/chat HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\n"
                      "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        return sock.recv(4096).split(b"\r\n", 1)[0]


def test_dns_rebinding_is_refused(server: ServerProcess) -> None:
    # A page on http://evil.example:PORT whose name now resolves to 127.0.0.1 is "same-origin"
    # by its Host header; the Host check refuses it before the origin check is asked.
    evil = f"evil.example:{server.port}"
    for headers in ({"Host": evil, "Origin": f"http://{evil}"}, {"Host": evil}):
        status, payload = request(server, "GET", "/agents", headers=headers)
        assert (status, payload["error"]["code"]) == (400, "host_not_allowed"), payload
        status, payload = request(server, "PUT", "/agents/evil", b'{"name": "n"}',
                                  {**J, **headers})
        assert (status, payload["error"]["code"]) == (400, "host_not_allowed"), payload
    assert _handshake(server, evil, f"http://{evil}") == b"HTTP/1.1 400 Bad Request"
    # The server's real names still work, same-origin pages included.
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}"):
        status, _ = request(server, "GET", "/agents", headers={"Host": host,
                                                               "Origin": f"http://{host}"})
        assert status == 200, host
        assert _handshake(server, host, f"http://{host}") == b"HTTP/1.1 101 Switching Protocols"
    CASES_RUN.extend(["DNS rebinding: REST", "DNS rebinding: socket"])


def test_cors_lets_a_listed_page_name_the_conversation(server: ServerProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("OPTIONS", "/v1/chat/completions", headers={
            "Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-conversation-id"})
        resp = conn.getresponse()
        resp.read()
    finally:
        conn.close()
    assert resp.status == 200
    assert "x-conversation-id" in resp.headers["access-control-allow-headers"].lower()
    CASES_RUN.append("CORS preflight naming X-Conversation-Id")


# --- what is left behind ----------------------------------------------------------------------
def test_catalogue_left_nothing_wrong_behind(server: ServerProcess) -> None:
    """Runs last (file order): the database and the agents directory after the whole catalogue."""
    assert_alive(server)
    assert len(set(CASES_RUN)) >= 40, sorted(CASES_RUN)
    with sqlite3.connect(server.db_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT id FROM agents").fetchall() == [("helper",)]
        conversations = {r[0] for r in db.execute("SELECT id FROM conversations")}
        assert conversations == set(GOOD_CONVERSATIONS)
        assert db.execute("SELECT count(*) FROM turns WHERE content LIKE ?",
                          (f"%{MARK}%",)).fetchone() == (0,)
        for conv in conversations:
            rows = db.execute("SELECT seq, role, finish_reason FROM turns WHERE conversation_id = ?"
                              " ORDER BY seq", (conv,)).fetchall()
            assert [r[0] for r in rows] == list(range(len(rows))) and len(rows) % 2 == 0
            assert all(r[1] == ("user" if r[0] % 2 == 0 else "assistant") for r in rows)
            assert all(r[2] == "stop" for r in rows[1::2])
        orphans = db.execute("SELECT count(*) FROM turns WHERE conversation_id NOT IN "
                             "(SELECT id FROM conversations)").fetchone()
        assert orphans == (0,)
    agents_dir: Path = server.data_dir / "agents"
    assert sorted(p.name for p in agents_dir.iterdir()) == ["helper.md"]
    assert [f.id for f in AgentFiles(agents_dir).scan()] == ["helper"]
    assert not list(server.data_dir.glob("**/*.tmp"))
    assert sorted(p.name for p in server.data_dir.iterdir()) == [
        "agents", "streaming_llm.db", "streaming_llm.db-shm", "streaming_llm.db-wal"]
    log = server.log()
    assert "internal_error" not in log and "ERROR streaming_llm" not in log, log[-3000:]
    # uvicorn logs one traceback of its own for the invalid UTF-8 frame; nothing else may.
    assert log.count("Traceback") == log.count("Invalid UTF-8 sequence received"), log[-3000:]
