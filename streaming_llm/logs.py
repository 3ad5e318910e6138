"""Logging set-up: plain readable lines to stderr, and optionally a file in the log directory.

- **stderr** always. Under systemd stderr is a journald stream and journald stamps every line
  itself, so there the timestamp is left out (``journalctl`` would otherwise show two).
- **a file** ``<STREAMING_LLM_LOG_DIR>/streaming-llm.log`` when that setting is set, with
  timestamps. It is a :class:`~logging.handlers.WatchedFileHandler`, so ``logrotate`` can move it
  away without a restart.

What goes into a line: request ids (``turn req_… started``), conversation and turn ids, counts and
timings. What never does at info level: message contents and secrets. Every handler carries a
:class:`Redact` filter that masks credential-looking query parameters and ``Authorization``
values (a browser's WebSocket can only carry an API key in the URL, and uvicorn logs every path)
and any literal secret passed to :func:`configure`.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TextIO

LOG_FILE = "streaming-llm.log"
PLAIN = "%(levelname)s %(name)s: %(message)s"
STAMPED = "%(asctime)s " + PLAIN

# key=value in a query string or header dump, e.g. "/ws/chat?api_key=abc" or "token=abc&x=1".
_CREDENTIAL = re.compile(
    r"(?i)\b(api[_-]?key|access[_-]?token|token|secret|password|auth)=([^&\s\"']+)")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
MASK = "***"


class Redact(logging.Filter):
    """Mask secrets in the formatted message; the record's args are folded into it."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = _CREDENTIAL.sub(rf"\1={MASK}", message)
        clean = _BEARER.sub(rf"\1 {MASK}", clean)
        for secret in self.secrets:
            clean = clean.replace(secret, MASK)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def under_journald(environ: Mapping[str, str], stream: TextIO) -> bool:
    """True when ``stream`` is the journald stream systemd connected (``JOURNAL_STREAM=dev:ino``).

    Comparing device and inode, as ``systemd.exec(5)`` advises, rather than only checking the
    variable: a child process started from the service with stderr redirected inherits it too.
    """
    value = environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def build_handlers(*, log_dir: Path | None = None, secrets: Iterable[str] = (),
                   environ: Mapping[str, str] | None = None,
                   stream: TextIO | None = None) -> list[logging.Handler]:
    """The stderr handler and, with ``log_dir``, the file handler; all with the same filter."""
    environ = os.environ if environ is None else environ
    stream = sys.stderr if stream is None else stream
    redact = Redact(secrets)
    console = logging.StreamHandler(stream)
    console.setFormatter(logging.Formatter(PLAIN if under_journald(environ, stream) else STAMPED))
    handlers: list[logging.Handler] = [console]
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        file = logging.handlers.WatchedFileHandler(log_dir / LOG_FILE, encoding="utf-8")
        file.setFormatter(logging.Formatter(STAMPED))
        handlers.append(file)
    for handler in handlers:
        handler.addFilter(redact)
    return handlers


def configure(level: str, *, log_dir: Path | None = None, secrets: Iterable[str] = ()) -> None:
    """Install the handlers on the root logger (uvicorn's loggers propagate to it)."""
    logging.basicConfig(level=level.upper(), force=True,
                        handlers=build_handlers(log_dir=log_dir, secrets=secrets))
    # Alembic announces every plugin at INFO; its migration lines are the ones worth keeping.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
