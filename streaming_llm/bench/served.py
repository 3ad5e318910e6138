"""What the benches that talk to a real ``streaming-llm serve`` share: the arguments that spawn
one with the local engine (or name a running one), its environment, and the run against it."""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..testing.server import start_server


def add_server_arguments(parser: argparse.ArgumentParser | Any) -> None:
    parser.add_argument("--model", default="",
                        help="STREAMING_LLM_MODEL for the spawned server (default: its default "
                             "model)")
    parser.add_argument("--models-dir", default="data/models",
                        help="STREAMING_LLM_MODELS_DIR for the spawned server, where a GGUF model "
                             "converted once is kept (data/models, as `make run` keeps it)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in the spawned server (0: torch's default)")
    parser.add_argument("--url", help="use this running server (http://host:port) instead")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="give up after this long")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def server_env(args: argparse.Namespace) -> dict[str, str]:
    """The spawned server's environment from :func:`add_server_arguments`' arguments."""
    env = {"STREAMING_LLM_ENGINE": "local", "STREAMING_LLM_LOG_LEVEL": "warning"}
    if args.model:
        env["STREAMING_LLM_MODEL"] = args.model
    if args.models_dir:
        env["STREAMING_LLM_MODELS_DIR"] = str(Path(args.models_dir).resolve())
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def measure_served(args: argparse.Namespace, env: dict[str, str], name: str,
                   measure: Callable[[str], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """``measure(base_url)`` within ``--timeout-s``, against ``--url`` or a server spawned with
    ``env`` in a temporary data dir (stopped before this returns)."""

    async def bounded(base_url: str) -> dict[str, Any]:
        return await asyncio.wait_for(measure(base_url), args.timeout_s)

    if args.url:
        return asyncio.run(bounded(args.url.rstrip("/")))
    with tempfile.TemporaryDirectory(prefix=f"streaming-llm-{name}-") as tmp, \
            start_server(Path(tmp), env, timeout=600) as server:
        return asyncio.run(bounded(server.base_url))
