"""scripts/gpu-check.sh: the wheels it would fetch for the GPU machine, and its CPU dry run (the
same stages as on the GPU: build the models, the CUDA tests, bench speed, bench concurrency, one
table)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
# A script beside gpu-check.sh, not a module of the package: loaded from its file.
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
assert _spec is not None and _spec.loader is not None
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def run(*args: str, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], check=False, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_the_wheels_are_the_dependencies_the_gpu_image_lacks() -> None:
    names = [gpu_check._name(r) for r in gpu_check.requirements()]
    for needed in ("starlette", "uvicorn", "sqlalchemy", "aiosqlite", "alembic", "msgspec",
                   "prometheus-client", "pytest", "pytest-asyncio", "pytest-timeout", "httpx"):
        assert needed in names
    # Never torch or transformers: the image's CUDA build stays; gguf is not needed there.
    assert not {"torch", "transformers", "tokenizers", "gguf", "numpy"} & set(names)


@pytest.mark.process
def test_fetch_print_lists_the_downloads_without_the_network(tmp_path: Path) -> None:
    result = run("--fetch", "--print", env={"GPU_CHECK_PYTHONS": "3.11 3.12"})
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if " pip download " in line]
    assert len(commands) == 2 and "--python-version 3.11" in commands[0]
    for command in commands:
        assert "--only-binary=:all:" in command and "--platform manylinux" in command
        assert "starlette==" in command and "msgspec==" in command and "torch" not in command


@pytest.mark.process
def test_an_unknown_argument_is_refused() -> None:
    result = run("--fetsh")
    assert result.returncode == 2 and "unknown argument --fetsh" in result.stderr


@pytest.mark.slow
@pytest.mark.process
def test_the_dry_run_runs_every_stage_on_the_cpu_and_prints_the_table(tmp_path: Path) -> None:
    result = run("--dry-run", env={"OUT": str(tmp_path)}, timeout=290)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("| model | mode | decode after 16 tok/s | decode after 1000 tok/s | prefill 512 tok/s "
            "| 2 conversations, aggregate tok/s | compile s |") in result.stdout
    status = dict(line.rsplit(" ", 1) for line in (tmp_path / "status").read_text().splitlines())
    # The stages that must work on any machine; concurrency may run out of the budget on a
    # loaded one (its cell then says "timed out").
    assert {k: status[k] for k in ("build", "cuda-tests", "tiny-a-speed", "tiny-b-speed")} == {
        "build": "0", "cuda-tests": "0", "tiny-a-speed": "0", "tiny-b-speed": "0"}
    rows = [line for line in result.stdout.splitlines() if line.startswith("| tiny-")]
    assert len(rows) == 4  # two shapes x eager, compiled (not run in a dry run)
    eager_a = rows[0].split(" | ")
    assert eager_a[1] == "eager" and float(eager_a[2]) > 0 and float(eager_a[4]) > 0
    assert "skipped" in (tmp_path / "cuda-tests.out").read_text()  # no CUDA here
    assert (tmp_path / "table.md").read_text().strip() in result.stdout
