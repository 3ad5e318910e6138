"""Run a real ``python -m streaming_llm serve`` on a free loopback port and wait for ``/health``.

One copy for the end-to-end tests (``tests/server.py`` re-exports it) and the benches that drive
a real server (``streaming-llm bench cache|load|ollama``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

# The directory that holds the ``streaming_llm`` package: a checkout, or site-packages.
PACKAGE_PARENT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child: no ``STREAMING_LLM_*`` leaks in, plus ``extra``.

    The package may be a checkout rather than installed, so the child is pointed at this copy.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMING_LLM_")}
    root = str(PACKAGE_PARENT)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/chat"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "streaming_llm.db"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_healthy(base_url: str, proc: subprocess.Popen[bytes] | None, timeout: float,
                 log_path: Path | None = None) -> None:
    """Poll ``base_url/health`` until it answers 200; fail early if ``proc`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            log = log_path.read_text(errors="replace") if log_path else ""
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log}")
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    log = log_path.read_text(errors="replace") if log_path else ""
    raise TimeoutError(f"{base_url}/health did not answer 200 within {timeout}s:\n{log}")


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM (the server's graceful shutdown), then SIGKILL if it is not gone in ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def start_server(workdir: Path, env: Mapping[str, str] | None = None, *,
                 data_dir: Path | None = None, log_path: Path | None = None,
                 timeout: float = 120.0, wait: bool = True,
                 cwd: Path | None = None) -> Iterator[ServerProcess]:
    """Run ``python -m streaming_llm serve`` on a free loopback port; stop it on exit.

    The data dir defaults to ``workdir/data`` and the log (stdout and stderr) to
    ``workdir/server-PORT.log``. ``env`` is applied last, over the host, port and data dir.
    With ``wait``, returns once ``/health`` answers 200 (or raises after ``timeout`` seconds).
    """
    port = free_port()
    data_dir = data_dir if data_dir is not None else workdir / "data"
    log_path = log_path if log_path is not None else workdir / f"server-{port}.log"
    full_env = child_env({
        "STREAMING_LLM_HOST": "127.0.0.1",
        "STREAMING_LLM_PORT": str(port),
        "STREAMING_LLM_DATA_DIR": str(data_dir),
        "PYTHONUNBUFFERED": "1",
    })
    full_env.update(env or {})
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streaming_llm", "serve"], cwd=cwd, env=full_env,
            stdout=log_file, stderr=subprocess.STDOUT,
        )
    server = ServerProcess(proc, port, data_dir, log_path)
    try:
        if wait:
            wait_healthy(server.base_url, proc, timeout, log_path)
        yield server
    finally:
        stop(proc)
