"""The files in ``deploy/``: the sidecar script run for real, the compose file and the systemd unit
validated by their own tools where this machine has them, and checked key by key everywhere."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from .server import ROOT, free_port, wait_healthy

# Every test here runs the deploy scripts or tools (bash, systemd-analyze, docker compose).
pytestmark = pytest.mark.process

SIDECAR = ROOT / "deploy" / "run-sidecar.sh"
COMPOSE = ROOT / "deploy" / "compose" / "streaming-llm.compose.yml"
UNIT = ROOT / "deploy" / "systemd" / "streaming-llm.service"
VENV = Path(sys.prefix)  # the environment running these tests: /tmp/probe in dev, .venv in CI


# What the script reads besides STREAMING_LLM_*, and what an outer `make test` leaves behind.
FOREIGN = {"PYTHON", "TORCH_SPEC", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"}


def sidecar_env(env_file: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("STREAMING_LLM_") and k not in FOREIGN}
    env.update({"STREAMING_LLM_ENV_FILE": str(env_file), "PYTHONUNBUFFERED": "1", **extra})
    return env


def run_sidecar(tmp_path: Path, env_file_text: str,
                **extra: str) -> subprocess.CompletedProcess[str]:
    env_file = tmp_path / "sidecar.env"
    env_file.write_text(env_file_text)
    return subprocess.run([str(SIDECAR)], cwd=tmp_path, env=sidecar_env(env_file, **extra),
                          check=False, capture_output=True, text=True, timeout=60)


# --- deploy/run-sidecar.sh ----------------------------------------------------------------------
@pytest.mark.e2e
def test_sidecar_serves_from_a_subdirectory(tmp_path: Path) -> None:
    assert (VENV / "bin" / "python").exists(), f"tests must run in a virtual environment: {VENV}"
    port = free_port()
    env_file = tmp_path / "sidecar.env"
    env_file.write_text(f"""\
