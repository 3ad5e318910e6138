"""API keys on REST and on the socket: in-process with the real app, then a real server."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from streaming_llm.app import create_app
from streaming_llm.client import ApiError, ChatError, list_agents, stream_chat
from streaming_llm.http.auth import load_api_keys
from streaming_llm.logs import Redact
from streaming_llm.settings import Settings, SettingsError

from .fakes import ScriptedEngine
from .server import http, start_server

KEY = secrets.token_urlsafe(24)
OTHER = secrets.token_urlsafe(24)


@pytest.fixture
def secured(make_settings: Callable[..., Settings], scripted: ScriptedEngine) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(api_key=f"{KEY}, {OTHER}"), engine=scripted)) as c:
        yield c


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


BAD_HEADERS = [
    {},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer wrong-key-wrong-key"},
    {"Authorization": f"Basic {KEY}"},
    {"Authorization": f"Bearer {KEY}x"},
    {"Authorization": f"Bearer {KEY[:-1]}"},
]
ROUTES = [("GET", "/agents"), ("PUT", "/agents/a"), ("DELETE", "/agents/a"),
          ("GET", "/conversations"), ("GET", "/conversations/conv_x"), ("GET", "/no-such-route")]


def test_rest_without_a_valid_key_is_401(secured: TestClient) -> None:
    for headers in BAD_HEADERS:
        for method, path in ROUTES:
            resp = secured.request(method, path, headers=headers, json={"name": "n"})
            assert resp.status_code == 401, (method, path, headers, resp.text)
            message = resp.json()["error"]["message"]
            assert resp.json()["error"]["code"] == "unauthorized"
            assert "Authorization: Bearer" in message
            assert message.startswith("invalid" if headers.get("Authorization", "").startswith(
                "Bearer ") else "missing"), message
            assert resp.headers["www-authenticate"].startswith("Bearer")
            assert KEY not in resp.text
    assert secured.get("/agents", headers=auth()).json() == []  # the PUTs stored nothing


def test_rest_with_either_key_works_and_health_is_public(secured: TestClient) -> None:
    assert secured.put("/agents/a", json={"name": "A"}, headers=auth(KEY)).status_code == 201
    assert secured.get("/agents", headers=auth(OTHER)).json()[0]["id"] == "a"
    assert secured.get("/agents", headers={"Authorization": f"bearer  {KEY} "}).status_code == 200
    assert secured.get("/health").status_code == 200


def test_socket_without_a_valid_key_is_refused_before_accept(secured: TestClient) -> None:
    for path, kwargs in [
        ("/ws/chat", {}),
        ("/ws/chat", {"subprotocols": ["bearer"]}),
        ("/ws/chat", {"subprotocols": ["bearer", "not-the-key-at-all"]}),
        ("/ws/chat", {"subprotocols": ["bearer.not-the-key-at-all"]}),
        ("/ws/chat", {"subprotocols": [KEY]}),  # a bare key is not a credential
        ("/ws/chat", {"headers": {"Authorization": "Bearer nope-nope-nope-nope"}}),
        ("/ws/chat?token=", {}),
        ("/ws/chat?token=short", {}),
        (f"/ws/chat?token={OTHER}x", {}),
        (f"/ws/chat?tok={KEY}", {}),
    ]:
        with pytest.raises(WebSocketDisconnect) as refused, \
                secured.websocket_connect(path, **kwargs):
            pass  # pragma: no cover - never reached
        assert refused.value.code == 1008, (path, kwargs)


@pytest.mark.parametrize(("path", "kwargs", "accepted"), [
    (f"/ws/chat?token={KEY}", {}, None),
    (f"/ws/chat?x=1&token={OTHER}", {}, None),
    ("/ws/chat", {"subprotocols": ["bearer", KEY]}, "bearer"),
    ("/ws/chat", {"subprotocols": ["bearer", "bearer." + KEY]}, "bearer"),
    ("/ws/chat", {"subprotocols": ["bearer." + KEY]}, None),
    ("/ws/chat", {"headers": {"Authorization": f"Bearer {KEY}"}}, None),
], ids=["query", "query-second-key", "subprotocol-pair", "subprotocol-both", "subprotocol-dotted",
        "header"])
def test_socket_with_a_valid_key_is_accepted(secured: TestClient, path: str,
                                             kwargs: dict[str, Any], accepted: str | None) -> None:
    with secured.websocket_connect(path, **kwargs) as ws:
        assert ws.accepted_subprotocol == accepted
        ws.send_json({"type": "ping", "request_id": "p"})
        assert ws.receive_json() == {"type": "pong", "request_id": "p"}


def test_without_keys_the_bearer_subprotocol_is_still_answered(client: TestClient) -> None:
    # A client configured with a key keeps working against a server that needs none.
    with client.websocket_connect("/ws/chat", subprotocols=["bearer", KEY]) as ws:
        assert ws.accepted_subprotocol == "bearer"
    assert client.get("/agents").status_code == 200


def test_key_file_with_comments(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# deploy keys\n\n{KEY}  # laptop\n  {OTHER}\n{KEY}\n")
    keys = load_api_keys(make_settings(api_key_file=path, api_key="x" * 20))
    assert keys == ("x" * 20, KEY, OTHER)


@pytest.mark.parametrize(("content", "expected"), [
    (None, "cannot be read"),
    ("# only a comment\n\n", "holds no key"),
    ("short\n", "not usable"),
    ("has space in it 1234567890\n", "not usable"),
    ("plus+slash/equals=0123456789\n", "not usable"),
])
def test_unusable_key_file_stops_start_up(make_settings: Callable[..., Settings], tmp_path: Path,
                                          content: str | None, expected: str) -> None:
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    settings = make_settings(api_key_file=path)
    with pytest.raises(SettingsError, match=expected) as err:
        create_app(settings)
    if expected == "not usable":  # the message says what is wrong, never what the key is
        assert content is not None and content.strip() not in str(err.value)


def test_cli_reports_an_unusable_key_without_printing_it(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from streaming_llm.cli import main

    monkeypatch.setenv("STREAMING_LLM_API_KEY", "tiny-secret")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and "API key (11 characters)" in err
    assert "tiny-secret" not in err


# pytest-xdist's workers must collect the same ids, so KEY (random) stays out of them.
@pytest.mark.parametrize(("line", "masked"), [
    (f"/ws/chat?token={KEY}&x=1", "/ws/chat?token=***&x=1"),
    (f"< authorization: Bearer {KEY}", "< authorization: Bearer ***"),
    (f"< sec-websocket-protocol: bearer, {KEY}", "< sec-websocket-protocol: bearer ***"),
    (f"< sec-websocket-protocol: chat, bearer.{KEY}", "< sec-websocket-protocol: chat, bearer ***"),
    ("> sec-websocket-protocol: bearer", "> sec-websocket-protocol: bearer"),
    (f"a bare {KEY} in a message", "a bare *** in a message"),
], ids=["query token", "authorization header", "subprotocol bearer", "subprotocol bearer.key",
        "subprotocol without key", "bare key"])
def test_log_lines_never_carry_a_key(line: str, masked: str) -> None:
    record = logging.LogRecord("uvicorn.error", logging.DEBUG, __file__, 1, "%s", (line,), None)
    Redact([KEY]).filter(record)
    assert record.getMessage() == masked


# --- real server ------------------------------------------------------------------------------
async def _python_client(base_url: str) -> tuple[str, ApiError, ChatError]:
    """streaming_llm.client with and without ``api_key``."""
    assert [a.id for a in await list_agents(base_url, api_key=KEY)] == ["echoer"]
    async with stream_chat(base_url, "echoer", api_key=KEY) as chat:
        text = (await chat.send_message("through the client")).text
    with pytest.raises(ApiError) as denied:
        await list_agents(base_url)
    with pytest.raises(ChatError) as refused:
        async with stream_chat(base_url, "echoer"):
            pass  # pragma: no cover - refused
    return text, denied.value, refused.value

@pytest.mark.e2e
def test_real_server_keys_on_the_wire_and_never_in_the_log(tmp_path: Path) -> None:
    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "0",
           "STREAMING_LLM_API_KEY": KEY, "STREAMING_LLM_LOG_LEVEL": "debug"}
    with start_server(tmp_path, env) as server:
        assert http("GET", server.base_url + "/agents")[0] == 401
        status, _ = http("PUT", server.base_url + "/agents/echoer", {"name": "E"}, headers=auth())
        assert status == 201
        # The browser way: subprotocols ["bearer", key]; the server selects "bearer".
        with connect(server.ws_url, subprotocols=["bearer", KEY]) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "bearer"
            ws.send(json.dumps({"type": "chat", "agent_id": "echoer", "message": "hi there"}))
            assert json.loads(ws.recv(timeout=10))["type"] == "start"
        with connect(f"{server.ws_url}?token={KEY}") as ws:
            ws.send(json.dumps({"type": "ping"}))
            assert json.loads(ws.recv(timeout=10))["type"] == "pong"
        for url, protocols in [(server.ws_url, None), (f"{server.ws_url}?token=wrong-wrong-wrong", None),
                               (server.ws_url, ["bearer", "wrong-wrong-wrong-wrong"])]:
            with pytest.raises(InvalidStatus) as refused:
                connect(url, subprotocols=protocols)  # type: ignore[arg-type]
            assert refused.value.response.status_code == 403
        assert http("GET", server.base_url + "/health")[0] == 200
        text, denied, refused_socket = asyncio.run(_python_client(server.base_url))
        assert text == "through the client"
        assert (denied.status, denied.code) == (401, "unauthorized")
        assert refused_socket.code == "socket_open_failed" and "403" in refused_socket.message
        log = server.log()
    assert KEY not in log
    assert "token=***" in log and "bearer ***" in log
    assert "refused socket /ws/chat" in log
