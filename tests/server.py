"""The end-to-end tests' server: :mod:`streaming_llm.testing.server`, started from the checkout."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from streaming_llm.testing.server import ServerProcess, free_port, wait_healthy
from streaming_llm.testing.server import start_server as _start_server

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "ServerProcess", "free_port", "start_server", "wait_healthy"]


def start_server(tmp_path: Path, env: Mapping[str, str] | None = None,
                 **options: Any) -> AbstractContextManager[ServerProcess]:
    """:func:`streaming_llm.testing.server.start_server` with the checkout as working directory."""
    return _start_server(tmp_path, env, cwd=ROOT, **options)
