"""``streaming-llm chat``: the terminal chat as a real subprocess, stdin piped, against a real
server (echo engine), interrupted with real SIGINTs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO

import httpx
import pytest

from .server import ROOT, ServerProcess, start_server

LONG = " ".join(f"w{i}" for i in range(400))  # 400 words at 20 ms: 8 s unless cancelled


class Chat:
    """A running ``streaming-llm chat`` with its output collected by reader threads."""

    def __init__(self, server: ServerProcess, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMING_LLM_")}
        env.update({"PYTHONUNBUFFERED": "1", "STREAMING_LLM_LOG_LEVEL": "warning"})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streaming_llm", "chat", *args, "--url", server.base_url],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=_collect, args=(stream, sink), daemon=True)
                        for stream, sink in ((self.proc.stdout, self.out),
                                             (self.proc.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    def __enter__(self) -> Chat:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for reader in self.readers:
            reader.join(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\nstdout: {self.stdout!r}\n"
                                     f"stderr: {self.stderr!r}")
            time.sleep(0.02)

    def conversations(self) -> list[str]:
        return re.findall(r"\[conversation (conv_\w+)\]", self.stderr)


def _collect(stream: IO[str], sink: list[str]) -> None:
    while chunk := stream.read(1):
        sink.append(chunk)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "20"}
    with start_server(tmp_path_factory.mktemp("chat-cli"), env) as server:
        httpx.put(server.base_url + "/agents/echoer", json={"name": "Echoer"}).raise_for_status()
        yield server


def turns(server: ServerProcess, conversation_id: str) -> list[tuple[str, str, str | None]]:
    body = httpx.get(f"{server.base_url}/conversations/{conversation_id}").json()
    return [(t["role"], t["content"], t["finish_reason"]) for t in body["turns"]]


def test_chat_streams_cancels_and_starts_over(server: ServerProcess) -> None:
    with Chat(server, "echoer") as chat:
        chat.send("hello terminal world")
        chat.wait_for(lambda: "[stop · 3 tokens" in chat.stderr, "the first answer")
        assert chat.stdout == "hello terminal world\n"
        assert "first token" in chat.stderr and "chatting with Echoer (echoer)" in chat.stderr

        # Tokens print as they arrive: part of the long answer is out while it still runs.
        chat.send(LONG)
        chat.wait_for(lambda: "w3 " in chat.stdout, "the first tokens of the long answer")
        assert "w399" not in chat.stdout
        chat.proc.send_signal(signal.SIGINT)
        chat.wait_for(lambda: "[cancelled" in chat.stderr, "the cancelled answer")
        assert chat.proc.poll() is None, "one Ctrl-C during an answer must not quit"

        chat.send("after the cancel")
        chat.wait_for(lambda: "after the cancel\n" in chat.stdout, "the next answer")
        [conversation] = chat.conversations()
        stored = turns(server, conversation)
        assert [t[0] for t in stored] == ["user", "assistant"] * 3
        assert stored[3][2] == "cancelled" and LONG.startswith(stored[3][1])
        assert 0 < len(stored[3][1]) < len(LONG)
        assert stored[5] == ("assistant", "after the cancel", "stop")

        chat.send("/new")
        chat.send("fresh start")
        chat.wait_for(lambda: len(chat.conversations()) == 2, "a second conversation")
        chat.wait_for(lambda: "fresh start\n" in chat.stdout, "the answer in it")
        assert turns(server, chat.conversations()[1])[0] == ("user", "fresh start", None)

        chat.proc.send_signal(signal.SIGINT)  # no answer running: quit
        assert chat.proc.wait(timeout=10) == 130


def test_second_ctrl_c_quits_and_conversation_continues(server: ServerProcess) -> None:
    with Chat(server, "echoer") as first:
        first.send(LONG)
        first.wait_for(lambda: "w2 " in first.stdout, "tokens")
        first.proc.send_signal(signal.SIGINT)
        # Two signals sent back to back may merge into one; send the second once the first
        # was seen (whether or not the cancel has landed yet, it quits).
        first.wait_for(lambda: "Ctrl-C again quits" in first.stderr, "the first Ctrl-C")
        first.proc.send_signal(signal.SIGINT)
        assert first.proc.wait(timeout=10) == 130
    [conversation] = first.conversations()
    deadline = time.monotonic() + 5
    while len(turns(server, conversation)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert turns(server, conversation)[1][2] == "cancelled"

    with Chat(server, "echoer", "--conversation", conversation) as again:
        again.send("continued here")
        assert again.proc.stdin is not None
        again.proc.stdin.close()  # Ctrl-D after the line: answer it, then quit
        assert again.proc.wait(timeout=20) == 0, again.stderr
        again.wait_for(lambda: "continued here\n" in again.stdout, "the answer")
        assert again.stdout == "continued here\n"
        assert f"continuing {conversation}" in again.stderr
    assert turns(server, conversation)[2:] == [("user", "continued here", None),
                                               ("assistant", "continued here", "stop")]


def test_unknown_agent_is_a_clear_error(server: ServerProcess) -> None:
    with Chat(server, "nobody") as chat:
        assert chat.proc.wait(timeout=20) == 1
        chat.wait_for(lambda: "agent 'nobody' not found" in chat.stderr, "the error")


def test_without_url_it_uses_the_configured_host_and_port(server: ServerProcess) -> None:
    # The server's own settings name where it listens; the terminal chat reads the same ones.
    port = server.base_url.rsplit(":", 1)[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMING_LLM_")}
    env.update({"STREAMING_LLM_HOST": "127.0.0.1", "STREAMING_LLM_PORT": port,
                "STREAMING_LLM_LOG_LEVEL": "warning"})
    proc = subprocess.run([sys.executable, "-m", "streaming_llm", "chat", "echoer"], cwd=ROOT,
                          env=env, input="hello port\n", capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"at http://127.0.0.1:{port}" in proc.stderr
    assert "hello port" in proc.stdout
