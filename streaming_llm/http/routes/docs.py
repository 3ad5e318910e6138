"""``GET /openapi.json``: the OpenAPI document, built once from the msgspec types; ``GET /docs``:
the same document for people, through the vendored swagger-ui (``web/docs.html``; no CDN)."""

from __future__ import annotations

import functools
from importlib.resources import files

import msgspec
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from .. import openapi
from ..headers import DOCS_POLICY


@functools.cache
def _document() -> bytes:
    return msgspec.json.encode(openapi.build())


async def openapi_json(request: Request) -> Response:
    return Response(_document(), media_type="application/json")


async def docs_page(request: Request) -> Response:
    html = files("streaming_llm").joinpath("web", "docs.html").read_text(encoding="utf-8")
    return HTMLResponse(html, headers={"Cache-Control": "no-cache",
                                       "Content-Security-Policy": DOCS_POLICY})


routes = [Route("/openapi.json", openapi_json, methods=["GET"]),
          Route("/docs", docs_page, methods=["GET"])]
