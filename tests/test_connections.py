"""Connection caps, read deadlines and bounded pongs (:mod:`streaming_llm.http.connections`), each
against a real ``streaming-llm serve`` over raw TCP sockets: what a hostile client does."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from .server import ServerProcess, http, start_server, wait_healthy

pytestmark = pytest.mark.e2e


def rss_kib(server: ServerProcess, field: str = "VmRSS") -> int:
    """The server process's resident memory (``VmHWM``: its peak so far), in KiB."""
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{server.proc.pid}/status")


def open_socket(server: ServerProcess, source: str = "127.0.0.1", rcvbuf: int | None = None,
                timeout: float = 10) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:  # before connect, so the window the server sees is small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", server.port))
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (or the socket's timeout passes)."""
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def closed_by_server(sock: socket.socket) -> bool:
    """True when the server closed the connection without a byte (end of stream or a reset);
    False when the socket's timeout passed first or an answer came."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def get(sock: socket.socket, path: str = "/health") -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    return read_all(sock)


def handshake(sock: socket.socket) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(("GET /ws/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101"), response


def ws_frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    if len(payload) < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload))
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, len(payload))
    return head + mask + masked


def refused_metric(server: ServerProcess, reason: str) -> float:
    with open_socket(server) as sock:
        text = get(sock, "/metrics").decode()
    for line in text.splitlines():
        if line.startswith(f'streaming_llm_connections_refused_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_MAX_CONNECTIONS": "8",
           "STREAMING_LLM_MAX_CONNECTIONS_PER_ADDRESS": "5",
           "STREAMING_LLM_HEADER_TIMEOUT_S": "1", "STREAMING_LLM_BODY_TIMEOUT_S": "1"}
    with start_server(tmp_path_factory.mktemp("connections"), env) as srv:
        yield srv


# --- caps -------------------------------------------------------------------------------------
def test_connections_over_the_caps_get_503_and_are_counted(server: ServerProcess) -> None:
    held = []
    try:
        for _ in range(5):  # the per-address cap; each holds its connection open with a socket
            sock = open_socket(server)
            handshake(sock)
            held.append(sock)
        with open_socket(server) as sock:  # the 6th from this address
            answer = get(sock)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), answer
        assert b"retry-after: 5" in head.lower()
        error = json.loads(body)["error"]
        assert error["code"] == "too_many_connections"
        assert "STREAMING_LLM_MAX_CONNECTIONS_PER_ADDRESS" in error["message"]
        with pytest.raises(InvalidStatus) as refused:
            connect(server.ws_url, open_timeout=10)
        assert refused.value.response.status_code == 503

        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.3"):  # other addresses: 8 in all
            sock = open_socket(server, source)
            handshake(sock)
            held.append(sock)
        with open_socket(server, "127.0.0.4") as sock:  # the server-wide cap
            answer = get(sock)
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert b"STREAMING_LLM_MAX_CONNECTIONS)" in answer
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.5)  # the server notices the closes
    assert http("GET", server.base_url + "/health")[0] == 200  # room again
    assert refused_metric(server, "too_many_connections_per_address") >= 2
    assert refused_metric(server, "too_many_connections") >= 1


# --- deadlines --------------------------------------------------------------------------------
def test_slow_headers_are_cut_off(server: ServerProcess) -> None:
    # The deadline is 1 s; uvicorn alone never closes such a connection, so a close seen before
    # the sockets' own 10 s timeout is the server's doing.
    with open_socket(server) as silent, open_socket(server) as trickle:
        trickle.sendall(b"GET /health HTTP/1.1\r\n")
        for _ in range(20):  # a header byte every 0.25 s: never done, never quiet
            try:
                trickle.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.25)
        assert closed_by_server(trickle)  # closed without an answer
        assert closed_by_server(silent)  # connected and never said a word: closed too
    assert refused_metric(server, "header_timeout") >= 2
    assert http("GET", server.base_url + "/health")[0] == 200


def test_endless_headers_are_refused(server: ServerProcess) -> None:
    with open_socket(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(100):  # 100 KiB of headers within the deadline
                sock.sendall(b"X-Pad: " + b"a" * 1017 + b"\r\n")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 400") or answer == b"", answer
    assert refused_metric(server, "headers_too_large") >= 1


def test_slow_body_gets_408_and_the_connection_closes(server: ServerProcess) -> None:
    with open_socket(server) as sock:
        sock.sendall(b"PUT /agents/slow HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"name\"")
        answer = read_all(sock)  # the server closes after its answer
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert http("GET", server.base_url + "/agents/slow")[0] == 404


# --- pongs ------------------------------------------------------------------------------------
def test_ping_flood_on_a_socket_that_never_reads_does_not_grow_memory(
        server: ServerProcess) -> None:
    with open_socket(server, rcvbuf=4096, timeout=30) as sock:
        handshake(sock)
        before = rss_kib(server)
        batch = ws_frame(0x9, b"p" * 125) * 8000  # 8000 pings of 125 bytes: 1 MiB of pongs
        for _ in range(40):
            sock.sendall(batch)
        time.sleep(1)  # the server reads what is still in flight
        grown_mib = (rss_kib(server) - before) / 1024
    print(f"RSS growth after 40 MiB of pings, never read: {grown_mib:.1f} MiB")
    assert grown_mib < 15, grown_mib  # uvicorn alone buffers every pong: 40+ MiB
    assert http("GET", server.base_url + "/health")[0] == 200


def test_refused_connections_do_not_hold_the_server(server: ServerProcess) -> None:
    # A burst far over the cap: each gets its 503 and goes; the server keeps answering.
    answers = []
    for _ in range(30):
        with open_socket(server) as sock:
            answers.append(get(sock)[:12])
    assert set(answers) == {b"HTTP/1.1 200"}  # one at a time: never over the cap
    socks = [open_socket(server) for _ in range(20)]
    try:
        time.sleep(0.5)  # the server accepts them all before the first request is answered
        for sock in socks:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        codes = [read_all(sock)[:12] for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    assert codes.count(b"HTTP/1.1 200") == 5 and codes.count(b"HTTP/1.1 503") == 15, codes
    time.sleep(0.5)
    assert http("GET", server.base_url + "/health")[0] == 200


# --- the 300-socket test ----------------------------------------------------------------------
def test_memory_with_300_sockets_that_never_read(tmp_path: Path) -> None:
    """300 sockets from one address, each sending 3 long chats and never reading."""
    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "0"}
    with start_server(tmp_path, env) as srv:
        assert http("PUT", srv.base_url + "/agents/helper", {"name": "Helper"})[0] == 201
        baseline = rss_kib(srv)
        # 195 000 characters, 4 bytes each in UTF-8: a ~780 KB frame, under both limits
        message = " ".join(["\U0001f600" * 4] * 39_000)
        frame = ws_frame(0x1, json.dumps({"type": "chat", "agent_id": "helper", "message": message},
                                         ensure_ascii=False).encode())
        socks, refused = [], 0
        try:
            for _ in range(300):
                sock = open_socket(srv, rcvbuf=4096, timeout=10)
                try:
                    handshake(sock)
                except AssertionError:  # over the per-address cap: 503
                    refused += 1
                    sock.close()
                    continue
                for _ in range(3):
                    sock.sendall(frame)
                socks.append(sock)
            time.sleep(5)  # turns start, stall on the unread sockets
            peak = rss_kib(srv, "VmHWM")
        finally:
            for sock in socks:
                sock.close()
        time.sleep(2)
        after = rss_kib(srv)
        assert http("GET", srv.base_url + "/health")[0] == 200
    print(f"300 non-reading sockets: {len(socks)} accepted, {refused} refused; RSS baseline "
          f"{baseline / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB, after {after / 1024:.0f} MiB")
    assert refused == 300 - 100 and len(socks) == 100  # STREAMING_LLM_MAX_CONNECTIONS_PER_ADDRESS
    assert (peak - baseline) / 1024 < 1024, peak


def test_a_flood_under_a_small_descriptor_limit_leaves_room_for_others(tmp_path: Path) -> None:
    """300 connections that never send a byte, from one address, on a server limited to 256
    descriptors: uvicorn alone accepts until it runs out and then answers nobody."""
    import resource

    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_MAX_CONNECTIONS": "100",
           "STREAMING_LLM_MAX_CONNECTIONS_PER_ADDRESS": "50",
           "STREAMING_LLM_HEADER_TIMEOUT_S": "60"}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # inherited by the server
    try:
        server_cm = start_server(tmp_path, env, wait=False)
        srv = server_cm.__enter__()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        wait_healthy(srv.base_url, srv.proc, 120, srv.log_path)
        flood = []
        try:
            for _ in range(300):
                flood.append(open_socket(srv, timeout=10))
            time.sleep(1)
            with open_socket(srv, "127.0.0.2") as sock:  # another client
                assert get(sock).startswith(b"HTTP/1.1 200")
        finally:
            for sock in flood:
                sock.close()
        assert srv.proc.poll() is None
    finally:
        server_cm.__exit__(None, None, None)
