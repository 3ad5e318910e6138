"""Start a real ``streaming-llm serve`` process on a free loopback port, for end-to-end tests."""

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

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


@contextlib.contextmanager
def start_server(tmp_path: Path, env: Mapping[str, str] | None = None, *,
                 timeout: float = 120.0, wait: bool = True) -> Iterator[ServerProcess]:
    """Run ``python -m streaming_llm serve`` with its data dir in ``tmp_path``; stop it after."""
    port = free_port()
    data_dir = tmp_path / "data"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMING_LLM_")}
    full_env.update({
        "STREAMING_LLM_HOST": "127.0.0.1",
        "STREAMING_LLM_PORT": str(port),
        "STREAMING_LLM_DATA_DIR": str(data_dir),
        "PYTHONUNBUFFERED": "1",
    })
    full_env.update(env or {})
    log_path = tmp_path / f"server-{port}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streaming_llm", "serve"], cwd=ROOT, env=full_env,
            stdout=log_file, stderr=subprocess.STDOUT,
        )
    server = ServerProcess(proc, port, data_dir, log_path)
    try:
        if wait:
            wait_healthy(server.base_url, proc, timeout, log_path)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
