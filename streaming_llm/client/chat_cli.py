"""``streaming-llm chat AGENT``: a terminal chat over the socket, built on :mod:`.client`.

Each line typed is a turn; the answer's tokens print as they arrive. Ctrl-C during an answer
cancels it (the partial answer is stored as ``cancelled``); Ctrl-C with no answer running, or a
second one before the first took effect, quits, as do Ctrl-D and ``/quit``. ``/new`` starts a
new conversation; ``--conversation ID`` continues a stored one. Answers go to standard output,
everything else (conversation ids, usage, errors) to standard error, so the output can be piped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import threading
from typing import Any, TextIO

from ..protocol import Start, Token
from .api import ApiError, ChatError, ChatEvent, ChatResult, ChatStream, get_agent, stream_chat

EXIT_INTERRUPTED = 130  # the shell's convention for "ended by SIGINT"
FATAL = ("socket_closed", "socket_open_failed", "stopped")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("agent", help="the agent to chat with")
    parser.add_argument("--url", help="the server (default: http://<STREAMING_LLM_HOST>:<PORT>)")
    parser.add_argument("--conversation", metavar="ID", help="continue this conversation")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--api-key", help="sent as a bearer token")


class TerminalChat:
    def __init__(self, url: str, agent_id: str, *, options: dict[str, Any],
                 conversation_id: str | None, api_key: str | None,
                 out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.url, self.agent_id, self.options = url, agent_id, options
        self.conversation_id = conversation_id
        self.api_key = api_key
        self.out, self.err = out, err
        self.chat: ChatStream | None = None
        self.answering: asyncio.Task[ChatResult] | None = None
        self.cancelling = False
        self.quit = asyncio.Event()
        self.interrupted = False

    def note(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()

    # events -------------------------------------------------------------------------------------
    def on_event(self, event: ChatEvent) -> None:
        if isinstance(event, Token):
            self.out.write(event.token)
            self.out.flush()
        elif isinstance(event, Start) and event.conversation_id != self.conversation_id:
            self.conversation_id = event.conversation_id
            self.note(f"[conversation {event.conversation_id}]")

    def interrupt(self) -> None:
        """SIGINT: cancel the running answer; if none is running (or it already was), quit."""
        if self.answering is not None and not self.answering.done() and not self.cancelling:
            self.cancelling = True
            self.note("\n[Ctrl-C: cancelling the answer; Ctrl-C again quits]")
            assert self.chat is not None
            asyncio.get_running_loop().create_task(self.chat.cancel())
        else:
            self.interrupted = True
            self.quit.set()

    # the loop -----------------------------------------------------------------------------------
    async def connect(self, conversation_id: str | None) -> None:
        if self.chat is not None:
            await self.chat.close()
        self.chat = stream_chat(self.url, self.agent_id, options=self.options or None,
                                conversation_id=conversation_id, on_event=self.on_event,
                                api_key=self.api_key)
        await self.chat.open()

    async def run(self) -> int:
        try:
            agent = await get_agent(self.agent_id, self.url, api_key=self.api_key)
        except ApiError as exc:
            self.note(f"streaming-llm chat: {exc.message}")
            return 1
        loop = asyncio.get_running_loop()
        lines = _stdin_lines(loop)
        loop.add_signal_handler(signal.SIGINT, self.interrupt)
        try:
            await self.connect(self.conversation_id)
            self.note(f"chatting with {agent.name} ({agent.id}) at {self.url}"
                      + (f", continuing {self.conversation_id}" if self.conversation_id else "")
                      + ". Ctrl-C cancels an answer, Ctrl-C again or Ctrl-D quits, /new starts over.")
            while True:
                self.prompt()
                line = await self.until_quit(lines.get())
                if line is None or line.strip() in ("/quit", "/exit"):
                    break
                text = line.strip()
                if not text:
                    continue
                if text == "/new":
                    self.conversation_id = None
                    await self.connect(None)
                    self.note("[new conversation: it starts with your next message]")
                    continue
                if not await self.answer(text):
                    return 1
        except ChatError as exc:
            self.note(f"streaming-llm chat: {exc.message}")
            return 1
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            if self.chat is not None:
                await self.chat.close()
        return EXIT_INTERRUPTED if self.interrupted else 0

    def prompt(self) -> None:
        if sys.stdin.isatty():
            self.out.write("> ")
            self.out.flush()

    async def until_quit(self, waiting: Any) -> Any:
        """The awaitable's result, or None when the user quits first."""
        task = asyncio.ensure_future(waiting)
        quitting = asyncio.ensure_future(self.quit.wait())
        await asyncio.wait({task, quitting}, return_when=asyncio.FIRST_COMPLETED)
        quitting.cancel()
        if task.done():
            return task.result()
        task.cancel()
        return None

    async def answer(self, text: str) -> bool:
        """One turn; False when the stream is gone."""
        assert self.chat is not None
        self.cancelling = False
        self.answering = asyncio.ensure_future(self.chat.send_message(text))
        try:
            await self.until_quit(asyncio.shield(self.answering))
            if not self.answering.done():
                return True  # quitting; closing the stream stops the answer
            result = self.answering.result()
        except ChatError as exc:
            self.out.write("\n")
            self.note(f"[error {exc.code}: {exc.message}]")
            return exc.code not in FATAL
        finally:
            self.answering.add_done_callback(_retrieve)
        self.out.write("\n")
        self.out.flush()
        self.note(f"[{_summary(result)}]")
        return True


def _summary(result: ChatResult) -> str:
    usage = result.usage
    parts = [result.finish_reason, f"{usage.completion_tokens} tokens"]
    if usage.time_to_first_token_ms is not None:
        parts.append(f"first token {usage.time_to_first_token_ms:.0f} ms")
    if usage.decode_tokens_per_s is not None:
        parts.append(f"{usage.decode_tokens_per_s:.1f} tokens/s")
    return " · ".join(parts)


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" at exit


def _stdin_lines(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[str | None]:
    """Lines of standard input from a daemon thread (works for terminals, pipes and files, and
    never keeps the process alive); None at end of input."""
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def put(item: str | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop already closed: we are exiting
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def read() -> None:
        while line := sys.stdin.readline():
            put(line.rstrip("\n"))
        put(None)

    threading.Thread(target=read, name="stdin", daemon=True).start()
    return queue


def run(args: argparse.Namespace, default_url: str) -> int:
    options = {k: v for k, v in (("temperature", args.temperature),
                                 ("max_new_tokens", args.max_new_tokens)) if v is not None}
    chat = TerminalChat(args.url or default_url, args.agent, options=options,
                        conversation_id=args.conversation, api_key=args.api_key)
    try:
        return asyncio.run(chat.run())
    except ValueError as exc:  # bad options
        print(f"streaming-llm chat: {exc}", file=sys.stderr)
        return 2
