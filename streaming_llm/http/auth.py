"""API keys: who may use the service.

With keys configured (``STREAMING_LLM_API_KEY``, comma-separated, and/or
``STREAMING_LLM_API_KEY_FILE``, one per line), every HTTP route except the public ones
(:data:`PUBLIC_PATHS`: ``/health`` and the static chat page) needs ``Authorization: Bearer <key>``
(or ``x-api-key: <key>``) and answers ``401 unauthorized`` otherwise. The chat socket takes the key in any of the ways a
client can send it, browsers included:

- ``Sec-WebSocket-Protocol: bearer, <key>`` — in JavaScript ``new WebSocket(url, ["bearer", key])``.
  The server accepts the subprotocol ``bearer``; the key itself is never echoed back.
- ``Sec-WebSocket-Protocol: bearer.<key>`` — one entry; for clients that cannot send two. Browsers
  need ``bearer`` in the list as well (they fail a handshake that selects no offered protocol).
- ``?token=<key>`` — last resort: URLs end up in proxy logs and histories (ours are redacted).
- ``Authorization: Bearer <key>`` — non-browser clients (HTTP routes also take ``x-api-key: <key>``,
  the header Anthropic's SDKs send).

A socket without a valid key is closed before it is accepted (the client sees HTTP 403), so no
frame is ever read from it. Keys are compared with :func:`hmac.compare_digest` against every
configured key, and never logged: :mod:`streaming_llm.logs` masks ``token=`` values, bearer
credentials (header and subprotocol forms) and the configured keys themselves in every log line.

Keys must be URL- and header-safe (``A-Z a-z 0-9 - _ . ~``, at least 16 characters) so that every
transport above carries them without escaping; ``secrets.token_urlsafe(32)`` makes one.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ServiceError
from ..settings import Settings, SettingsError
from .responses import error_response

log = logging.getLogger(__name__)

#: Paths served without a key: the health probe and the static chat page (which asks for the key).
PUBLIC_PATHS = frozenset({"/health", "/", "/docs", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)

#: The subprotocol a browser offers next to its key; the server accepts it by name.
SUBPROTOCOL = "bearer"

#: The scope entry naming the key a socket was opened with (a digest, never the key): whose turns
#: it may resume. Absent without keys.
KEY_ID_SCOPE = "streaming_llm.key_id"

KEY_RE = re.compile(r"[A-Za-z0-9._~-]{16,512}")


class Unauthorized(ServiceError):
    code, status = "unauthorized", 401


def load_api_keys(settings: Settings) -> tuple[str, ...]:
    """The configured keys, from the setting and the key file; raise SettingsError when unusable."""
    keys = [k.strip() for k in settings.api_key.split(",") if k.strip()]
    if settings.api_key_file is not None:
        keys.extend(_read_key_file(settings.api_key_file))
    for key in keys:
        if KEY_RE.fullmatch(key) is None:
            # Never print the key itself: say where it came from and what is wrong with it.
            raise SettingsError(
                f"an API key ({len(key)} characters) is not usable: keys need 16-512 characters "
                "from A-Z a-z 0-9 - _ . ~ (make one with: python -c \"import secrets; "
                "print(secrets.token_urlsafe(32))\")")
    return tuple(dict.fromkeys(keys))


def _read_key_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"STREAMING_LLM_API_KEY_FILE={str(path)!r} cannot be read: {exc}") from None
    keys = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    keys = [k for k in keys if k]
    if not keys:
        raise SettingsError(f"STREAMING_LLM_API_KEY_FILE={str(path)!r} holds no key")
    return keys


class KeyChecker:
    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = tuple(k.encode() for k in keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def valid(self, candidate: str | None) -> bool:
        if not candidate:
            return False
        raw = candidate.encode("utf-8", "replace")
        # Compare against every key, without stopping at the first match.
        return any([hmac.compare_digest(raw, key) for key in self._keys])  # every key, no early exit


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def bearer_token(scope: Scope) -> str | None:
    """The key from ``Authorization: Bearer <key>``, else from ``x-api-key: <key>`` (how
    Anthropic's SDKs send it)."""
    value = _header(scope, b"authorization")
    if value is None:
        return (_header(scope, b"x-api-key") or "").strip() or None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def socket_credentials(scope: Scope) -> list[str]:
    """Every candidate key a WebSocket handshake carries, in the order they are tried."""
    found: list[str] = []
    offered = list(scope.get("subprotocols") or ())
    for i, proto in enumerate(offered):
        if proto == SUBPROTOCOL and i + 1 < len(offered):
            found.append(offered[i + 1])
        elif proto.startswith(SUBPROTOCOL + "."):
            found.append(proto[len(SUBPROTOCOL) + 1:])
    query = scope.get("query_string", b"").decode("latin-1")
    found.extend(v for k, v in parse_qsl(query, keep_blank_values=True) if k == "token")
    token = bearer_token(scope)
    if token:
        found.append(token)
    return found


class AuthMiddleware:
    """Refuse requests and sockets without a valid key (when keys are configured).

    For every socket it also answers a browser's ``bearer`` subprotocol offer, and hides the
    key-carrying subprotocol entries from the application.
    """

    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        self.app = app
        self.checker = KeyChecker(keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if self.checker and not is_public(scope["path"]):
                token = bearer_token(scope)
                if not self.checker.valid(token):
                    await self._unauthorized(scope, receive, send, token)
                    return
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            offered = list(scope.get("subprotocols") or ())
            key = next((c for c in socket_credentials(scope) if self.checker.valid(c)), None)
            if self.checker and key is None:
                await receive()  # websocket.connect
                log.warning("refused socket %s from %s: missing or invalid API key",
                            scope["path"], _client(scope))
                await send({"type": "websocket.close", "code": 1008,
                            "reason": "missing or invalid API key"})
                return
            if key is not None:
                scope[KEY_ID_SCOPE] = hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()[:32]
            scope["subprotocols"] = _without_keys(offered)
            await self.app(scope, receive, _accept_bearer(send, SUBPROTOCOL in offered))
        else:
            await self.app(scope, receive, send)

    async def _unauthorized(self, scope: Scope, receive: Receive, send: Send,
                            token: str | None) -> None:
        reason = "invalid API key" if token else "missing API key"
        response = error_response(Unauthorized(
            f"{reason}: send the header 'Authorization: Bearer <key>'"))
        response.headers["WWW-Authenticate"] = 'Bearer realm="streaming-llm"'
        await response(scope, receive, send)


def _without_keys(offered: list[str]) -> list[str]:
    """The offered subprotocols minus the ones carrying a key (the app never sees a key)."""
    kept: list[str] = []
    after_bearer = False
    for proto in offered:
        if after_bearer:
            after_bearer = False
        elif proto == SUBPROTOCOL:
            kept.append(proto)
            after_bearer = True
        elif not proto.startswith(SUBPROTOCOL + "."):
            kept.append(proto)
    return kept


def _accept_bearer(send: Send, offered_bearer: bool) -> Send:
    if not offered_bearer:
        return send

    async def wrapped(message: Message) -> None:
        if message["type"] == "websocket.accept" and not message.get("subprotocol"):
            message = {**message, "subprotocol": SUBPROTOCOL}
        await send(message)

    return wrapped


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "unknown"
