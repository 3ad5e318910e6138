"""The ``Host`` header: which names this server answers to (DNS rebinding protection).

A page on ``http://evil.example:8000`` whose DNS name is re-pointed at ``127.0.0.1`` talks to a
local server as its *own* origin: the browser sends ``Host: evil.example:8000`` and
``Origin: http://evil.example:8000``, so a same-origin check that trusts ``Host`` lets it read
``/agents`` and open the chat socket. So every request and socket first has its ``Host`` checked
against ``STREAMING_LLM_ALLOWED_HOSTS`` (Starlette's ``TrustedHostMiddleware`` decides; names,
``*.example.com`` wildcards, or ``*`` for any; the port is not compared):

- empty (the default): the address the server listens on plus ``localhost``, ``127.0.0.1`` and
  ``::1``; on a wildcard address (``0.0.0.0``, ``::``) also this machine's host name. Behind a
  reverse proxy or in compose, list the names clients use (``api.example.com,streaming-llm``).
- A request with another ``Host`` gets ``400 host_not_allowed``; a socket gets the same answer
  in place of the handshake, so no frame is read from it.

The origin check (:mod:`streaming_llm.http.origins`) runs after this one, so "same origin" there
compares against an allowed host, never against a name an attacker chose.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence

from starlette.middleware.trustedhost import ENFORCE_DOMAIN_WILDCARD, TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ServiceError
from ..settings import Settings, SettingsError
from .responses import error_response

log = logging.getLogger(__name__)

WILDCARD_ADDRESSES = frozenset({"0.0.0.0", "::", ""})
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


class HostNotAllowed(ServiceError):
    code, status = "host_not_allowed", 400


def allowed_hosts(settings: Settings) -> tuple[str, ...]:
    """The configured host names, or the default for the listen address; ``("*",)`` for any."""
    items = [item.strip().lower() for item in settings.allowed_hosts.split(",") if item.strip()]
    if "*" in items:
        return ("*",)
    for item in items:
        wildcard_ok = "*" not in item[1:] and (not item.startswith("*") or item.startswith("*."))
        if not wildcard_ok or "/" in item or item.count(":") == 1:  # a port, or a URL
            raise SettingsError(f"STREAMING_LLM_ALLOWED_HOSTS: {item!r} is not a host name; write "
                                f"names without scheme or port. {ENFORCE_DOMAIN_WILDCARD}")
    if not items:
        listen = settings.host.strip().strip("[]").lower()
        items = [*LOOPBACK_NAMES]
        if listen in WILDCARD_ADDRESSES:
            items.append(socket.gethostname().lower())
        else:
            items.insert(0, listen)
    return tuple(dict.fromkeys(_bracketed(h) for h in items))


def _bracketed(host: str) -> str:
    """IPv6 literals in brackets, as they appear in ``Host`` (``[::1]:8000``)."""
    bare = host.strip("[]")
    return f"[{bare}]" if ":" in bare else bare


class HostPolicy:
    """Whether a request's ``Host`` is allowed; Starlette's ``TrustedHostMiddleware`` decides."""

    def __init__(self, allowed: Sequence[str]) -> None:
        self.any = "*" in allowed
        self.allowed = tuple(allowed)
        # Used as a predicate: it calls its app only for an allowed host, and its own refusal
        # (plain text) is dropped, so that the answer is this service's error body.
        self._check = TrustedHostMiddleware(_passed, allowed_hosts=list(allowed), www_redirect=False)

    async def allows(self, scope: Scope) -> bool:
        """Whether the ``Host`` header of this request or socket names an allowed host."""
        if self.any:
            return True
        state = {"passed": False}
        await self._check({**scope, "_host_check": state}, _no_receive, _drop)
        return state["passed"]

    async def allows_host(self, host: str) -> bool:
        """The same for a ``host[:port]`` from elsewhere (an ``Origin``'s)."""
        return await self.allows({"type": "http", "headers": [(b"host", host.encode("latin-1"))]})


async def _passed(scope: Scope, receive: Receive, send: Send) -> None:
    scope["_host_check"]["passed"] = True


async def _no_receive() -> Message:  # pragma: no cover - the check never reads
    return {"type": "http.disconnect"}


async def _drop(message: Message) -> None:
    return None


class HostMiddleware:
    """Answer ``400 host_not_allowed`` to requests and sockets whose ``Host`` is not allowed."""

    def __init__(self, app: ASGIApp, policy: HostPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or await self.policy.allows(scope):
            await self.app(scope, receive, send)
            return
        host = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"host"), "")
        shown = host[:200]
        log.warning("refused %s %s for host %r", "socket" if scope["type"] == "websocket"
                    else scope["method"], scope["path"], shown)
        if scope["type"] == "websocket":
            await receive()  # websocket.connect; the error below replaces the handshake
        response = error_response(HostNotAllowed(
            f"host {shown!r} is not allowed: list it in STREAMING_LLM_ALLOWED_HOSTS"))
        await response(scope, receive, send)
