from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from streaming_llm.app import create_app
from streaming_llm.engines import registry
from streaming_llm.settings import Settings

from .fakes import ScriptedEngine


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        # TestClient's requests carry ``Host: testserver``
        values: dict[str, Any] = {"data_dir": tmp_path / "data", "engine": "echo", "echo_delay_ms": 0,
                                  "allowed_hosts": "testserver"}
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> ScriptedEngine:
    """Route tests: the app's engine is a scripted fake (selected with engine='echo')."""
    engine = ScriptedEngine()
    monkeypatch.setitem(registry.ENGINES, "echo", lambda settings, http: engine)
    return engine


@pytest.fixture
def client(settings: Settings, scripted: ScriptedEngine) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def put_agent(client: TestClient, agent_id: str = "helper", **fields: str) -> dict[str, Any]:
    body = {"name": "Helper", "system_prompt": "You help.", "markdown_context": "# Notes\nBe brief."}
    body.update(fields)
    resp = client.put(f"/agents/{agent_id}", json=body)
    assert resp.status_code in (200, 201), resp.text
    return resp.json()
