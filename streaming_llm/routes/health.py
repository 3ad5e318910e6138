"""``/health``: 200 when the engine is ready, 503 while it loads or when it failed."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import __version__
from ..responses import JSONResponse


async def health(request: Request) -> Response:
    services = request.state.services
    engine = services.engine
    report = await engine.health()
    if services.engine_failure is not None:
        status, detail = "error", services.engine_failure
    else:
        status, detail = ("ok" if report.ready else "loading"), report.detail
    body = {
        "status": status,
        "ready": report.ready and services.engine_failure is None,
        "engine": engine.name,
        "model": report.model,
        "detail": detail,
        "version": __version__,
    }
    if report.extra:
        body["engine_info"] = report.extra
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


routes = [Route("/health", health, methods=["GET"])]
