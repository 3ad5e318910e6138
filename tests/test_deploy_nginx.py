"""``deploy/nginx/streaming-llm.conf`` for real: nginx in front of two instances sharing one
PostgreSQL database routes every turn of a conversation that names itself (``?conversation_id=``)
to one instance, and the conversations are stored whole."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from .conftest import database_env
from .database import fetch
from .server import ROOT, free_port, http, start_server, wait_healthy

pytestmark = pytest.mark.e2e
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"  # `make test` installs it (Debian's nginx)


def nginx_in_front(tmp: Path, ports: tuple[int, int]) -> tuple[Path, int]:
    """The deploy example with its two servers and its listen address pointed at this test;
    nginx's own access log records which instance took each request."""
    site = (ROOT / "deploy" / "nginx" / "streaming-llm.conf").read_text()
    port = free_port()
    for old, new in (("10.0.0.11:8000", f"127.0.0.1:{ports[0]}"),
                     ("10.0.0.12:8000", f"127.0.0.1:{ports[1]}"),
                     ("listen 80;", f"listen 127.0.0.1:{port};")):
        assert old in site
        site = site.replace(old, new)
    (tmp / "logs").mkdir(parents=True)
    (tmp / "site.conf").write_text(site)
    conf = tmp / "nginx.conf"
    conf.write_text(f"""pid {tmp}/nginx.pid;
error_log {tmp}/logs/error.log;
events {{}}
http {{
    log_format upstream '$arg_conversation_id $upstream_addr $status';
    access_log {tmp}/logs/access.log upstream;
    include {tmp}/site.conf;
}}
""")
    return conf, port


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_nginx_sends_a_conversation_to_one_instance(tmp_path: Path, database_url: str) -> None:
    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "1",
           **database_env(database_url)}
    with start_server(tmp_path / "a", env, wait=False) as a, \
            start_server(tmp_path / "b", env, wait=False) as b:
        for server in (a, b):
            wait_healthy(server.base_url, server.proc, 120, server.log_path)
        conf, port = nginx_in_front(tmp_path / "nginx", (a.port, b.port))
        subprocess.run([NGINX, "-p", str(conf.parent), "-c", str(conf)], check=True, timeout=30)
        try:
            base = f"http://127.0.0.1:{port}"
            assert http("PUT", base + "/agents/echoer", {"name": "Echoer"})[0] == 201
            conversations: dict[str, list[str]] = {}
            for c in range(6):
                conversation: str | None = None
                for t in range(4):
                    message = f"conversation {c} turn {t}"
                    query = f"?conversation_id={conversation}" if conversation else ""
                    with connect(f"ws://127.0.0.1:{port}/ws/chat{query}", open_timeout=10) as ws:
                        frame: dict[str, Any] = {"type": "chat", "agent_id": "echoer",
                                                 "message": message}
                        if conversation:
                            frame["conversation_id"] = conversation
                        ws.send(json.dumps(frame))
                        while (event := json.loads(ws.recv(timeout=30)))["type"] != "done":
                            assert event["type"] in ("start", "token"), event
                            conversation = event.get("conversation_id", conversation)
                    assert conversation is not None
                    conversations.setdefault(conversation, []).append(message)
        finally:
            subprocess.run([NGINX, "-p", str(conf.parent), "-c", str(conf), "-s", "quit"],
                           check=False, timeout=30)

    upstreams: dict[str, set[str]] = defaultdict(set)
    for line in (conf.parent / "logs" / "access.log").read_text().splitlines():
        conversation, upstream, status = line.split()
        if conversation != "-":
            assert status == "101", line  # the socket was upgraded
            upstreams[conversation].add(upstream)
    assert set(upstreams) == set(conversations)
    assert all(len(taken) == 1 for taken in upstreams.values()), upstreams
    for conversation, messages in conversations.items():
        rows = fetch(database_url, "SELECT seq, role, content FROM turns "
                                   "WHERE conversation_id = :c ORDER BY seq", c=conversation)
        assert [r["seq"] for r in rows] == list(range(8))
        assert [r["content"] for r in rows if r["role"] == "user"] == messages
