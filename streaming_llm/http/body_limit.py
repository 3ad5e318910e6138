"""The request-body size guard: ``413 payload_too_large`` over ``STREAMING_LLM_MAX_BODY_BYTES``.

The per-request checks (frames, messages, ``max_new_tokens``) are in
:mod:`streaming_llm.chat.limits`; the server-wide generation gate is in
:mod:`streaming_llm.chat.admission`.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ServiceError
from .responses import error_response


class PayloadTooLarge(ServiceError):
    code, status = "payload_too_large", 413


class BodySizeLimit:
    """``413 payload_too_large`` for bodies over ``max_bytes``: by ``Content-Length`` before
    reading anything, and while reading for chunked bodies."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self, size: int | None) -> PayloadTooLarge:
        stated = f"of {size} bytes " if size is not None else ""
        return PayloadTooLarge(f"request body {stated}is larger than the limit of "
                               f"{self.max_bytes} bytes (STREAMING_LLM_MAX_BODY_BYTES)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", ()):
            if key == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await error_response(self._error(int(value)))(scope, receive, send)
                return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._error(None)  # answered by the app's ServiceError handler
            return message

        await self.app(scope, limited, send)
