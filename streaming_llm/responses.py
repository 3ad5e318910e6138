"""JSON in and out with msgspec, and the one error body."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from .errors import BadRequest, ServiceError, ValidationFailed

T = TypeVar("T")

_encoder = msgspec.json.Encoder()


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _encoder.encode(content)


def error_response(exc: ServiceError) -> JSONResponse:
    return JSONResponse(exc.to_dict(), status_code=exc.status)


async def decode_body(request: Request, type_: type[T]) -> T:
    body = await request.body()
    if not body:
        raise BadRequest("request body is empty; send a JSON object", code="invalid_json")
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        raise ValidationFailed(f"invalid body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}", code="invalid_json") from None
