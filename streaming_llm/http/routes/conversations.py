"""``/conversations``: create (a room of several agents, or a plain one), list (newest first, by
participant, by search), read with turns, rename and change participants, truncate (for
edit-and-resend and regenerate), delete."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ...chat.conversations import ConversationCreate, ConversationManager, ConversationPatch
from ...errors import BadRequest
from ...ids import check_agent_id, check_conversation_id
from ..responses import JSONResponse, decode_body


def _manager(request: Request) -> ConversationManager:
    return request.state.services.conversations


def _int_param(request: Request, name: str, default: int, *, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"query parameter {name!r} must be an integer") from None
    if not lo <= value <= hi:
        raise BadRequest(f"query parameter {name!r} must be between {lo} and {hi}")
    return value


async def list_conversations(request: Request) -> Response:
    agent_id = request.query_params.get("agent_id")
    if agent_id is not None:
        check_agent_id(agent_id)
    limit = _int_param(request, "limit", 100, lo=1, hi=1000)
    offset = _int_param(request, "offset", 0, lo=0, hi=10**9)
    search = request.query_params.get("q") or None
    if search is not None and len(search) > 200:
        raise BadRequest("query parameter 'q' must be at most 200 characters")
    return JSONResponse(await _manager(request).list(agent_id=agent_id, limit=limit, offset=offset,
                                                     search=search))


async def get_conversation(request: Request) -> Response:
    return JSONResponse(await _manager(request).get(request.path_params["conversation_id"]))


async def patch_conversation(request: Request) -> Response:
    conversation_id = request.path_params["conversation_id"]
    check_conversation_id(conversation_id)
    body = await decode_body(request, ConversationPatch)
    return JSONResponse(await _manager(request).update(conversation_id, body))


async def create_conversation(request: Request) -> Response:
    body = await decode_body(request, ConversationCreate)
    return JSONResponse(await _manager(request).create(body), status_code=201)


async def truncate_conversation(request: Request) -> Response:
    conversation_id = request.path_params["conversation_id"]
    check_conversation_id(conversation_id)
    if request.query_params.get("from_seq") is None:
        raise BadRequest("query parameter 'from_seq' is required")
    from_seq = _int_param(request, "from_seq", 0, lo=0, hi=10**9)
    await _manager(request).truncate(conversation_id, from_seq)
    return Response(status_code=204)


async def delete_conversation(request: Request) -> Response:
    await _manager(request).delete(request.path_params["conversation_id"])
    return Response(status_code=204)


async def bad_conversation_path(request: Request) -> Response:
    check_conversation_id(request.path_params["rest"])  # always raises: the id contains a '/'
    return Response(status_code=404)


routes = [
    Route("/conversations", list_conversations, methods=["GET"]),
    Route("/conversations", create_conversation, methods=["POST"]),
    Route("/conversations/{conversation_id:str}", get_conversation, methods=["GET"]),
    Route("/conversations/{conversation_id:str}", patch_conversation, methods=["PATCH"]),
    Route("/conversations/{conversation_id:str}", delete_conversation, methods=["DELETE"]),
    Route("/conversations/{conversation_id:str}/turns", truncate_conversation,
          methods=["DELETE"]),
    Route("/conversations/{rest:path}", bad_conversation_path, methods=["GET", "PATCH", "DELETE"]),
]
