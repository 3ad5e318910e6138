"""What the benches that talk to a real ``streaming-llm serve`` share: the arguments that spawn
one with the local engine (or name a running one), its environment, and the run against it."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

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
    parser.add_argument("--runtime", default="", choices=["", "auto", "torch", "llama.cpp"],
                        help="STREAMING_LLM_RUNTIME for the spawned server (default: auto, "
                             "llama.cpp for a GGUF model on CPU)")
    parser.add_argument("--compile", default="", choices=["", "true", "false"],
                        help="STREAMING_LLM_COMPILE for the spawned server (default: true; its "
                             "graphs are built, or loaded, before the measurement)")
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
    if args.compile:
        env["STREAMING_LLM_COMPILE"] = args.compile
    if args.runtime:
        env["STREAMING_LLM_RUNTIME"] = args.runtime
    return env


def measure_served(args: argparse.Namespace, env: dict[str, str], name: str,
                   measure: Callable[[str], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """``measure(base_url)`` within ``--timeout-s``, against ``--url`` or a server spawned with
    ``env`` in a temporary data dir (stopped before this returns).

    Either way the measurement starts once the server's compiled step is in (``/health``'s
    ``compile.state`` is no longer ``compiling`` or ``loading``): a server's steady state, not its
    first minutes. A spawned server keeps its compiled graphs beside ``--models-dir``
    (``data/compile``, where ``make run`` keeps them), so only the first run builds them.
    """

    async def bounded(base_url: str) -> dict[str, Any]:
        async def run() -> dict[str, Any]:
            await compiled(base_url)
            return await measure(base_url)

        return await asyncio.wait_for(run(), args.timeout_s)

    if args.url:
        return asyncio.run(bounded(args.url.rstrip("/")))
    with tempfile.TemporaryDirectory(prefix=f"streaming-llm-{name}-") as tmp:
        if args.models_dir:
            shared = Path(args.models_dir).resolve().parent / "compile"
            shared.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / "data").mkdir()
            (Path(tmp) / "data" / "compile").symlink_to(shared, target_is_directory=True)
        with start_server(Path(tmp), env, timeout=600) as server:
            return asyncio.run(bounded(server.base_url))


async def compiled(base_url: str, *, log: Callable[[str], None] | None = None) -> None:
    """Wait until the server's compiled step is in (or off, or failed), saying what it waits for
    every 30 s."""
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    said = 0.0
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"{base_url}/health") as resp:
                health = await resp.json()
            state = (health.get("engine_info") or {}).get("compile") or {"state": "off"}
            if state["state"] not in ("compiling", "loading"):
                return
            if time.monotonic() - said >= 30:
                said = time.monotonic()
                say(f"waiting for the compiled step: {state['state']}, {state.get('built')} of "
                    f"{state.get('shapes')} graphs built, {state.get('running')} running "
                    f"({time.monotonic() - started:.0f} s)")
            await asyncio.sleep(1)
