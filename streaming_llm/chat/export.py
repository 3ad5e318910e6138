"""Conversation export: a readable Markdown transcript, or loss-free JSON.

Used by ``GET /conversations/{id}/export``, by ``streaming-llm export``, and, when
``STREAMING_LLM_TRANSCRIPTS_DIR`` is set, by :class:`TranscriptsDir`, which rewrites
``<dir>/<conversation id>.md`` after every stored answer (atomically: temp file + ``os.replace``,
so a reader never sees half a transcript).

The JSON form holds every stored column of the conversation and its turns (but the case-folded
copies kept for search, derived from the title and contents), plus the agent as it is at export
time (``null`` once deleted), so nothing in the database is lost.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Literal

import msgspec
from sqlalchemy.orm import Session

from ..engines.base import ToolCall
from ..errors import BadRequest, ConversationNotFound, ServiceError
from ..files import write_atomically
from ..ids import check_conversation_id
from ..settings import Settings
from ..storage import queries
from ..storage.database import Database
from ..storage.models import AgentRow, ConversationRow, TurnRow, utcnow
from ..wire import Agent
from .agents import agent_of
from .tool_calls import calls_from_json

log = logging.getLogger(__name__)

Format = Literal["markdown", "json"]
FORMATS: tuple[Format, ...] = ("markdown", "json")
SUFFIX = {"markdown": ".md", "json": ".json"}
MEDIA_TYPE = {"markdown": "text/markdown; charset=utf-8", "json": "application/json"}


class ExportedTurn(msgspec.Struct):
    id: str
    seq: int
    role: str
    content: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    usage: dict[str, object] | None
    request_id: str | None
    created_at: str
    tool_calls: list[ToolCall] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers
    agent_id: str | None = None  # who spoke an answer (rooms); None for the user's turns


class ConversationExport(msgspec.Struct):
    """``GET /conversations/{id}/export?format=json``: everything stored about a conversation."""

    id: str
    agent_id: str
    title: str
    created_at: str
    updated_at: str
    agent: Agent | None  # the agent as it is now; None when it was deleted
    turns: list[ExportedTurn]
    exported_at: str
    format_version: int = 1
    agent_ids: list[str] = []  # the participants: one, or several in a room
    agent_names: dict[str, str] = {}  # participants' and speakers' names now (deleted: absent)


def check_format(value: str) -> Format:
    if value not in FORMATS:
        raise BadRequest(f"unknown export format {value!r}: use markdown or json",
                         code="invalid_format")
    return value  # type: ignore[return-value]


class Exporter:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def load(self, conversation_id: str) -> ConversationExport:
        check_conversation_id(conversation_id)

        def load(session: Session) -> tuple[ConversationRow, AgentRow | None, list[TurnRow],
                                            list[str], dict[str, str]]:
            row = queries.get_conversation(session, conversation_id)
            if row is None:
                raise ConversationNotFound(f"conversation {conversation_id!r} not found")
            turns = queries.list_turns(session, conversation_id)
            participants = queries.list_participants(session, conversation_id) or [row.agent_id]
            names = {}
            for agent_id in dict.fromkeys([*participants, *(t.agent_id for t in turns
                                                             if t.agent_id)]):
                if (found := queries.get_agent(session, agent_id)) is not None:
                    names[agent_id] = found.name
            return (row, queries.get_agent(session, row.agent_id), turns, participants, names)

        row, agent, turns, participants, names = await self.db.read(load)
        exported = [_turn(t) for t in turns]
        if exported and exported[-1].role == "user":
            # Its answer is still streaming: the request id would let a reader resume the live
            # turn (a resume needs only the id without API keys). Shown once the answer is stored.
            exported[-1].request_id = None
        return ConversationExport(
            id=row.id, agent_id=row.agent_id, title=row.title, created_at=row.created_at,
            updated_at=row.updated_at, agent=None if agent is None else agent_of(agent),
            turns=exported, exported_at=utcnow(), agent_ids=participants, agent_names=names)

    async def conversation_ids(self) -> list[str]:
        """Every conversation, most recently active first."""

        def load(session: Session) -> list[str]:
            return [row.id for row in queries.list_conversations(session, limit=None)]

        return await self.db.read(load)

    async def render(self, conversation_id: str, fmt: Format) -> bytes:
        export = await self.load(conversation_id)
        return render_json(export) if fmt == "json" else render_markdown(export).encode()


def _turn(row: TurnRow) -> ExportedTurn:
    usage = msgspec.json.decode(row.usage) if row.usage else None
    return ExportedTurn(row.id, row.seq, row.role, row.content, row.finish_reason,
                        row.prompt_tokens, row.completion_tokens, usage, row.request_id,
                        row.created_at, list(calls_from_json(row.tool_calls)) or None,
                        row.tool_call_id, row.agent_id)


# --- rendering ----------------------------------------------------------------------------------
def render_json(export: ConversationExport) -> bytes:
    return msgspec.json.format(msgspec.json.encode(export), indent=2) + b"\n"


def render_markdown(export: ConversationExport) -> str:
    """A transcript for people: a header naming the agent and the times, then one section per
    turn headed by its speaker and time; answers that did not end normally say how they ended."""
    agent_name = _one_line(export.agent.name) if export.agent else export.agent_id
    agent = (f"{agent_name} (`{export.agent_id}`)" if export.agent
             else f"`{export.agent_id}` (deleted)")
    room = len(export.agent_ids) > 1

    def named(agent_id: str) -> str:
        name = export.agent_names.get(agent_id)
        return _one_line(name) if name is not None else agent_id

    def listed(agent_id: str) -> str:
        return (f"{named(agent_id)} (`{agent_id}`)" if agent_id in export.agent_names
                else f"`{agent_id}` (deleted)")

    lines = [
        f"# {_one_line(export.title) or 'Conversation'}",
        "",
        f"- Conversation: `{export.id}`",
        f"- Agents: {', '.join(listed(a) for a in export.agent_ids)}" if room
        else f"- Agent: {agent}",
        f"- Started: {_time(export.created_at)}",
        f"- Last activity: {_time(export.updated_at)}",
        f"- Turns: {len(export.turns)}",
    ]
    for turn in export.turns:
        speaker = ("User" if turn.role == "user" else "Tool result" if turn.role == "tool"
                   else named(turn.agent_id) if turn.agent_id not in (None, export.agent_id)
                   else agent_name)
        lines += ["", "---", "", f"### {speaker} · {_time(turn.created_at)}", ""]
        if turn.tool_call_id is not None:
            lines += [f"For call `{turn.tool_call_id}`:", ""]
        lines.append(turn.content)
        for call in turn.tool_calls or ():
            lines += ["", f"Calls **{_one_line(call.name)}** (`{call.id}`):", "", "```json",
                      call.arguments.replace("```", "` ` `"), "```"]
        if turn.role == "assistant":
            lines += ["", f"*{_outcome(turn)}*"]
    return "\n".join(lines) + "\n"


def _one_line(text: str) -> str:
    """``text`` with every run of whitespace (line breaks included) as one space: a title or a
    name set through the API may hold newlines, which in a heading would start lines of their
    own (a forged ``### User`` turn, a horizontal rule)."""
    return " ".join(text.split())


def _time(iso: str) -> str:
    try:
        return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return iso


def _outcome(turn: ExportedTurn) -> str:
    reason = turn.finish_reason or "unknown"
    parts = {"stop": ["finished"], "length": ["cut at the token limit"],
             "cancelled": ["cancelled"], "error": ["failed (engine error)"]}.get(reason, [reason])
    usage = turn.usage or {}
    if turn.completion_tokens is not None:
        parts.append(f"{turn.completion_tokens} tokens")
    if isinstance(ttft := usage.get("time_to_first_token_ms"), int | float):
        parts.append(f"first token after {ttft:.0f} ms")
    if isinstance(rate := usage.get("decode_tokens_per_s"), int | float):
        parts.append(f"{rate:.1f} tokens/s")
    return " · ".join(parts)


# --- files --------------------------------------------------------------------------------------
class TranscriptsDir:
    """Keeps ``<directory>/<conversation id>.md`` in step with the database.

    Updates of one conversation are serialized (each reads the database after the previous
    wrote its file), so an older transcript never replaces a newer one. A failure is logged,
    never raised: a full disk must not break chat.
    """

    def __init__(self, directory: Path, exporter: Exporter) -> None:
        self.directory = directory
        self.exporter = exporter
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def path(self, conversation_id: str) -> Path:
        return self.directory / f"{conversation_id}.md"

    async def update(self, conversation_id: str) -> None:
        lock = self._locks[conversation_id]
        try:
            async with lock:
                text = render_markdown(await self.exporter.load(conversation_id))
                await asyncio.to_thread(write_atomically, self.path(conversation_id),
                                        text.encode())
        except Exception:
            log.warning("could not update the transcript of %s", conversation_id, exc_info=True)
        finally:
            if not lock.locked():
                self._locks.pop(conversation_id, None)

    async def remove(self, conversation_id: str) -> None:
        await asyncio.to_thread(self.path(conversation_id).unlink, missing_ok=True)


# --- command line -------------------------------------------------------------------------------
async def export_files(db: Database, *, conversation_id: str | None, fmt: Format,
                       out: Path | None) -> int:
    """``streaming-llm export``: one conversation or all, to files in ``out`` or to stdout.

    To stdout, several Markdown transcripts are separated by a rule; several JSON exports form
    one JSON array. Returns the number of conversations written.
    """
    exporter = Exporter(db)
    ids = [conversation_id] if conversation_id else await exporter.conversation_ids()
    if out is not None:
        for cid in ids:
            data = await exporter.render(cid, fmt)
            await asyncio.to_thread(write_atomically, out / f"{cid}{SUFFIX[fmt]}", data)
        return len(ids)
    if fmt == "json":
        exports = [await exporter.load(cid) for cid in ids]
        data = render_json(exports[0]) if conversation_id else (
            msgspec.json.format(msgspec.json.encode(exports), indent=2) + b"\n")
    else:
        texts = [render_markdown(await exporter.load(cid)) for cid in ids]
        data = "\n---\n\n".join(texts).encode()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return len(ids)


def run_export(settings: Settings, *, conversation_id: str | None, fmt: Format,
               out: Path | None) -> int:
    """The ``export`` command: exit status 0, or 1 with a message when nothing could be done."""

    async def main() -> int:
        db = Database(settings.resolved_database_url, settings.db_busy_timeout_ms)
        try:
            await db.migrate()
            count = await export_files(db, conversation_id=conversation_id, fmt=fmt, out=out)
        except ServiceError as exc:
            print(f"streaming-llm export: {exc.message}", file=sys.stderr)
            return 1
        finally:
            await db.close()
        if out is not None:
            print(f"exported {count} conversation(s) to {out}", file=sys.stderr)
        return 0

    return asyncio.run(main())
