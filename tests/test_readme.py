"""README's Python and curl snippets, run as written against a real server.

The only change made to a snippet is the address: README says ``127.0.0.1:8000`` /
``localhost:8000`` (where ``make run`` serves), the test server listens on a free port. A
``conv_…`` placeholder in a curl line is filled with a real conversation id.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .server import ROOT, http, start_server

README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.M | re.S)


def blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README) if lang == language]


def curl_commands() -> list[str]:
    """Every ``curl`` command of the sh blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in blocks("sh"):
        joined = re.sub(r"\\\n\s*", " ", block)
        for raw in joined.splitlines():
            line = raw.strip()
            if line.startswith("curl "):
                commands.append(re.sub(r"\s+#.*$", "", line))
    return commands


def test_the_readme_has_the_snippets_this_test_runs() -> None:
    assert len(blocks("python")) >= 2
    assert any("stream_chat" in b for b in blocks("python"))
    assert any("OpenAI(" in b for b in blocks("python"))
    assert len(curl_commands()) >= 4
    assert not any("await " in line and not line.startswith((" ", "\t"))
                   for b in blocks("python") for line in b.splitlines()), "top-level await"


@pytest.mark.e2e
def test_readme_snippets_run_against_a_real_server(tmp_path: Path) -> None:
    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "0"}
    with start_server(tmp_path, env) as server:
        address = server.base_url.removeprefix("http://")

        def localize(text: str) -> str:
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
                                  text=True, timeout=30, check=False)
            assert proc.returncode == 0, (command, proc.stderr)
            assert proc.stdout and '"error"' not in proc.stdout, (command, proc.stdout)

        for snippet in blocks("python"):
            proc = subprocess.run([sys.executable, "-c", localize(snippet)], capture_output=True,
                                  text=True, timeout=60, check=False, cwd=tmp_path,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert proc.returncode == 0, (snippet, proc.stderr)
            assert proc.stdout.strip(), snippet
