"""``/``: the reference chat page, and ``/static``: its CSS, JavaScript and the built client.

The page is plain files inside the package (``streaming_llm/web``), so an installed server serves
it with no build step at run time; ``web/vendor/streaming-llm-client.js`` is the TypeScript
client's ``tsc`` output, and ``web/vendor`` also holds the pinned builds of marked, DOMPurify,
highlight.js and swagger-ui (``/docs``) with their licences, all committed and checked against
their sources by the client's tests (``clients/ts/test/vendor.test.mjs``).
Responses ask browsers to revalidate (``no-cache``), so a page and a client from different
versions are never mixed after an upgrade. The page carries its own Content-Security-Policy
(:func:`~streaming_llm.http.headers.page_policy`), and tells its script whether remote images in
answers may be shown on a click (``STREAMING_LLM_PAGE_REMOTE_IMAGES``) through a ``<meta>`` tag.
"""

from __future__ import annotations

import os
from importlib.resources import files

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import PathLike, StaticFiles
from starlette.types import Scope

from ..headers import page_policy

_NO_CACHE = {"Cache-Control": "no-cache"}


class _StaticFiles(StaticFiles):
    def file_response(self, full_path: PathLike, stat_result: os.stat_result, scope: Scope,
                      status_code: int = 200) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(_NO_CACHE)
        return response


#: In ``index.html`` as shipped; the page's script reads it (``off`` or ``click``).
REMOTE_IMAGES_META = '<meta name="streaming-llm-remote-images" content="off">'


async def index(request: Request) -> Response:
    html = files("streaming_llm").joinpath("web", "index.html").read_text(encoding="utf-8")
    remote_images = request.state.services.settings.page_remote_images
    if remote_images:
        html = html.replace(REMOTE_IMAGES_META, REMOTE_IMAGES_META.replace('"off"', '"click"'))
    return HTMLResponse(html, headers={
        **_NO_CACHE, "Content-Security-Policy": page_policy(remote_images)})


routes = [
    Route("/", index, methods=["GET"]),
    Mount("/static", app=_StaticFiles(packages=[("streaming_llm", "web")]), name="static"),
]
