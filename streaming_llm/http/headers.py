"""Security headers: what browsers may do with this server's responses.

Every HTTP response gets ``X-Content-Type-Options: nosniff`` (a JSON body is never run as a
script or shown as HTML), ``Referrer-Policy: no-referrer`` (a link in an answer does not tell the
linked site which conversation it was clicked in), ``X-Frame-Options: DENY`` and a
Content-Security-Policy with ``frame-ancestors 'none'`` (no other page can frame ours and trick a
click onto "Delete"). Responses that set no policy of their own, the API's, get
:data:`API_POLICY`, which allows nothing at all.

The chat page (``/``) runs model output through marked and DOMPurify; its policy
(:func:`page_policy`) is the second line of defence should anything slip through: scripts, styles
and connections (REST and the chat socket: ``'self'`` covers ``ws:``/``wss:`` of the same host and
port, CSP Level 3) only from this server; no inline script, no ``eval``, no inline style; images
from this server and ``data:`` only, unless ``STREAMING_LLM_PAGE_REMOTE_IMAGES`` lets the reader
load ``https:`` images one click at a time. ``/docs`` (swagger-ui) gets :data:`DOCS_POLICY`, the
same but for inline styles, which swagger-ui's rendering writes.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Headers for every HTTP response (lower-case names, as ASGI carries them).
COMMON = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}

#: The policy of a response that names none (JSON, errors): no content of any kind, no framing.
API_POLICY = "default-src 'none'; frame-ancestors 'none'"

_PAGE = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:{images}; "
         "connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; "
         "form-action 'self'; frame-ancestors 'none'")

#: ``/docs``: swagger-ui sets inline styles as it renders; everything else as on the page.
DOCS_POLICY = _PAGE.format(images="").replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")


def page_policy(remote_images: bool) -> str:
    """The chat page's policy; ``remote_images`` adds ``https:`` images (each loaded on a click)."""
    return _PAGE.format(images=" https:" if remote_images else "")


class SecurityHeaders:
    """Add :data:`COMMON` to every HTTP response, and :data:`API_POLICY` where none is set."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in COMMON.items():
                    headers[name] = value
                if "content-security-policy" not in headers:
                    headers["content-security-policy"] = API_POLICY
            await send(message)

        await self.app(scope, receive, send_with_headers)
