"""The guards every request and socket passes before a route sees it, outermost first.

1. :class:`~streaming_llm.http.hosts.HostMiddleware` — the ``Host`` header (``400``, DNS rebinding).
2. :class:`~streaming_llm.http.origins.OriginMiddleware` — browser ``Origin`` (``403`` / socket refused).
3. Starlette's ``CORSMiddleware`` for the allowed origins (preflights, response headers).
4. :class:`~streaming_llm.http.auth.AuthMiddleware` — API key (``401`` / socket refused).
5. :class:`~streaming_llm.http.connections.BodyReadTimeout` — the body's deadline (``408``).
6. :class:`~streaming_llm.http.body_limit.BodySizeLimit` — request body size (``413``).

Built once per app by :func:`middleware`; each guard lives in the module of its concept. The
connection caps and header deadline act before any of these, in the server's protocol
(:mod:`streaming_llm.http.connections`).
"""

from __future__ import annotations

from starlette.middleware import Middleware

from ..settings import Settings
from . import origins
from .auth import AuthMiddleware, load_api_keys
from .body_limit import BodySizeLimit
from .connections import BodyReadTimeout
from .hosts import HostMiddleware, HostPolicy, allowed_hosts


def middleware(settings: Settings) -> list[Middleware]:
    """The guard stack for ``Starlette(middleware=...)``; raises SettingsError on a bad value."""
    hosts = HostPolicy(allowed_hosts(settings))
    return [
        Middleware(HostMiddleware, policy=hosts),
        *origins.middleware(settings, hosts),
        Middleware(AuthMiddleware, keys=load_api_keys(settings)),
        Middleware(BodyReadTimeout, timeout_s=settings.body_timeout_s),
        Middleware(BodySizeLimit, max_bytes=settings.max_body_bytes),
    ]
