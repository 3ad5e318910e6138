"""``GET /openapi.json``: the OpenAPI document, built once from the msgspec types."""

from __future__ import annotations

import functools

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import openapi


@functools.cache
def _document() -> bytes:
    return msgspec.json.encode(openapi.build())


async def openapi_json(request: Request) -> Response:
    return Response(_document(), media_type="application/json")


routes = [Route("/openapi.json", openapi_json, methods=["GET"])]
