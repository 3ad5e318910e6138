"""``/health``: 200 when the engine is ready, 503 while it loads or when it failed."""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ... import __version__
from ..responses import JSONResponse


class HealthReport(msgspec.Struct, omit_defaults=True):
    status: str  # ok | loading | error
    ready: bool
    engine: str
    model: str
    detail: str | None
    version: str
    engine_info: dict[str, object] | None = None  # the engine's own numbers, when it has any


async def health(request: Request) -> Response:
    services = request.state.services
    engine = services.engine
    report = await engine.health()
    if services.engine_failure is not None:
        status, detail = "error", services.engine_failure
    else:
        status, detail = ("ok" if report.ready else "loading"), report.detail
    body = HealthReport(
        status=status, ready=report.ready and services.engine_failure is None,
        engine=engine.name, model=report.model, detail=detail, version=__version__,
        engine_info=report.extra or None)
    return JSONResponse(body, status_code=200 if body.ready else 503)


routes = [Route("/health", health, methods=["GET"])]
