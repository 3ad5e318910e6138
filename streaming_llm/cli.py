"""Command line: ``streaming-llm serve | migrate | chat | export | env-example | bench <name>``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .settings import Settings, SettingsError

log = logging.getLogger("streaming_llm")

BENCHMARKS = ("cache", "cold", "ollama", "load", "quality", "sampling", "concurrency", "speed",
              "rooms", "structured")
BENCH_FROM_SOURCES = ("streaming-llm: the benchmarks run from a source checkout, not an installed "
                      "wheel: git clone the project, `make install`, then "
                      "`.venv/bin/streaming-llm bench <name>`")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streaming-llm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"streaming-llm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP + WebSocket server")
    serve.add_argument("--host", help="override STREAMING_LLM_HOST")
    serve.add_argument("--port", type=int, help="override STREAMING_LLM_PORT")

    sub.add_parser("migrate", help="bring the database to the latest migration and exit")

    from .client import chat_cli

    chat_cli.add_arguments(sub.add_parser("chat", help="chat with an agent in the terminal"))

    export = sub.add_parser("export", help="write conversations as Markdown transcripts or JSON")
    export.add_argument("--conversation", metavar="ID", help="only this conversation (default: all)")
    export.add_argument("--format", choices=("markdown", "json"), default="markdown")
    export.add_argument("--out", type=Path, metavar="DIR",
                        help="write <id>.md or <id>.json files here (default: standard output)")

    env = sub.add_parser("env-example", help="print .env.sidecar.example (every setting)")
    env.add_argument("-o", "--output", help="write to this file instead of stdout")
    env.add_argument("--format", choices=("env", "markdown"), default="env",
                     help="env: .env.sidecar.example; markdown: the table of docs/settings.md")

    bench = sub.add_parser("bench", help="run a benchmark (from a source checkout)")
    if importlib.util.find_spec("streaming_llm.bench") is None:
        # An installed wheel: the benchmarks start servers and score bundled text, so they ship
        # with the sources, not the wheel (pyproject.toml). Say where they are.
        bench.add_argument("bench", nargs=argparse.REMAINDER, help="a benchmark and its options")
        bench.set_defaults(bench_module=None)
        return parser
    benches = bench.add_subparsers(dest="bench", required=True)
    for name in BENCHMARKS:
        try:
            module = importlib.import_module(f"streaming_llm.bench.{name}")
        except ImportError:
            continue  # not built yet
        p = benches.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(bench_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "env-example":  # documents the settings: must not depend on them
        return env_example(args.output, args.format)
    from .http.auth import load_api_keys

    try:
        settings = Settings.from_env(
            host=getattr(args, "host", None), port=getattr(args, "port", None))
        api_keys = load_api_keys(settings)  # read here so that the logs mask them literally too
    except SettingsError as exc:
        print(f"streaming-llm: configuration error: {exc}", file=sys.stderr)
        return 2
    from .logs import configure

    configure(settings.log_level, log_dir=settings.log_dir,
              secrets=[*api_keys, settings.openai_api_key])
    if args.command == "serve":
        try:
            return serve(settings)
        except SettingsError as exc:  # found while building the app, e.g. an unusable API key
            print(f"streaming-llm: configuration error: {exc}", file=sys.stderr)
            return 2
    if args.command == "migrate":
        from .storage.database import upgrade_to_head

        upgrade_to_head(settings.resolved_database_url)
        log.info("database at head: %s", settings.resolved_database_url)
        return 0
    if args.command == "chat":
        from .client import chat_cli

        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        return chat_cli.run(args, default_url=f"http://{host}:{settings.port}")
    if args.command == "export":
        from .chat.export import run_export

        return run_export(settings, conversation_id=args.conversation, fmt=args.format,
                          out=args.out)
    if args.bench_module is None:
        print(BENCH_FROM_SOURCES, file=sys.stderr)
        return 2
    return int(args.bench_module.run(args))


def serve(settings: Settings) -> int:
    import uvicorn

    from .app import create_app
    from .chat.limits import ws_max_size
    from .http.connections import uvicorn_options
    from .http.shutdown import GRACEFUL_SHUTDOWN_S, Server

    log.info("streaming-llm %s listening on http://%s:%d (engine %s)", __version__,
             settings.host, settings.port, settings.engine)
    _ensure_descriptors(settings.max_connections)
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port,
        log_config=None, log_level=settings.log_level, lifespan="on",
        ws_max_size=ws_max_size(settings), timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        # Token frames are tens of bytes: deflating each costs ~80 us of CPU and saves nothing.
        ws_per_message_deflate=False,
        # Connection caps, header deadline, idle timeout, bounded pongs (http/connections.py).
        **uvicorn_options(settings, app.state.connection_refused),
    )
    # shutdown.Server drains the chat sockets first (STREAMING_LLM_SHUTDOWN_GRACE_S); uvicorn's
    # own timeout then covers what is left (idle HTTP connections).
    Server(config, drain=app.state.drain).run()
    return 0


#: Descriptors the server needs besides its connections: database, logs, model files, pipes.
SPARE_DESCRIPTORS = 128


def _ensure_descriptors(max_connections: int) -> None:
    """Raise the soft descriptor limit to cover the connection cap, or say that it cannot."""
    import resource

    needed = max_connections + SPARE_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft < needed:
        log.warning("the descriptor limit (%d) is below STREAMING_LLM_MAX_CONNECTIONS + %d (%d): "
                    "connections beyond it fail without an answer; raise LimitNOFILE / ulimit -n "
                    "or lower STREAMING_LLM_MAX_CONNECTIONS", soft, SPARE_DESCRIPTORS, needed)


def env_example(output: str | None, fmt: str = "env") -> int:
    from .env_example import render, render_markdown

    text = render_markdown() if fmt == "markdown" else render()
    if output is None:
        sys.stdout.write(text)
    else:
        Path(output).write_text(text, encoding="utf-8")
    return 0
