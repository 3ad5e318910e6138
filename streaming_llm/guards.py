"""The guards every request and socket passes before a route sees it, outermost first.

1. :class:`~streaming_llm.origins.OriginMiddleware` — browser ``Origin`` (``403`` / socket refused).
2. Starlette's ``CORSMiddleware`` for the allowed origins (preflights, response headers).
3. :class:`~streaming_llm.auth.AuthMiddleware` — API key (``401`` / socket refused).
4. :class:`~streaming_llm.limits.BodySizeLimit` — request body size (``413``).

Built once per app by :func:`middleware`; each guard lives in the module of its concept.
"""

from __future__ import annotations

from starlette.middleware import Middleware

from . import origins
from .auth import AuthMiddleware, load_api_keys
from .limits import BodySizeLimit
from .settings import Settings


def middleware(settings: Settings) -> list[Middleware]:
    """The guard stack for ``Starlette(middleware=...)``; raises SettingsError on a bad value."""
    return [
        *origins.middleware(settings),
        Middleware(AuthMiddleware, keys=load_api_keys(settings)),
        Middleware(BodySizeLimit, max_bytes=settings.max_body_bytes),
    ]
