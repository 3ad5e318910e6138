"""The Python and curl snippets of README and ``docs/*.md``, run as written against a real server.

README comes first (its curl creates the agent ``reviewer`` the other snippets talk to), then the
pages in name order: a snippet moved to another page stays tested. The only change made to a
snippet is where things are: the docs say ``127.0.0.1:8000`` / ``localhost:8000`` (where
``make run`` serves) and ``.venv/bin/`` (what ``make run`` creates); the test server listens on a
free port with its own data directory (``STREAMING_LLM_DATA_DIR`` for the ``streaming-llm
export`` lines, which read the database directly), and the test's own environment stands in for
``.venv``. A ``conv_…`` placeholder is filled with a real conversation
id.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .server import ROOT, http, start_server

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.M | re.S)


def blocks(language: str, documents: list[Path] = DOCUMENTS) -> list[str]:
    return [body for document in documents for lang, body in FENCE.findall(document.read_text())
            if lang == language]


def curl_commands(documents: list[Path] = DOCUMENTS) -> list[str]:
    """Every ``curl`` and ``.venv/bin/streaming-llm export`` command of the sh blocks,
    continuation lines joined, comments dropped."""
    commands = []
    for block in blocks("sh", documents):
        joined = re.sub(r"\\\n\s*", " ", block)
        for raw in joined.splitlines():
            line = raw.strip()
            if line.startswith(("curl ", ".venv/bin/streaming-llm export")):
                commands.append(re.sub(r"\s+#.*$", "", line))
    return commands


def test_the_readme_has_the_snippets_this_test_runs() -> None:
    # README's first chat: an agent, a turn with curl and one over the socket.
    readme = DOCUMENTS[:1]
    assert any("-X PUT localhost:8000/agents/reviewer" in c for c in curl_commands(readme))
    assert any("/v1/chat/completions" in c for c in curl_commands(readme))
    assert any("stream_chat" in b for b in blocks("python", readme))
    assert len(blocks("python")) >= 2
    assert any("stream_chat" in b for b in blocks("python"))
    assert any("OpenAI(" in b for b in blocks("python"))
    assert len([c for c in curl_commands() if c.startswith("curl ")]) >= 4
    assert len([c for c in curl_commands() if "streaming-llm export" in c]) == 2
    assert not any("await " in line and not line.startswith((" ", "\t"))
                   for b in blocks("python") for line in b.splitlines()), "top-level await"


@pytest.mark.e2e
def test_readme_snippets_run_against_a_real_server(tmp_path: Path) -> None:
    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "0"}
    with start_server(tmp_path, env) as server:
        address = server.base_url.removeprefix("http://")

        def localize(text: str) -> str:
            text = text.replace(".venv/bin/", f"{Path(sys.executable).parent}/")
            return text.replace("127.0.0.1:8000", address).replace("localhost:8000", address)

        # curl first: it creates the agent `reviewer` the Python snippets talk to.
        commands = curl_commands()
        conversation_id = None
        for written in commands:
            command = written
            if "conv_…" in command:
                if conversation_id is None:
                    status, created = http("POST", server.base_url + "/v1/chat/completions", {
                        "model": "reviewer", "messages": [{"role": "user", "content": "hi"}]},
                        headers={"X-Conversation-Id": "new"})
                    assert status == 200, created
                    listed = http("GET", server.base_url + "/conversations")[1]
                    conversation_id = listed[0]["id"]
                command = command.replace("conv_…", conversation_id)
            proc = subprocess.run(["bash", "-c", localize(command)], capture_output=True,
                                  text=True, timeout=60, check=False, cwd=tmp_path,
                                  env={**os.environ, "PYTHONPATH": str(ROOT),
                                       "STREAMING_LLM_DATA_DIR": str(server.data_dir)})
            assert proc.returncode == 0, (command, proc.stderr)
            if "--out " in command:
                assert list((tmp_path / "transcripts").glob("conv_*.md")), command
            else:
                assert proc.stdout and '"error"' not in proc.stdout, (command, proc.stdout)

        for snippet in blocks("python"):
            proc = subprocess.run([sys.executable, "-c", localize(snippet)], capture_output=True,
                                  text=True, timeout=60, check=False, cwd=tmp_path,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert proc.returncode == 0, (snippet, proc.stderr)
            assert proc.stdout.strip(), snippet
