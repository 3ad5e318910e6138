"""The Python client (``streaming_llm.client``) against a real server process (echo engine)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import httpx
import pytest

from streaming_llm.client import (
    Agent,
    ApiError,
    ChatError,
    ChatEvent,
    Resumed,
    Tool,
    ToolCall,
    conversation_url,
    create_room,
    delete_agent,
    get_agent,
    list_agents,
    socket_url,
    stream_chat,
    update_agent,
    update_room,
)
from streaming_llm.protocol import Done, Start, Token

from .server import ServerProcess, free_port, start_server

LONG = " ".join(f"w{i}" for i in range(300))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "5"}
    with start_server(tmp_path_factory.mktemp("client"), env) as server:
        httpx.put(server.base_url + "/agents/echoer", json={"name": "Echoer"}).raise_for_status()
        yield server


async def test_agents_over_rest(server: ServerProcess) -> None:
    url = server.base_url
    stored = await update_agent(Agent(id="writer", name="Writer", system_prompt="Write."), url)
    assert (stored.id, stored.name, stored.system_prompt) == ("writer", "Writer", "Write.")
    assert stored.created_at is not None
    assert (await get_agent("writer", url)).system_prompt == "Write."
    assert "writer" in [a.id for a in await list_agents(url)]
    await delete_agent("writer", url)
    with pytest.raises(ApiError) as info:
        await get_agent("writer", url)
    assert (info.value.status, info.value.code) == (404, "agent_not_found")
    with pytest.raises(ApiError) as info:
        await get_agent("Bad Id", url)
    assert (info.value.status, info.value.code) == (400, "invalid_id")
    with pytest.raises(ApiError) as info:
        await list_agents(f"http://127.0.0.1:{free_port()}")
    assert (info.value.status, info.value.code) == (0, "network_error")


async def test_turns_continue_one_conversation_with_timings(server: ServerProcess) -> None:
    seen: list[ChatEvent] = []
    async with stream_chat(server.base_url, "echoer", on_event=seen.append) as chat:
        events = chat.events()
        first = await chat.send_message("hello from python")
        assert first.text == "hello from python" and first.finish_reason == "stop"
        assert chat.conversation_id == first.conversation_id
        assert first.usage.completion_tokens == 3
        assert first.usage.time_to_first_token_ms is not None
        assert first.usage.time_to_first_token_ms > 0
        assert first.usage.decode_tokens_per_s is not None
        # Two turns sent at once run in order, both in the same conversation.
        second, third = await asyncio.gather(chat.send_message("two"),
                                             chat.send_message("three"))
        assert (second.text, third.text) == ("two", "three")
        assert {second.conversation_id, third.conversation_id} == {first.conversation_id}
        collected = []
        async for event in events:
            collected.append(event)
            if isinstance(event, Done) and event.request_id == third.request_id:
                break
    assert collected == seen
    kinds = [type(e) for e in collected if e.request_id == first.request_id]
    assert kinds == [Start, Token, Token, Token, Done]
    tokens = [e for e in collected if isinstance(e, Token) and e.request_id == first.request_id]
    assert [t.seq for t in tokens] == [0, 1, 2]
    turns = httpx.get(f"{server.base_url}/conversations/{first.conversation_id}").json()["turns"]
    assert [t["content"] for t in turns[::2]] == ["hello from python", "two", "three"]

    # A new stream can continue the same conversation.
    async with stream_chat(server.ws_url, "echoer",
                           conversation_id=first.conversation_id) as chat:
        # ... opened with the id in its URL, which a sticky proxy routes by (deploy/nginx).
        assert chat.url == f"{server.ws_url}?conversation_id={first.conversation_id}"
        fourth = await chat.send_message("four")
    assert fourth.conversation_id == first.conversation_id


async def test_tool_calls_and_results(server: ServerProcess) -> None:
    """The echo engine repeats the user's words, so a message holding a call is answered with it."""
    url = server.base_url
    weather = Tool(name="get_weather", parameters={"type": "object"})
    await update_agent(Agent(id="caller", name="Caller", tools=[weather]), url)
    assert (await get_agent("caller", url)).tools == [weather]
    call_text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    async with stream_chat(url, "caller") as chat:  # the agent's own tools
        result = await chat.send_message(call_text)
        [call] = result.tool_calls
        assert isinstance(call, ToolCall) and call.name == "get_weather"
        assert call.arguments == '{"city": "Oslo"}' and result.text == call_text
        answer = await chat.send_message(
            "", tool_results=[{"tool_call_id": call.id, "content": "snow"}])
        assert answer.text == "snow" and answer.tool_calls == []
        with pytest.raises(ChatError) as info:
            await chat.send_message("", tool_results=[{"tool_call_id": call.id, "content": "x"}])
        assert info.value.code == "unknown_tool_call"
    async with stream_chat(url, "echoer") as chat:  # a turn's own tools
        result = await chat.send_message(call_text, tools=[{"type": "function", "function": {
            "name": "get_weather"}}], tool_choice="required")
        assert [c.name for c in result.tool_calls] == ["get_weather"]
        assert (await chat.send_message(call_text, tool_choice="none")).tool_calls == []


