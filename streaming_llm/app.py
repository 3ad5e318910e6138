"""``create_app(settings)``: the Starlette application and the lifespan that owns every resource.

Nothing happens at import. The lifespan migrates the database to ``head``, imports hand-edited
agent files, opens the one aiohttp session, creates the engine and starts loading it in the
background (``/health`` answers 503 until it is ready), and closes everything in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TypedDict

import aiohttp
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from .chat.admission import GenerationGate
from .chat.agent_files import AgentFiles
from .chat.agents import AgentService
from .chat.conversations import ConversationManager
from .chat.export import Exporter, TranscriptsDir
from .chat.resume import ResumableTurns
from .chat.turns import TurnRunner
from .engines.base import Engine
from .engines.registry import create_engine
from .errors import NotFound, ServiceError
from .http.guards import middleware
from .http.headers import SecurityHeaders
from .http.responses import JSONResponse, error_response
from .http.routes import (
    agents,
    anthropic,
    chat,
    conversations,
    docs,
    export,
    health,
    metrics,
    openai,
    web,
)
from .http.shutdown import LiveSockets
from .metrics import Metrics, MetricsMiddleware
from .settings import Settings
from .storage.database import Database

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    db: Database
    http: aiohttp.ClientSession
    engine: Engine
    agents: AgentService
    conversations: ConversationManager
    gate: GenerationGate  # generation slots, server-wide and per client address
    turns: TurnRunner  # every chat turn, socket and /v1 alike
    sockets: LiveSockets  # open chat sockets, drained on shutdown
    resumable: ResumableTurns  # the chat socket's started turns, for a resume after a drop
    metrics: Metrics
    engine_failure: str | None = None  # why the engine could not start, for /health


class LifespanState(TypedDict):
    services: Services


def create_app(settings: Settings, *, engine: Engine | None = None) -> Starlette:
    """The app; ``app.state.drain()`` is the shutdown step that ``shutdown.Server`` runs first.

    ``engine`` replaces the one ``settings.engine`` names (tests pass a scripted fake); the
    lifespan starts and closes it like its own.
    """
    given_engine = engine
    guards = middleware(settings)  # first: a bad API key setting stops here, before any I/O
    sockets = LiveSockets()
    app_metrics = Metrics()  # before the lifespan: the middleware needs it

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[LifespanState]:
        db = Database(settings.resolved_database_url, settings.db_busy_timeout_ms)
        await db.migrate()
        agent_service = AgentService(db, AgentFiles(settings.resolved_agents_dir),
                                     max_tools=settings.max_tools,
                                     max_tool_bytes=settings.max_tool_schema_bytes)
        imported = await agent_service.import_files()
        if imported:
            log.info("imported %d agent file(s) from %s", imported, settings.resolved_agents_dir)
        http = aiohttp.ClientSession()
        engine = given_engine if given_engine is not None else create_engine(settings, http)
        transcripts = (None if settings.transcripts_dir is None
                       else TranscriptsDir(settings.transcripts_dir, Exporter(db)))
        manager = ConversationManager(db, engine, default_max_new_tokens=settings.max_new_tokens,
                                      metrics=app_metrics, transcripts=transcripts)
        gate = GenerationGate(settings.max_concurrent_generations,
                              settings.max_waiting_generations,
                              per_client=settings.max_generations_per_client,
                              metrics=app_metrics)
        services = Services(
            settings=settings, db=db, http=http, engine=engine, agents=agent_service,
            conversations=manager, gate=gate,
            turns=TurnRunner(manager, gate),
            sockets=sockets, resumable=ResumableTurns(settings.resume_grace_s,
                                                             settings.resume_max_chars),
            metrics=app_metrics,
        )
        loader = asyncio.create_task(_start_engine(services), name="engine-start")
        try:
            with sockets.track(services.resumable):  # its detached turns drain like sockets'
                yield {"services": services}
        finally:
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
            await engine.close()
            await http.close()
            await db.close()

    app = Starlette(
        # export before conversations: its catch-all would take /conversations/{id}/export
        routes=[*health.routes, *agents.routes, *export.routes, *conversations.routes, *chat.routes,
                *anthropic.routes, *openai.routes, *metrics.routes, *docs.routes, *web.routes],
        # Metrics outermost, so refused requests are counted too; then the security headers, so
        # the guards' refusals carry them too; then the guards.
        middleware=[Middleware(MetricsMiddleware, metrics=app_metrics), Middleware(SecurityHeaders),
                    *guards],
        lifespan=lifespan,
        exception_handlers={
            ServiceError: _service_error,
            404: _not_found,
            405: _method_not_allowed,
            500: _internal_error,
        },
    )
    app.state.drain = functools.partial(sockets.drain, settings.shutdown_grace_s)
    app.state.connection_refused = app_metrics.connection_refused  # for the connection caps
    return app


async def _start_engine(services: Services) -> None:
    engine = services.engine
    log.info("starting engine %s", engine.name)
    try:
        await engine.start()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - any load failure is reported on /health
        services.engine_failure = f"engine {engine.name!r} failed to start: {exc}"
        log.error("%s", services.engine_failure)
        return
    # The gate is where turns wait (chat.admission): bound it by the engine's own batch, so a
    # turn holding a slot is one the engine runs and none waits unseen in the engine's queue.
    batch = ((await engine.health()).extra or {}).get("max_batch")
    if isinstance(batch, int) and 0 < batch < services.gate.slots:
        services.gate.resize(batch)
        log.info("generation slots: %d, the engine's batch (STREAMING_LLM_MAX_CONCURRENT_"
                 "GENERATIONS=%d)", batch, services.settings.max_concurrent_generations)
        return
    report = await engine.health()
    log.info("engine %s ready: model %s", engine.name, report.model)
    if report.detail:
        log.warning("%s", report.detail)


async def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    return error_response(exc)


async def _not_found(request: Request, exc: Exception) -> Response:
    return error_response(NotFound(f"no route for {request.method} {request.url.path}"))


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    return error_response(ServiceError(f"method {request.method} not allowed here",
                                       code="method_not_allowed", status=405))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": {"code": "internal_error", "message": "internal server error"}},
                        status_code=500)
