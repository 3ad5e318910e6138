"""Log lines: journald-aware format, the optional file, and secrets masked in every handler."""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from streaming_llm.logs import (
    LOG_FILE,
    MASK,
    PLAIN,
    STAMPED,
    Redact,
    build_handlers,
    under_journald,
)


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    log = logging.getLogger("streaming_llm.test_logs")
    log.propagate, log.level = False, logging.INFO
    yield log
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def journal_env(stream: io.TextIOBase) -> dict[str, str]:
    st = os.fstat(stream.fileno())
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_journald_is_recognised_by_device_and_inode(tmp_path: Path) -> None:
    with open(tmp_path / "a", "w") as a, open(tmp_path / "b", "w") as b:
        assert under_journald(journal_env(a), a)
        assert not under_journald(journal_env(b), a)  # inherited variable, other stream
        assert not under_journald({}, a)
        assert not under_journald({"JOURNAL_STREAM": "garbage"}, a)
        assert not under_journald(journal_env(a), io.StringIO())  # no file descriptor


def test_stderr_lines_without_timestamp_under_journald(tmp_path: Path,
                                                       logger: logging.Logger) -> None:
    with open(tmp_path / "journal", "w+") as journal, open(tmp_path / "tty", "w+") as tty:
        [to_journal] = build_handlers(environ=journal_env(journal), stream=journal)
        [to_tty] = build_handlers(environ={}, stream=tty)
        assert to_journal.formatter is not None and to_journal.formatter._fmt == PLAIN
        assert to_tty.formatter is not None and to_tty.formatter._fmt == STAMPED
        for handler in (to_journal, to_tty):
            logger.addHandler(handler)
        logger.info("turn %s finished: %s", "req-1", "stop")
        journal.seek(0)
        tty.seek(0)
        assert journal.read() == "INFO streaming_llm.test_logs: turn req-1 finished: stop\n"
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO streaming_llm.test_logs: "
                            r"turn req-1 finished: stop\n", tty.read())


def test_log_dir_adds_a_stamped_file(tmp_path: Path, logger: logging.Logger) -> None:
    log_dir = tmp_path / "var" / "log"  # created when missing
    handlers = build_handlers(log_dir=log_dir, environ={}, stream=io.StringIO())
    assert len(handlers) == 2
    for handler in handlers:
        logger.addHandler(handler)
    logger.warning("engine %s failed to start", "local")
    handlers[1].flush()
    line = (log_dir / LOG_FILE).read_text()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING streaming_llm.test_logs: "
                        r"engine local failed to start\n", line)


@pytest.mark.parametrize(("message", "args", "expected"), [
    ('127.0.0.1:5000 - "WebSocket /ws/chat?api_key=s3cr3t&x=1" [accepted]', (),
     f'127.0.0.1:5000 - "WebSocket /ws/chat?api_key={MASK}&x=1" [accepted]'),
    ("GET %s", ("/ws/chat?token=abc.def",), f"GET /ws/chat?token={MASK}"),
    ("headers: Authorization: Bearer eyJhbGciOi.x-y", (), f"headers: Authorization: Bearer {MASK}"),
    ("the key is %s", ("sk-literal-123",), f"the key is {MASK}"),
    ("turn %s finished: %s, %d pieces", ("req-1", "stop", 3),
     "turn req-1 finished: stop, 3 pieces"),
])
def test_secrets_are_masked(message: str, args: tuple[object, ...], expected: str) -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, message, args, None)
    assert Redact(["sk-literal-123"]).filter(record) is True
    assert record.getMessage() == expected


def test_every_handler_masks(tmp_path: Path, logger: logging.Logger) -> None:
    stream = io.StringIO()
    handlers = build_handlers(log_dir=tmp_path, secrets=["hunter2"], environ={}, stream=stream)
    for handler in handlers:
        logger.addHandler(handler)
    logger.info("connect with password hunter2")
    handlers[1].flush()
    for text in (stream.getvalue(), (tmp_path / LOG_FILE).read_text()):
        assert "hunter2" not in text and f"password {MASK}" in text