async def test_options_defaults_and_overrides(server: ServerProcess) -> None:
    async with stream_chat(server.base_url, "echoer", options={"max_new_tokens": 2}) as chat:
        assert (await chat.send_message("a b c d")).text == "a b "
        result = await chat.send_message("a b c d", options={"max_new_tokens": 3})
        assert (result.text, result.finish_reason) == ("a b c ", "length")
        with pytest.raises(ValueError, match="temperature"):
            await chat.send_message("x", options={"temperature": 5})
    with pytest.raises(ValueError, match="unknown field"):
        stream_chat(server.base_url, "echoer", options={"temprature": 1})


async def test_cancel_stops_the_answer(server: ServerProcess) -> None:
    async with stream_chat(server.base_url, "echoer") as chat:
        events = chat.events()
        answer = asyncio.create_task(chat.send_message(LONG))
        async for event in events:
            if isinstance(event, Token):
                await chat.cancel()
                break
        result = await asyncio.wait_for(answer, 10)
        assert result.finish_reason == "cancelled"
        assert 0 < len(result.text) < len(LONG) and LONG.startswith(result.text)
        # The socket is still usable.
        assert (await chat.send_message("still here")).text == "still here"


async def test_errors_reject_the_turn(server: ServerProcess) -> None:
    async with stream_chat(server.base_url, "nobody") as chat:
        with pytest.raises(ChatError) as info:
            await chat.send_message("hi")
        assert info.value.code == "agent_not_found"

    chat = await stream_chat(server.base_url, "echoer").open()
    events = chat.events()
    pending = asyncio.create_task(chat.send_message(LONG))
    async for event in events:  # the turn is under way: close it mid-answer
        if isinstance(event, Token):
            break
    await chat.close()
    with pytest.raises(ChatError) as info:
        await pending
    assert info.value.code == "stopped"
    with pytest.raises(ChatError):
        await chat.send_message("after close")

    with pytest.raises(ChatError) as info:
        await stream_chat(f"http://127.0.0.1:{free_port()}", "echoer").open()
    assert info.value.code == "socket_open_failed"


def test_socket_url() -> None:
    assert socket_url("http://h:1") == "ws://h:1/ws/chat"
    assert socket_url("https://h/") == "wss://h/ws/chat"
    assert socket_url("ws://h:1/ws/chat") == "ws://h:1/ws/chat"
    assert socket_url("http://h/prefix/ws/chat") == "ws://h/prefix/ws/chat"
    with pytest.raises(ValueError):
        socket_url("ftp://h")


