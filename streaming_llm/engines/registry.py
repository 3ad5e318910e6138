"""Name → factory registry: picks the engine from ``settings.engine``.

Factories import their module lazily so the echo engine never pays for importing torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .base import Engine

if TYPE_CHECKING:
    import aiohttp

    from ..settings import Settings

EngineFactory = Callable[["Settings", "aiohttp.ClientSession"], Engine]


def _echo(settings: Settings, http: aiohttp.ClientSession) -> Engine:
    from .echo import EchoEngine

    return EchoEngine(delay_s=settings.echo_delay_ms / 1000)


def _local(settings: Settings, http: aiohttp.ClientSession) -> Engine:
    from .local import LocalEngine

    return LocalEngine(settings)


def _ollama(settings: Settings, http: aiohttp.ClientSession) -> Engine:
    from .ollama import OllamaEngine

    return OllamaEngine(settings, http)


ENGINES: dict[str, EngineFactory] = {"echo": _echo, "local": _local, "ollama": _ollama}


def create_engine(settings: Settings, http: aiohttp.ClientSession) -> Engine:
    return ENGINES[settings.engine](settings, http)
