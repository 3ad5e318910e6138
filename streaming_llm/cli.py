"""Command line: ``streaming-llm serve | migrate | bench <name>``."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
from collections.abc import Iterator, Sequence

from . import __version__
from .settings import Settings, SettingsError

log = logging.getLogger("streaming_llm")

BENCHMARKS = ("cache", "ollama", "load")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streaming-llm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"streaming-llm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP + WebSocket server")
    serve.add_argument("--host", help="override STREAMING_LLM_HOST")
    serve.add_argument("--port", type=int, help="override STREAMING_LLM_PORT")

    sub.add_parser("migrate", help="bring the database to the latest migration and exit")

    bench = sub.add_parser("bench", help="run a benchmark")
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
    try:
        settings = Settings.from_env(
            host=getattr(args, "host", None), port=getattr(args, "port", None))
    except SettingsError as exc:
        print(f"streaming-llm: configuration error: {exc}", file=sys.stderr)
        return 2
    from .logs import configure

    configure(settings.log_level)
    if args.command == "serve":
        return serve(settings)
    if args.command == "migrate":
        from .storage.database import upgrade_to_head

        upgrade_to_head(settings.resolved_database_url)
        log.info("database at head: %s", settings.resolved_database_url)
        return 0
    return int(args.bench_module.run(args))


def serve(settings: Settings) -> int:
    import uvicorn

    from .app import create_app

    log.info("streaming-llm %s listening on http://%s:%d (engine %s)", __version__,
             settings.host, settings.port, settings.engine)
    config = uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.port,
        log_config=None, log_level=settings.log_level, lifespan="on",
        ws_max_size=16 * 1024 * 1024, timeout_graceful_shutdown=10,
    )
    _server_class()(config).run()
    return 0


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                yield
                # uvicorn re-raises the signal it stopped on, so SIGTERM would exit with -15.
                # SIGTERM is how systemd and compose stop a service: after a graceful
                # shutdown that is a clean exit, status 0.
                self._captured_signals = [s for s in self._captured_signals
                                          if s != signal.SIGTERM]

    return Server
