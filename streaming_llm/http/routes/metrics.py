"""``GET /metrics``: Prometheus text format, from the app's own registry."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ...metrics import EngineSnapshot


async def metrics(request: Request) -> Response:
    services = request.state.services
    report = await services.engine.health()
    services.metrics.engine = EngineSnapshot(services.engine.name, report, services.engine_failure)
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)


routes = [Route("/metrics", metrics, methods=["GET"])]
