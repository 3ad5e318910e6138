"""Browser origins: the socket's Origin check and CORS on the REST routes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from streaming_llm.app import create_app
from streaming_llm.http.origins import normalize_origin, parse_allowed_origins
from streaming_llm.settings import Settings, SettingsError

from .fakes import ScriptedEngine

SELF = "http://testserver"  # the TestClient's Host: a page served by this server


def app_client(make_settings: Callable[..., Settings], **overrides: str) -> TestClient:
    return TestClient(create_app(make_settings(**overrides)))


def socket_refused(client: TestClient, origin: str) -> bool:
    try:
        with client.websocket_connect("/ws/chat", headers={"Origin": origin}) as ws:
            ws.send_json({"type": "ping"})
            assert ws.receive_json()["type"] == "pong"
            return False
    except WebSocketDisconnect as exc:
        assert exc.code == 1008
        return True


def test_default_allows_same_origin_and_non_browser_clients_only(
        make_settings: Callable[..., Settings], scripted: ScriptedEngine) -> None:
    with app_client(make_settings) as client:
        with client.websocket_connect("/ws/chat") as ws:  # no Origin: not a browser
            ws.send_json({"type": "ping"})
            assert ws.receive_json()["type"] == "pong"
        assert not socket_refused(client, SELF)
        assert not socket_refused(client, "HTTP://TestServer:80")
        for origin in ["http://evil.example", "https://testserver", "http://testserver:8080",
                       "null", "file://", "", "http://testserver.evil.example",
                       "http://evil.example/http://testserver"]:
            assert socket_refused(client, origin), origin

        assert client.get("/agents", headers={"Origin": SELF}).status_code == 200
        resp = client.get("/agents", headers={"Origin": "http://evil.example"})
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "origin_not_allowed"
        assert "STREAMING_LLM_ALLOWED_ORIGINS" in resp.json()["error"]["message"]
        assert "access-control-allow-origin" not in resp.headers
        # A cross-site form post cannot create anything either.
        resp = client.put("/agents/x", headers={"Origin": "http://evil.example"},
                          content=b'{"name": "x"}')
        assert resp.status_code == 403
        assert client.get("/agents").json() == []


def test_listed_origins_get_the_socket_and_cors(make_settings: Callable[..., Settings],
                                                scripted: ScriptedEngine) -> None:
    app = "https://app.example.com"
    with app_client(make_settings,
                    allowed_origins=f" {app}/ , http://localhost:5173") as client:
        assert not socket_refused(client, app)
        assert not socket_refused(client, "http://localhost:5173")
        assert not socket_refused(client, SELF)  # the server's own pages still work
        assert socket_refused(client, "https://evil.example")
        assert socket_refused(client, "http://app.example.com")  # scheme is part of the origin

        resp = client.get("/agents", headers={"Origin": app})
        assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == app
        preflight = client.options("/agents/a", headers={
            "Origin": app, "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code == 200
        assert "PUT" in preflight.headers["access-control-allow-methods"]
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        bad = client.options("/agents/a", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "PUT"})
        assert bad.status_code == 403 and "access-control-allow-origin" not in bad.headers


def test_star_allows_any_origin(make_settings: Callable[..., Settings],
                                scripted: ScriptedEngine) -> None:
    with app_client(make_settings, allowed_origins="*") as client:
        assert not socket_refused(client, "https://anywhere.example")
        resp = client.get("/agents", headers={"Origin": "https://anywhere.example"})
        assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == "*"


def test_cors_with_keys_preflight_passes_and_401_is_readable(
        make_settings: Callable[..., Settings], scripted: ScriptedEngine) -> None:
    key = "k" * 32
    app = "https://app.example.com"
    with app_client(make_settings, allowed_origins=app, api_key=key) as client:
        preflight = client.options("/agents", headers={
            "Origin": app, "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization"})
        assert preflight.status_code == 200  # browsers send preflights without credentials
        resp = client.get("/agents", headers={"Origin": app})
        assert resp.status_code == 401 and resp.headers["access-control-allow-origin"] == app
        ok = client.get("/agents", headers={"Origin": app, "Authorization": f"Bearer {key}"})
        assert ok.status_code == 200


@pytest.mark.parametrize(("raw", "expected"), [
    ("HTTPS://App.Example.com:443/", "https://app.example.com"),
    ("http://localhost:5173", "http://localhost:5173"),
    ("http://[::1]:80", "http://[::1]"),
    ("https://a.example:8443", "https://a.example:8443"),
    ("app.example.com", None), ("ftp://a.example", None), ("https://a.example/path", None),
    ("https://user@a.example", None), ("https://a.example:99999", None), ("null", None),
])
def test_normalize_origin(raw: str, expected: str | None) -> None:
    assert normalize_origin(raw) == expected


def test_bad_origin_setting_stops_start_up(make_settings: Callable[..., Settings]) -> None:
    assert parse_allowed_origins("") == ()
    assert parse_allowed_origins("https://a.example, *") == ("*",)
    with pytest.raises(SettingsError, match=r"'app\.example\.com' is not an origin"):
        create_app(make_settings(allowed_origins="https://ok.example,app.example.com"))
