"""Agents: stored in the database, mirrored to ``{agents_dir}/{id}.md``, imported back at start-up."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, TypeVar

import msgspec
from msgspec import Meta
from sqlalchemy.orm import Session

from ..errors import AgentNotFound, BadRequest, InvalidTools, StorageUnavailable
from ..ids import check_agent_id
from ..storage import queries
from ..storage.database import Database
from ..storage.models import AgentRow
from ..wire import Agent, Tool
from .agent_files import AgentFiles
from .tool_calls import check_tools

T = TypeVar("T")

log = logging.getLogger(__name__)


class AgentIn(msgspec.Struct):
    """Body of ``PUT /agents/{id}``. ``id`` may be repeated in the body but must match the path."""

    name: Annotated[str, Meta(min_length=1, max_length=200)]
    system_prompt: Annotated[str, Meta(max_length=100_000)] = ""
    markdown_context: Annotated[str, Meta(max_length=1_000_000)] = ""
    id: str | None = None
    tools: list[Tool] | None = None  # offered in its socket chats; checked on PUT


def agent_of(row: AgentRow) -> Agent:
    return Agent(id=row.id, name=row.name, system_prompt=row.system_prompt,
                 markdown_context=row.markdown_context, created_at=row.created_at,
                 updated_at=row.updated_at, tools=_tools_of(row.tools))


def _tools_of(text: str | None) -> list[Tool] | None:
    return msgspec.json.decode(text, type=list[Tool]) if text else None


class AgentService:
    """Agents in the database, each mirrored to a file.

    A write runs on the database's writer queue (:meth:`Database.write`) with its file: the file
    is written after the row and before the commit, so if the file cannot be written nothing is
    stored, and if the commit fails (disk full) the file is put back as it was. On PostgreSQL the
    row lock that :func:`~.storage.queries.upsert_agent` takes keeps two writers of one agent
    in step.
    """

    def __init__(self, db: Database, files: AgentFiles, *, max_tools: int = 64,
                 max_tool_bytes: int = 65_536) -> None:
        self.db = db
        self.files = files
        self.max_tools, self.max_tool_bytes = max_tools, max_tool_bytes

    def _tools_json(self, tools: list[Tool] | None) -> str | None:
        """The stored form of an agent's tools (None for none), checked like a request's."""
        if not tools:
            return None
        try:
            check_tools([msgspec.structs.asdict(t) for t in tools], max_tools=self.max_tools,
                        max_bytes=self.max_tool_bytes)
        except InvalidTools as exc:
            raise BadRequest(f"{exc.param}: {exc.message}", code=exc.code) from None
        return msgspec.json.encode(tools).decode()

    async def tools(self, agent_id: str) -> tuple[dict[str, object], ...]:
        """The tools the agent offers, in the engine's shape; none for an unknown agent (the
        turn then fails with ``agent_not_found`` where it always does)."""
        row = await self.db.read(lambda session: queries.get_agent(session, agent_id))
        tools = _tools_of(row.tools) if row is not None else None
        return tuple(msgspec.structs.asdict(t) for t in tools or ())

    async def list(self) -> list[Agent]:
        return [agent_of(r) for r in await self.db.read(queries.list_agents)]

    async def get(self, agent_id: str) -> Agent:
        check_agent_id(agent_id)
        row = await self.db.read(lambda session: queries.get_agent(session, agent_id))
        if row is None:
            raise AgentNotFound(f"agent {agent_id!r} not found")
        return agent_of(row)

    async def upsert(self, agent_id: str, body: AgentIn) -> tuple[Agent, bool]:
        check_agent_id(agent_id)
        if body.id is not None and body.id != agent_id:
            raise BadRequest(f"body id {body.id!r} does not match the path id {agent_id!r}",
                             code="id_mismatch")
        if not body.name.strip():
            raise BadRequest("name must not be blank", code="validation_error")
        tools = self._tools_json(body.tools)
        row, created = await self._commit_with_file(
            agent_id,
            lambda session: queries.upsert_agent(
                session, agent_id, name=body.name, system_prompt=body.system_prompt,
                markdown_context=body.markdown_context, tools=tools),
            lambda: self.files.write(agent_id, body.name, body.system_prompt,
                                     body.markdown_context, tools),
            "the agents directory cannot be written")
        log.info("agent %s %s", agent_id, "created" if created else "updated")
        return agent_of(row), created

    async def delete(self, agent_id: str) -> None:
        check_agent_id(agent_id)
        # A file that cannot be removed leaves the row alone (else the agent would come back
        # from its file at the next start).
        found = await self._commit_with_file(
            agent_id, lambda session: queries.delete_agent(session, agent_id),
            lambda: self.files.remove(agent_id), "the agent's file cannot be removed")
        if not found:
            raise AgentNotFound(f"agent {agent_id!r} not found")
        log.info("agent %s deleted", agent_id)

    async def _commit_with_file(self, agent_id: str, change_row: Callable[[Session], T],
                                change_file: Callable[[], None], cannot: str) -> T:
        """One write to an agent's row and its file, kept in step: ``change_row`` in a
        transaction on the writer queue, then ``change_file`` before the commit. A file that
        cannot change fails the write (``StorageUnavailable``, the row stays as it was); a commit
        that fails after the file changed puts the file back. A falsy ``change_row`` result
        (nothing to change, e.g. no such row) leaves the file alone."""
        previous: list[bytes | None] = []  # the file before the change, once it was changed

        def work(session: Session) -> T:  # on the writer queue
            result = change_row(session)
            if not result:
                return result
            before = self.files.read_bytes(agent_id)
            try:
                change_file()
            except OSError as exc:
                raise StorageUnavailable(f"{cannot}: {exc.strerror or exc}") from None
            previous.append(before)
            return result

        try:
            return await self.db.write(work)
        except Exception:
            if previous:  # the file changed, the commit failed
                try:
                    await asyncio.to_thread(self.files.restore, agent_id, previous[0])
                except OSError as exc:
                    log.error("agent %s: could not restore its file after a failed commit: %s",
                              agent_id, exc)
            raise

    async def import_files(self) -> int:
        """Import ``.md`` files that are new, or newer than their row and different from it.

        A file is held to the same field limits as ``PUT /agents/{id}`` (:class:`AgentIn`); one
        that breaks them is skipped with a warning naming the file and the field.
        """

        def store(session: Session) -> list[str]:  # one transaction, on the writer queue
            self.files.remove_leftovers()
            imported = []
            for f in self.files.scan():
                try:
                    agent = msgspec.convert({"name": f.name, "system_prompt": f.system_prompt,
                                             "markdown_context": f.markdown_context}, AgentIn)
                    agent.tools = (msgspec.json.decode(f.tools, type=list[Tool])
                                   if f.tools else None)
                    tools = self._tools_json(agent.tools)
                except (msgspec.ValidationError, msgspec.DecodeError, BadRequest) as exc:
                    reason = exc.message if isinstance(exc, BadRequest) else exc
                    log.warning("skipping agent file %s: %s", self.files.path(f.id), reason)
                    continue
                row = queries.get_agent(session, f.id)
                if row is not None:
                    same = (row.name, row.system_prompt, row.markdown_context, row.tools) == (
                        f.name, f.system_prompt, f.markdown_context, tools)
                    if same or _parse_ts(row.updated_at) >= f.mtime:
                        continue
                queries.upsert_agent(session, f.id, name=f.name, system_prompt=f.system_prompt,
                                     markdown_context=f.markdown_context, tools=tools)
                imported.append(f.id)
            return imported

        imported = await self.db.write(store)
        for agent_id in imported:
            log.info("imported agent %s from %s", agent_id, self.files.path(agent_id))
        return len(imported)


def _parse_ts(value: str) -> float:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
