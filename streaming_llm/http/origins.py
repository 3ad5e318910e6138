"""Browser origins: which web pages may call the API and open the chat socket.

Browsers attach ``Origin`` to cross-origin requests and to every WebSocket handshake, and a
WebSocket is not covered by CORS: without a check, any page a user visits could open
``ws://127.0.0.1:8000/ws/chat`` and read or spend their conversations. So:

- A request or socket that carries an ``Origin`` is refused unless that origin is listed in
  ``STREAMING_LLM_ALLOWED_ORIGINS`` or is the server's own origin (its ``Host`` header — a page
  served by this server — and only when that host is one of ``STREAMING_LLM_ALLOWED_HOSTS``,
  :mod:`streaming_llm.http.hosts`, so a rebound DNS name is never "own"). HTTP answers ``403 origin_not_allowed``; a socket is closed before it
  is accepted (the client sees HTTP 403).
- Requests without ``Origin`` (curl, SDKs, servers, the Python client) pass: they are not browsers
  acting for someone else. Authentication is the API key's job (:mod:`streaming_llm.http.auth`).
- CORS headers for the REST routes follow the same list (Starlette's ``CORSMiddleware``); with
  an empty list none are sent. ``*`` allows every origin (keys then carry all the protection).

"Own origin" compares scheme, host and port with the request's. Behind a reverse proxy, forward
``Host`` and ``X-Forwarded-Proto`` (nginx: ``proxy_set_header Host $host``) and list the proxy in
``STREAMING_LLM_TRUSTED_PROXIES`` (:mod:`streaming_llm.http.proxies`; from other peers the header
is ignored), or list the public origin, or the server's own pages look cross-origin.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from urllib.parse import urlsplit

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import ServiceError
from ..settings import Settings, SettingsError
from .hosts import HostPolicy
from .responses import error_response

log = logging.getLogger(__name__)

_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


class OriginNotAllowed(ServiceError):
    code, status = "origin_not_allowed", 403


def normalize_origin(value: str) -> str | None:
    """``scheme://host[:port]`` in lower case without a default port; None when not an origin."""
    value = value.strip().lower()
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is not None and str(port) != _DEFAULT_PORTS[parts.scheme]:
        host = f"{host}:{port}"
    return f"{parts.scheme}://{host}"


def parse_allowed_origins(raw: str) -> tuple[str, ...]:
    """The configured origins, normalized; ``("*",)`` for any. Raise SettingsError on a bad one."""
    items = [item.strip() for item in raw.split(",") if item.strip()]
    if "*" in items:
        return ("*",)
    origins = []
    for item in items:
        origin = normalize_origin(item)
        if origin is None:
            raise SettingsError(
                f"STREAMING_LLM_ALLOWED_ORIGINS: {item!r} is not an origin; write "
                "scheme://host[:port] with http or https and no path, e.g. https://app.example.com")
        origins.append(origin)
    return tuple(dict.fromkeys(origins))


def _strip_default_port(host: str, scheme: str) -> str:
    default = _DEFAULT_PORTS.get(scheme)
    if default and host.endswith(f":{default}"):
        return host[: -len(default) - 1]
    return host


class OriginPolicy:
    def __init__(self, allowed: Sequence[str], hosts: HostPolicy) -> None:
        self.any = "*" in allowed
        self.allowed = frozenset(allowed)
        self.hosts = hosts

    async def allows(self, origin: str, host: str | None, scheme: str) -> bool:
        """Whether a request to ``scheme://host`` may come from a page of ``origin``."""
        if self.any:
            return True
        normalized = normalize_origin(origin)
        if normalized is None:  # "null" (sandboxed frames, file://) or garbage
            return origin.strip().lower() in self.allowed
        if normalized in self.allowed:
            return True
        if not host:
            return False
        own_scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
        origin_scheme, _, netloc = normalized.partition("://")
        return (origin_scheme == own_scheme
                and netloc == _strip_default_port(host.strip().lower(), own_scheme)
                and await self.hosts.allows_host(netloc))


def _headers(scope: Scope) -> dict[bytes, str]:
    return {k: v.decode("latin-1") for k, v in scope.get("headers", ())}


class OriginMiddleware:
    """Refuse HTTP requests and sockets whose browser ``Origin`` is not allowed."""

    def __init__(self, app: ASGIApp, allowed: Sequence[str], hosts: HostPolicy) -> None:
        self.app = app
        self.policy = OriginPolicy(allowed, hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not self.policy.any:
            headers = _headers(scope)
            origin = headers.get(b"origin")
            if origin is not None and not await self.policy.allows(
                    origin, headers.get(b"host"), scope.get("scheme", "http")):
                await self._refuse(scope, receive, send, origin)
                return
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, origin: str) -> None:
        shown = origin[:200]
        log.warning("refused %s %s from origin %r", "socket" if scope["type"] == "websocket"
                    else scope["method"], scope["path"], shown)
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008, "reason": "origin not allowed"})
            return
        response = error_response(OriginNotAllowed(
            f"origin {shown!r} is not allowed: list it in STREAMING_LLM_ALLOWED_ORIGINS"))
        await response(scope, receive, send)


#: Request headers a listed origin's page may send (CORS): the key, JSON bodies, and the
#: conversation to continue on ``/v1/chat/completions``.
ALLOWED_HEADERS = ["authorization", "content-type", "x-conversation-id"]
#: Response headers such a page may read: the conversation a ``/v1`` answer was stored in.
EXPOSED_HEADERS = ["x-conversation-id"]


def middleware(settings: Settings, hosts: HostPolicy) -> list[Middleware]:
    """The origin check, then CORS for the listed origins (none when the list is empty)."""
    allowed = parse_allowed_origins(settings.allowed_origins)
    stack = [Middleware(OriginMiddleware, allowed=allowed, hosts=hosts)]
    if allowed:
        stack.append(Middleware(
            CORSMiddleware, allow_origins=list(allowed),
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=ALLOWED_HEADERS, expose_headers=EXPOSED_HEADERS, max_age=600))
    return stack
