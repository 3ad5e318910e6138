"""Fixtures shared by the local engine's tests: a tiny Llama on disk and engines built on it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from streaming_llm.engines.local import LocalEngine
from streaming_llm.settings import Settings

from . import model_dirs as models

MakeEngine = Callable[..., Awaitable[LocalEngine]]


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.write_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture
async def local_engines(tmp_path: Path) -> AsyncIterator[MakeEngine]:
    """``await local_engines(model_dir, **settings)``: a started engine, closed after the test."""
    made: list[LocalEngine] = []

    async def make(model: Path, **overrides: Any) -> LocalEngine:
        engine = LocalEngine(Settings(data_dir=tmp_path / "data", model=str(model),
                                      **{"compile": False, **overrides}))
        made.append(engine)
        await engine.start()
        return engine

    yield make
    for engine in made:
        await engine.close()
