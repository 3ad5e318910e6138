from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from streaming_llm.app import create_app
from streaming_llm.chat.agent_files import parse, render
from streaming_llm.settings import Settings

from .conftest import BOTH_DATABASES, put_agent


@BOTH_DATABASES
def test_crud_round_trip_and_file_mirror(client: TestClient, settings: Settings) -> None:
    assert client.get("/agents").json() == []
    resp = client.put("/agents/reviewer", json={
        "name": "Reviewer", "system_prompt": "You review.\nBe kind: \"always\".",
        "markdown_context": "# Context\n\n- item é 日本\n"})
    assert resp.status_code == 201
    agent = resp.json()
    assert set(agent) == {"id", "name", "system_prompt", "markdown_context", "created_at", "updated_at",
                          "tools"}
    assert agent["id"] == "reviewer" and agent["created_at"].endswith("Z")

    path = settings.resolved_agents_dir / "reviewer.md"
    text = path.read_text()
    assert text.startswith("---\nid: reviewer\n")
    fields = parse(text)
    assert fields["system_prompt"] == "You review.\nBe kind: \"always\"."
    assert fields["markdown_context"] == "# Context\n\n- item é 日本\n"

    resp = client.put("/agents/reviewer", json={"name": "Reviewer 2", "system_prompt": "x"})
    assert resp.status_code == 200 and resp.json()["created_at"] == agent["created_at"]
    assert client.get("/agents/reviewer").json()["name"] == "Reviewer 2"
    assert parse(path.read_text())["name"] == "Reviewer 2"
    assert [a["id"] for a in client.get("/agents").json()] == ["reviewer"]

    assert client.delete("/agents/reviewer").status_code == 204
    assert not path.exists()
    resp = client.delete("/agents/reviewer")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "agent_not_found"
    assert client.get("/agents/reviewer").status_code == 404
    assert not any(p.name.endswith(".tmp") for p in settings.resolved_agents_dir.iterdir())


@pytest.mark.parametrize("bad", ["Upper", "a.b", "x" * 65, "dot..dot", "%2e%2e", "a%00b",
                                 "..%2Fescape", "a%2Fb", "sp%20ace", "caf%C3%A9"])
def test_bad_ids_are_refused_and_touch_nothing(client: TestClient, settings: Settings, bad: str) -> None:
    before = sorted(p.name for p in settings.data_dir.rglob("*"))
    for method in ("GET", "PUT", "DELETE"):
        resp = client.request(method, f"/agents/{bad}", json={"name": "n"})
        assert resp.status_code == 400, (method, bad, resp.text)
        assert resp.json()["error"]["code"] == "invalid_id"
    assert sorted(p.name for p in settings.data_dir.rglob("*")) == before
    assert client.get("/agents").json() == []


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"not json", 400, "invalid_json"),
    (b"", 400, "invalid_json"),
    (b'{"system_prompt": "no name"}', 422, "validation_error"),
    (b'{"name": 5}', 422, "validation_error"),
    (b'{"name": "   "}', 400, "validation_error"),
    (b'{"name": "n", "id": "other"}', 400, "id_mismatch"),
    (b'[1, 2]', 422, "validation_error"),
])
def test_bad_bodies(client: TestClient, settings: Settings, body: bytes, status: int, code: str) -> None:
    resp = client.put("/agents/good", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code and resp.json()["error"]["message"]
    assert client.get("/agents").json() == []
    assert not (settings.resolved_agents_dir / "good.md").exists()


def test_unknown_route_and_method(client: TestClient) -> None:
    resp = client.get("/nope")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    resp = client.post("/agents")
    assert resp.status_code == 405 and resp.json()["error"]["code"] == "method_not_allowed"


def _write(path: Path, text: str, mtime: float | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


@BOTH_DATABASES
def test_files_dropped_or_edited_by_hand_are_imported(make_settings, scripted,  # type: ignore[no-untyped-def]
                                                      caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings()
    agents_dir = settings.resolved_agents_dir
    with TestClient(create_app(settings, engine=scripted)) as c:
        put_agent(c, "edited", name="Before")
        put_agent(c, "untouched", name="Same")
    # Dropped in by hand, YAML block scalar for the system prompt.
    _write(agents_dir / "dropped.md", "---\nname: Dropped In\nsystem_prompt: |\n  Line one.\n"
                                      "  Line two.\n---\nContext body\n")
    # Edited by hand after the row was written.
    _write(agents_dir / "edited.md", render("edited", "After", "new prompt", "new body"),
           mtime=time.time() + 5)
    # Malformed files are skipped with a warning naming them, never a crash.
    _write(agents_dir / "broken.md", "no front matter here")
    _write(agents_dir / "BadName.md", render("BadName", "x", "", ""))
    _write(agents_dir / "mismatch.md", render("other", "x", "", ""))
    with caplog.at_level("WARNING"), TestClient(create_app(settings, engine=scripted)) as c:
        agents = {a["id"]: a for a in c.get("/agents").json()}
    assert set(agents) == {"dropped", "edited", "untouched"}
    assert agents["dropped"]["name"] == "Dropped In"
    assert agents["dropped"]["system_prompt"] == "Line one.\nLine two."
    assert agents["dropped"]["markdown_context"] == "Context body\n"
    assert (agents["edited"]["name"], agents["edited"]["markdown_context"]) == ("After", "new body")
    assert agents["untouched"]["name"] == "Same"
    warned = caplog.text
    for name in ("broken.md", "BadName.md", "mismatch.md"):
        assert name in warned


def test_older_file_does_not_overwrite_newer_row(make_settings, scripted) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings()
    with TestClient(create_app(settings, engine=scripted)) as c:
        put_agent(c, "a", name="Row wins")
    path = settings.resolved_agents_dir / "a.md"
    _write(path, render("a", "Stale file", "", ""), mtime=time.time() - 3600)
    with TestClient(create_app(settings, engine=scripted)) as c:
        assert c.get("/agents/a").json()["name"] == "Row wins"


def test_parse_rejects_unclosed_front_matter() -> None:
    from streaming_llm.chat.agent_files import MalformedAgentFile

    with pytest.raises(MalformedAgentFile, match="not closed"):
        parse("---\nname: x\n")
    with pytest.raises(MalformedAgentFile, match="bad quoted string"):
        parse('---\nname: "x\n---\n')