class CuttingProxy:
    """A TCP proxy in front of the server that drops its first connection (both ways, a reset)
    once ``cut_after`` bytes came down it: the client's socket dies mid-answer."""

    def __init__(self, port: int, cut_after: int) -> None:
        self.port, self.cut_after = port, cut_after
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []  # closed on exit, inside the loop

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        # Close every stream while the loop runs: one left to the garbage collector after the
        # loop closed warns (ResourceWarning), which fails whichever test is running then.
        for writer in self.writers:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for w in self.writers), return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        limit = self.cut_after if self.connections == 1 else None
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       budget: int | None) -> None:
            moved = 0
            while chunk := await src.read(256):
                dst.write(chunk)
                moved += len(chunk)
                if budget is not None and moved >= budget:
                    writer.transport.abort()
                    up_writer.transport.abort()
                    return
                await dst.drain()
            dst.close()

        with contextlib.suppress(OSError):
            await asyncio.gather(pipe(reader, up_writer, None), pipe(up_reader, writer, limit))


async def test_a_dropped_socket_reconnects_and_resumes_the_answer(server: ServerProcess) -> None:
    seen: list[ChatEvent] = []
    async with CuttingProxy(server.port, cut_after=900) as url:
        async with stream_chat(url, "echoer", on_event=seen.append) as chat:
            result = await chat.send_message(LONG)
            again = await chat.send_message("and on the new socket")
    resumed = [e for e in seen if isinstance(e, Resumed)]
    assert len(resumed) == 1 and resumed[0].request_id == result.request_id
    assert resumed[0].after_seq < 299  # cut before the end
    assert result.text == LONG and result.finish_reason == "stop"
    tokens = [e for e in seen if isinstance(e, Token) and e.request_id == result.request_id]
    assert [t.seq for t in tokens] == [sum(t.count for t in tokens[:i])  # none repeated or missing
                                       for i in range(len(tokens))]
    assert again.text == "and on the new socket"
    assert again.conversation_id == result.conversation_id


def test_conversation_url_keeps_the_query() -> None:
    assert conversation_url("ws://h/ws/chat", "c_1") == "ws://h/ws/chat?conversation_id=c_1"
    assert (conversation_url("ws://h/ws/chat?token=k&conversation_id=old", "c 2")
            == "ws://h/ws/chat?token=k&conversation_id=c+2")


async def test_a_room_answers_one_agent_or_a_round(server: ServerProcess) -> None:
    url = server.base_url
    for agent_id in ("coder", "reviewer"):
        await update_agent(Agent(id=agent_id, name=agent_id.title()), url)
    room = await create_room(["coder", "reviewer"], url, title="Fix")
    assert room.agent_ids == ["coder", "reviewer"] and room.title == "Fix"
    events: list[ChatEvent] = []
    async with stream_chat(url, "", conversation_id=room.id, on_event=events.append) as chat:
        one = await chat.send_message("hello coder", agent_id="coder")
        assert (one.agent_id, one.text) == ("coder", "hello coder")
        # The echo engine repeats the last message it sees: the reviewer sees the coder's answer.
        first, second = await chat.send_round("check it", ["coder", "reviewer"])
        assert (first.agent_id, first.text) == ("coder", "check it")
        assert (second.agent_id, second.text) == ("reviewer", "[Coder]: check it")
        mentioned = await chat.send_message("@reviewer again?")
        assert mentioned.agent_id == "reviewer"
        with pytest.raises(ChatError) as info:
            await chat.send_message("hi", agent_id="echoer")
        assert info.value.code == "agent_not_in_conversation"
    round_tokens = [e for e in events if isinstance(e, Token) and e.request_id == first.request_id]
    assert {e.agent_id for e in round_tokens} == {"coder", "reviewer"}
    assert [e.agent_id for e in events if isinstance(e, Done)] == [
        "coder", "coder", "reviewer", "reviewer"]
    changed = await update_room(room.id, url, agent_ids=["reviewer"])
    assert changed.agent_ids == ["reviewer"]
    with pytest.raises(ApiError) as failed:
        await create_room(["coder", "nobody"], url)
    assert (failed.value.status, failed.value.code) == (404, "agent_not_found")
