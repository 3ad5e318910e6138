"""``/agents``: list, read, upsert (PUT) and delete agents."""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ...chat.agents import AgentIn, AgentService
from ...chat.conversations import system_message
from ...errors import AgentContextTooLong
from ...ids import check_agent_id
from ..responses import JSONResponse, decode_body


def _agents(request: Request) -> AgentService:
    return request.state.services.agents


async def list_agents(request: Request) -> Response:
    return JSONResponse(await _agents(request).list())


async def get_agent(request: Request) -> Response:
    return JSONResponse(await _agents(request).get(request.path_params["agent_id"]))


async def put_agent(request: Request) -> Response:
    agent_id = request.path_params["agent_id"]
    check_agent_id(agent_id)  # before reading the body: a bad id never gets further
    body = await decode_body(request, AgentIn)
    agent, created = await _agents(request).upsert(agent_id, body)
    status = 201 if created else 200
    # Stored either way; an agent the engine cannot chat with says so (docs/engines.md: the agent's prompt is pinned).
    system = system_message(agent.system_prompt, agent.markdown_context)
    warning = request.state.services.engine.refusal(system) if system else None
    if isinstance(warning, AgentContextTooLong):
        warnings = [{"code": warning.code, "message": warning.message}]
        return JSONResponse({**msgspec.to_builtins(agent), "warnings": warnings}, status_code=status)
    return JSONResponse(agent, status_code=status)


async def delete_agent(request: Request) -> Response:
    await _agents(request).delete(request.path_params["agent_id"])
    return Response(status_code=204)


async def bad_agent_path(request: Request) -> Response:
    check_agent_id(request.path_params["rest"])  # always raises: the id contains a '/'
    return Response(status_code=404)


routes = [
    Route("/agents", list_agents, methods=["GET"]),
    Route("/agents/{agent_id:str}", get_agent, methods=["GET"]),
    Route("/agents/{agent_id:str}", put_agent, methods=["PUT"]),
    Route("/agents/{agent_id:str}", delete_agent, methods=["DELETE"]),
    # Ids with '/' (or '%2F') never match the routes above; answer them as bad ids, not 404.
    Route("/agents/{rest:path}", bad_agent_path, methods=["GET", "PUT", "DELETE"]),
]
