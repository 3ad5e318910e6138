"""The wheel is the product: built from the project, installed into a fresh virtual environment
outside the tree, it migrates a new database (the migrations ship inside the package) and serves.

No network: the wheel is built with this environment's setuptools, and the fresh environment
reaches this environment's already-installed dependencies through a ``.pth`` line instead of
downloading them. Only the wheel provides ``streaming_llm`` there (checked).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from websockets.sync.client import connect

from streaming_llm.testing.server import ServerProcess, free_port, stop, wait_healthy

from .server import ROOT, http

pytestmark = pytest.mark.e2e


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([str(a) for a in args], check=False, cwd=cwd, env=env,
                          capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"{args}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def build_wheel(tmp_path: Path) -> Path:
    """``pip wheel`` of a copy of the sources (so the build writes nothing into the checkout)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "streaming_llm", src / "streaming_llm",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--wheel-dir", tmp_path / "dist", src, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("streaming_llm-*.whl")
    return wheel


def install(wheel: Path, venv: Path) -> Path:
    """A fresh venv holding the wheel, with this venv's site-packages on its path (after its own),
    for the dependencies. Returns the venv's python."""
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=venv.parent)
    python = venv / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
         "--no-index", wheel, cwd=venv.parent)
    purelib = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                        cwd=venv.parent).strip())
    (purelib / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return python


def test_the_wheel_installed_elsewhere_migrates_and_serves(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert {"streaming_llm/storage/alembic.ini", "streaming_llm/storage/migrations/env.py",
            "streaming_llm/storage/migrations/script.py.mako",
            "streaming_llm/storage/migrations/versions/0001_agents_conversations_turns.py",
            "streaming_llm/storage/migrations/versions/0002_casefolded_search_columns.py",
            "streaming_llm/storage/migrations/versions/0003_conversation_agents.py",
            "streaming_llm/storage/migrations/versions/0004_tool_calls.py",
            } <= names, sorted(n for n in names if "storage" in n)
    # Deliberately left to the source tree (pyproject.toml): the benchmarks with the text they
    # score, and the test kit (fake upstreams, server and PostgreSQL launchers). Serving needs
    # neither; both import from a checkout.
    assert not [n for n in names if n.startswith(("streaming_llm/bench/", "streaming_llm/testing/"))]

    elsewhere = tmp_path / "elsewhere"  # outside the checkout: no sources to fall back on
    elsewhere.mkdir()
    python = install(wheel, elsewhere / "venv")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("STREAMING_LLM_") and k != "PYTHONPATH"}
    env |= {"STREAMING_LLM_DATA_DIR": str(elsewhere / "data"), "STREAMING_LLM_ENGINE": "echo",
            "STREAMING_LLM_ECHO_DELAY_MS": "0", "PYTHONUNBUFFERED": "1"}
    where = _run(python, "-c", "import streaming_llm; print(streaming_llm.__file__)",
                 cwd=elsewhere, env=env)
    assert Path(where.strip()).is_relative_to(elsewhere / "venv"), where

    cli = elsewhere / "venv" / "bin" / "streaming-llm"
    bench = subprocess.run([cli, "bench", "quality", "--only", "steps"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=120, check=False)
    assert bench.returncode == 2 and "run from a source checkout" in bench.stderr, bench
    out = _run(cli, "migrate", cwd=elsewhere, env=env)
    assert "database at head" in out, out
    with sqlite3.connect(elsewhere / "data" / "streaming_llm.db") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchone() == ("0004",)

    port = free_port()
    log_path = elsewhere / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([cli, "serve"], cwd=elsewhere, stdout=log,
                                stderr=subprocess.STDOUT,
                                env=env | {"STREAMING_LLM_PORT": str(port),
                                           "STREAMING_LLM_HOST": "127.0.0.1"})
    server = ServerProcess(proc, port, elsewhere / "data", log_path)
    try:
        wait_healthy(server.base_url, proc, 120, log_path)
        status, _ = http("PUT", server.base_url + "/agents/packaged", {"name": "Packaged"})
        assert status == 201, server.log()
        with connect(server.ws_url, open_timeout=10) as ws:
            ws.send(json.dumps({"type": "chat", "agent_id": "packaged", "message": "hello"}))
            frames = [json.loads(ws.recv(timeout=30))]
            while frames[-1]["type"] not in ("done", "error"):
                frames.append(json.loads(ws.recv(timeout=30)))
        assert frames[-1]["type"] == "done", frames
        status, conversation = http(
            "GET", f"{server.base_url}/conversations/{frames[-1]['conversation_id']}")
        assert status == 200
        assert [t["role"] for t in conversation["turns"]] == ["user", "assistant"]
    finally:
        stop(proc)
    assert proc.returncode == 0, server.log()