# written by the test, read by the script
STREAMING_LLM_ENGINE=echo
STREAMING_LLM_PORT={port}
STREAMING_LLM_DATA_DIR={tmp_path / "data"}
export STREAMING_LLM_AGENTS_DIR="{tmp_path / "from-file"}"
STREAMING_LLM_BOOTSTRAP_DEPS=0
STREAMING_LLM_VENV={VENV}
""")
    log_path = tmp_path / "sidecar.log"
    env = sidecar_env(env_file, STREAMING_LLM_AGENTS_DIR=str(tmp_path / "from-env"))
    with open(log_path, "wb") as log:  # from a subdirectory, by a relative path
        proc = subprocess.Popen(["../deploy/run-sidecar.sh"], cwd=ROOT / "streaming_llm", env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base_url, proc, 60, log_path)
        with urllib.request.urlopen(base_url + "/health", timeout=5) as resp:
            assert json.loads(resp.read())["engine"] == "echo"  # from the file
        body = b'{"name": "A", "system_prompt": "", "markdown_context": ""}'
        req = urllib.request.Request(base_url + "/agents/a1", method="PUT", data=body,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 201
        # The environment wins over the file.
        assert (tmp_path / "from-env" / "a1.md").exists()
        assert not (tmp_path / "from-file").exists()
        with sqlite3.connect(tmp_path / "data" / "streaming_llm.db") as db:
            assert db.execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)
        # The compose file's health check, run as compose would run it in the container.
        assert compose_healthcheck(port).returncode == 0
    finally:
        proc.send_signal(signal.SIGTERM)  # the script exec'd the server: the signal reaches it
        returncode = proc.wait(timeout=20)
    log_text = log_path.read_text()
    assert returncode == 0, log_text
    assert f"settings from {env_file}" in log_text
    assert "database at head" in log_text
    assert f"listening on http://127.0.0.1:{port}" in log_text
    assert compose_healthcheck(port).returncode != 0  # and it notices a server that is gone


def venv_without_deps(tmp_path: Path) -> Path:
    path = tmp_path / "bare-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True,
                   timeout=60)
    return path


@pytest.mark.parametrize(("case", "env_file_text", "extra", "code", "message"), [
    ("bad line", "STREAMING_LLM_ENGINE=echo\nthis is not a setting\n", {}, 2,
     "sidecar.env:2: expected KEY=value, got: this is not a setting"),
    ("no venv", "STREAMING_LLM_BOOTSTRAP_DEPS=0\nSTREAMING_LLM_VENV=/nonexistent/venv\n", {}, 1,
     "no virtual environment at /nonexistent/venv and STREAMING_LLM_BOOTSTRAP_DEPS=0"),
    ("no python", "", {"PYTHON": "/nonexistent/python3"}, 1,
     "/nonexistent/python3 not found: install Python 3.11 or newer"),
    ("bad flag", "STREAMING_LLM_BOOTSTRAP_DEPS=maybe\n", {}, 2,
     "STREAMING_LLM_BOOTSTRAP_DEPS=maybe: expected 1 or 0"),
    ("no deps", "STREAMING_LLM_BOOTSTRAP_DEPS=0\n", {"STREAMING_LLM_VENV": "<bare>"}, 1,
     "lacks the service's dependencies: run 'make install'"),
])
def test_sidecar_says_what_is_missing(tmp_path: Path, case: str, env_file_text: str,
                                      extra: dict[str, str], code: int, message: str) -> None:
    if extra.get("STREAMING_LLM_VENV") == "<bare>":
        extra = {**extra, "STREAMING_LLM_VENV": str(venv_without_deps(tmp_path))}
    proc = run_sidecar(tmp_path, env_file_text, **extra)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr
    assert "run-sidecar: error:" in proc.stderr


def test_sidecar_bootstraps_through_the_makefile(tmp_path: Path) -> None:
    # A virtual environment that the Makefile's stamp says is installed: `make install` has
    # nothing to do (no pip, no network), and the script goes on to the migration, which stops
    # on a bad setting with that setting's message only (exit status 2, nothing about the
    # database, which was never the problem).
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    (venv / ".stamp-install").touch()
    proc = run_sidecar(tmp_path, f"STREAMING_LLM_VENV={venv}\nSTREAMING_LLM_PORT=eighty\n")
    assert proc.returncode == 2, proc.stderr
    out = proc.stdout + proc.stderr
    assert f"installing dependencies into {venv} (torch==2.13.0)" in out
    assert "Nothing to be done for 'install'" in out and "pip" not in out
    assert "STREAMING_LLM_PORT='eighty' is not valid" in out
    assert "database" not in out


def test_sidecar_refuses_a_missing_env_file(tmp_path: Path) -> None:
    env = sidecar_env(tmp_path / "nope.env")
    proc = subprocess.run([str(SIDECAR)], env=env, check=False, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2
    assert f"STREAMING_LLM_ENV_FILE={tmp_path / 'nope.env'}: no such file" in proc.stderr


def test_sidecar_script_is_executable_and_bash_clean() -> None:
    assert os.access(SIDECAR, os.X_OK)
    subprocess.run(["bash", "-n", str(SIDECAR)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(SIDECAR)], check=True)


# --- deploy/compose -----------------------------------------------------------------------------
def compose_healthcheck(port: int) -> subprocess.CompletedProcess[bytes]:
    test = load_compose()["services"]["streaming-llm"]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "python3"
    env = {**os.environ, "STREAMING_LLM_PORT": str(port)}
    return subprocess.run([sys.executable, *test[2:]], env=env, check=False,
                          capture_output=True, timeout=10)


def load_compose(text: str | None = None) -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text() if text is None else text)


def compose_client() -> list[str] | None:
    for cmd in (["docker", "compose"], ["podman", "compose"]):
        if shutil.which(cmd[0]) and subprocess.run([*cmd, "version"], check=False,
                                                   capture_output=True, timeout=30).returncode == 0:
            return cmd
    return None


def test_compose_file(tmp_path: Path) -> None:
    compose = load_compose()
    service = compose["services"]["streaming-llm"]
    here = COMPOSE.parent
    assert service["command"] == ["deploy/run-sidecar.sh"]
    mounts = dict(v.rsplit(":", 1) for v in service["volumes"])
    repo_mount = next(src for src, dst in mounts.items() if dst == service["working_dir"])
    assert (here / repo_mount).resolve() == ROOT  # mounts the repository
    assert mounts["data"] == service["environment"]["STREAMING_LLM_DATA_DIR"]
    assert "data" in compose["volumes"] and "venv" in compose["volumes"]  # named volumes
    assert mounts["venv"] == service["environment"]["STREAMING_LLM_VENV"]
    [env_file] = service["env_file"]
    assert (here / env_file["path"]).resolve() == ROOT / ".env.sidecar"
    assert env_file["required"] is False
    assert service["environment"]["STREAMING_LLM_HOST"] == "0.0.0.0"
    assert service["environment"]["STREAMING_LLM_PORT"] == "${STREAMING_LLM_PORT:-8000}"
    assert service["ports"] == ["127.0.0.1:${STREAMING_LLM_PORT:-8000}:${STREAMING_LLM_PORT:-8000}"]
    assert "/health" in " ".join(service["healthcheck"]["test"])
    assert seconds(service["stop_grace_period"]) > 10 + 5  # > default grace + cancel time

    # The GPU reservation is there, commented out, and valid once uncommented.
    gpu = re.sub(r"(?m)^    # ?(deploy:|  .*)$", r"    \1", COMPOSE.read_text())
    devices = load_compose(gpu)["services"]["streaming-llm"]["deploy"]["resources"][
        "reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]

    client = compose_client()
    if client is not None:  # the real parser, where there is one
        env_file_path = tmp_path / "sidecar.env"
        env_file_path.write_text("STREAMING_LLM_PORT=8123\n")
        proc = subprocess.run([*client, "--env-file", str(env_file_path), "-f", str(COMPOSE),
                               "config", "--format", "json"], check=False, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        resolved = json.loads(proc.stdout)["services"]["streaming-llm"]
        assert resolved["ports"][0]["published"] == "8123"


def seconds(value: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    match = re.fullmatch(r"(\d+)([smh])", value)
    assert match, value
    return int(match[1]) * units[match[2]]


# --- deploy/systemd -----------------------------------------------------------------------------
def unit_entries(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of the [Service] section (keys may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif line and not line.startswith(("#", ";")) and section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_systemd_unit(tmp_path: Path) -> None:
    service = unit_entries(UNIT.read_text())
    one = {k: v[-1] for k, v in service.items()}
    assert one["User"] == "streaming-llm" and one["Group"] == "streaming-llm"
    assert one["EnvironmentFile"] == "/etc/streaming-llm/env"
    assert one["StateDirectory"] == "streaming-llm"
    assert "STREAMING_LLM_DATA_DIR=%S/streaming-llm" in service["Environment"]
    assert one["Restart"] == "on-failure"
    assert one["KillSignal"] == "SIGTERM"
    assert float(one["TimeoutStopSec"]) > 10 + 5  # > default grace + cancel time
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert one[key] == "yes", key
    assert one["ProtectSystem"] == "strict"
    assert "PrivateDevices" not in service  # it would hide /dev/nvidia*
    assert one["DevicePolicy"] == "closed"
    assert "char-nvidia-uvm rw" in service["DeviceAllow"]
    assert {"char-nvidia-frontend rw", "char-nvidia rw"} <= set(service["DeviceAllow"])
    assert one["ExecStart"].endswith("/.venv/bin/streaming-llm serve")

    analyze = shutil.which("systemd-analyze")
    if analyze is not None:
        # verify checks that the commands exist: point the unit at a stand-in checkout.
        app = tmp_path / "app"
        (app / ".venv" / "bin").mkdir(parents=True)
        stub = app / ".venv" / "bin" / "streaming-llm"
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
        unit = tmp_path / "streaming-llm.service"
        unit.write_text(UNIT.read_text().replace("/opt/streaming-llm", str(app)))
        proc = subprocess.run([analyze, "--man=no", "verify", str(unit)], check=False,
                              capture_output=True, text=True, timeout=60,
                              env=_no_pager(os.environ))
        # verify exits 0 on unknown keys too, it only warns: any output is a failure.
        assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), (
            proc.stdout + proc.stderr)


def _no_pager(env: Mapping[str, str]) -> dict[str, str]:
    return {**env, "SYSTEMD_PAGER": "", "SYSTEMD_LOG_COLOR": "0"}
