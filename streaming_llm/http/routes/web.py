"""``/``: the reference chat page, and ``/static``: its CSS, JavaScript and the built client.

The page is plain files inside the package (``streaming_llm/web``), so an installed server serves
it with no build step at run time; ``web/vendor/streaming-llm-client.js`` is the TypeScript
client's ``tsc`` output, and ``web/vendor`` also holds the pinned builds of marked, DOMPurify,
highlight.js and swagger-ui (``/docs``) with their licences, all committed and checked against
their sources by the client's tests (``clients/ts/test/vendor.test.mjs``).
Responses ask browsers to revalidate (``no-cache``), so a page and a client from different
versions are never mixed after an upgrade.
"""

from __future__ import annotations

import os
from importlib.resources import files

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import PathLike, StaticFiles
from starlette.types import Scope

_NO_CACHE = {"Cache-Control": "no-cache"}


class _StaticFiles(StaticFiles):
    def file_response(self, full_path: PathLike, stat_result: os.stat_result, scope: Scope,
                      status_code: int = 200) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(_NO_CACHE)
        return response


async def index(request: Request) -> Response:
    html = files("streaming_llm").joinpath("web", "index.html").read_text(encoding="utf-8")
    return HTMLResponse(html, headers=_NO_CACHE)


routes = [
    Route("/", index, methods=["GET"]),
    Mount("/static", app=_StaticFiles(packages=[("streaming_llm", "web")]), name="static"),
]
