"""JSON in and out with msgspec, and the one error body."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from ..errors import BadRequest, ServiceError, ValidationFailed

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
        raise ValidationFailed(f"invalid body: {exc}", field=invalid_field(exc)) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec raises the latter on bad UTF-8
        raise BadRequest(f"body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:  # msgspec recurses into values it skips, e.g. unknown fields
        raise BadRequest("body is nested too deeply", code="invalid_json") from None


def invalid_field(exc: msgspec.ValidationError) -> str | None:
    """The path of the value a msgspec validation error is about (``options.temperature``), or
    None when it is about the whole document. msgspec gives the path only as the last part of
    its message, `` - at `$.path` ``; this is the one place that reads it."""
    _, at, path = str(exc).rpartition(" - at `$")
    if not at or not path.endswith("`"):
        return None
    return path[:-1].removeprefix(".") or None
