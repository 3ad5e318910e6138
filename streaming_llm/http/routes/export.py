"""``GET /conversations/{id}/export?format=markdown|json``: a transcript, or loss-free JSON."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ...chat.export import MEDIA_TYPE, SUFFIX, Exporter, check_format


async def export_conversation(request: Request) -> Response:
    conversation_id = request.path_params["conversation_id"]
    fmt = check_format(request.query_params.get("format", "markdown"))
    data = await Exporter(request.state.services.db).render(conversation_id, fmt)
    disposition = f'attachment; filename="{conversation_id}{SUFFIX[fmt]}"'
    return Response(data, media_type=MEDIA_TYPE[fmt],
                    headers={"content-disposition": disposition})


routes = [Route("/conversations/{conversation_id:str}/export", export_conversation,
                methods=["GET"])]
