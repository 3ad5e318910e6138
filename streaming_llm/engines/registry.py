"""Name → factory registry: picks the engine from ``settings.engine``.

Factories import their module lazily so the echo engine never pays for importing torch. The
engines that proxy an HTTP server (``ollama``, ``openai``) take a comma-separated list of URLs:
one URL is one engine, several are a :class:`~streaming_llm.engines.pool.BackendPool` of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..settings import url_list
from .base import Engine

if TYPE_CHECKING:
    import aiohttp

    from ..settings import Settings
    from .upstream import UpstreamEngine

EngineFactory = Callable[["Settings", "aiohttp.ClientSession"], Engine]


def _echo(settings: Settings, http: aiohttp.ClientSession) -> Engine:
    from .echo import EchoEngine

    return EchoEngine(delay_s=settings.echo_delay_ms / 1000)


def _local(settings: Settings, http: aiohttp.ClientSession) -> Engine:
    from .local import LocalEngine

    return LocalEngine(settings)


def _ollama(settings: Settings, http: aiohttp.ClientSession) -> Engine:
    from .ollama import OllamaEngine

    return _pooled(settings, [OllamaEngine(settings, http, url=url)
                              for url in url_list(settings.ollama_url)])


def _openai(settings: Settings, http: aiohttp.ClientSession) -> Engine:
    from .openai_compat import OpenAIEngine

    return _pooled(settings, [OpenAIEngine(settings, http, url=url)
                              for url in url_list(settings.openai_base_url)])


def _pooled(settings: Settings, engines: Sequence[UpstreamEngine]) -> Engine:
    if len(engines) == 1:
        return engines[0]
    from .pool import BackendPool

    return BackendPool(engines, retry_s=settings.backend_retry_s,
                       retry_max_s=settings.backend_retry_max_s)


ENGINES: dict[str, EngineFactory] = {"echo": _echo, "local": _local, "ollama": _ollama,
                                     "openai": _openai}


def create_engine(settings: Settings, http: aiohttp.ClientSession) -> Engine:
    return ENGINES[settings.engine](settings, http)
