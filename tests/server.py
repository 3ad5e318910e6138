"""The end-to-end tests' server: :mod:`streaming_llm.testing.server`, started from the checkout."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from streaming_llm.testing.server import ServerProcess, free_port, wait_healthy
from streaming_llm.testing.server import start_server as _start_server

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "ServerProcess", "free_port", "http", "start_server", "wait_healthy"]


def start_server(tmp_path: Path, env: Mapping[str, str] | None = None,
                 **options: Any) -> AbstractContextManager[ServerProcess]:
    """:func:`streaming_llm.testing.server.start_server` with the checkout as working directory.

    The compiled step is off unless ``env`` turns it on: its background compile (minutes of a
    core per model) is tested on its own (tests/engines/test_precompile.py).
    """
    return _start_server(tmp_path, {"STREAMING_LLM_COMPILE": "false", **(env or {})}, cwd=ROOT,
                         **options)


def http(method: str, url: str, body: dict[str, Any] | None = None, *,
         headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
    """One JSON request to a real server: (status, decoded body or None), error statuses too."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
