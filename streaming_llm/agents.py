"""Agents: stored in SQLite, mirrored to ``{agents_dir}/{id}.md``, imported back at start-up."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Annotated

import msgspec
from msgspec import Meta

from .agent_files import AgentFiles
from .errors import AgentNotFound, BadRequest, StorageUnavailable
from .ids import check_agent_id
from .storage.database import Database
from .storage.models import AgentRow
from .storage.repositories import AgentRepository

log = logging.getLogger(__name__)


class AgentIn(msgspec.Struct):
    """Body of ``PUT /agents/{id}``. ``id`` may be repeated in the body but must match the path."""

    name: Annotated[str, Meta(min_length=1, max_length=200)]
    system_prompt: Annotated[str, Meta(max_length=100_000)] = ""
    markdown_context: Annotated[str, Meta(max_length=1_000_000)] = ""
    id: str | None = None


class Agent(msgspec.Struct):
    id: str
    name: str
    system_prompt: str
    markdown_context: str
    created_at: str
    updated_at: str

    @classmethod
    def from_row(cls, row: AgentRow) -> Agent:
        return cls(row.id, row.name, row.system_prompt, row.markdown_context,
                   row.created_at, row.updated_at)


class AgentService:
    def __init__(self, db: Database, files: AgentFiles) -> None:
        self.db = db
        self.files = files
        self._write_lock = asyncio.Lock()  # one writer keeps the DB row and the file in step

    async def list(self) -> list[Agent]:
        async with self.db.session() as session:
            return [Agent.from_row(r) for r in await AgentRepository(session).list()]

    async def get(self, agent_id: str) -> Agent:
        check_agent_id(agent_id)
        async with self.db.session() as session:
            row = await AgentRepository(session).get(agent_id)
        if row is None:
            raise AgentNotFound(f"agent {agent_id!r} not found")
        return Agent.from_row(row)

    async def upsert(self, agent_id: str, body: AgentIn) -> tuple[Agent, bool]:
        check_agent_id(agent_id)
        if body.id is not None and body.id != agent_id:
            raise BadRequest(f"body id {body.id!r} does not match the path id {agent_id!r}",
                             code="id_mismatch")
        if not body.name.strip():
            raise BadRequest("name must not be blank", code="validation_error")
        async with self._write_lock, self.db.writing() as session:
            row, created = await AgentRepository(session).upsert(
                agent_id, name=body.name, system_prompt=body.system_prompt,
                markdown_context=body.markdown_context)
            # File first, commit second: if the file cannot be written nothing is stored; if the
            # commit fails (disk full) the file is put back as it was.
            previous = await asyncio.to_thread(self.files.read_bytes, agent_id)
            try:
                await asyncio.to_thread(self.files.write, agent_id, body.name,
                                        body.system_prompt, body.markdown_context)
            except OSError as exc:
                raise StorageUnavailable(
                    f"the agents directory cannot be written: {exc.strerror or exc}") from None
            try:
                await session.commit()
            except Exception:
                try:
                    await asyncio.to_thread(self.files.restore, agent_id, previous)
                except OSError as exc:
                    log.error("agent %s: could not restore its file after a failed commit: %s",
                              agent_id, exc)
                raise
            log.info("agent %s %s", agent_id, "created" if created else "updated")
            return Agent.from_row(row), created

    async def delete(self, agent_id: str) -> None:
        check_agent_id(agent_id)
        async with self._write_lock, self.db.writing() as session:
            if not await AgentRepository(session).delete(agent_id):
                raise AgentNotFound(f"agent {agent_id!r} not found")
            # File first, commit second, as in upsert: a file that cannot be removed leaves the
            # row alone (else the agent would come back from its file at the next start); a
            # failed commit puts the file back.
            previous = await asyncio.to_thread(self.files.read_bytes, agent_id)
            try:
                await asyncio.to_thread(self.files.remove, agent_id)
            except OSError as exc:
                raise StorageUnavailable(
                    f"the agent's file cannot be removed: {exc.strerror or exc}") from None
            try:
                await session.commit()
            except Exception:
                if previous is not None:
                    try:
                        await asyncio.to_thread(self.files.restore, agent_id, previous)
                    except OSError as exc:
                        log.error("agent %s: could not restore its file after a failed commit: "
                                  "%s", agent_id, exc)
                raise
            log.info("agent %s deleted", agent_id)

    async def import_files(self) -> int:
        """Import ``.md`` files that are new, or newer than their row and different from it.

        A file is held to the same field limits as ``PUT /agents/{id}`` (:class:`AgentIn`); one
        that breaks them is skipped with a warning naming the file and the field.
        """
        imported = 0
        async with self._write_lock, self.db.writing() as session:
            await asyncio.to_thread(self.files.remove_leftovers)
            found = await asyncio.to_thread(self.files.scan)
            repo = AgentRepository(session)
            for f in found:
                try:
                    msgspec.convert({"name": f.name, "system_prompt": f.system_prompt,
                                     "markdown_context": f.markdown_context}, AgentIn)
                except msgspec.ValidationError as exc:
                    log.warning("skipping agent file %s: %s", self.files.path(f.id), exc)
                    continue
                row = await repo.get(f.id)
                if row is not None:
                    same = (row.name, row.system_prompt, row.markdown_context) == (
                        f.name, f.system_prompt, f.markdown_context)
                    if same or _parse_ts(row.updated_at) >= f.mtime:
                        continue
                await repo.upsert(f.id, name=f.name, system_prompt=f.system_prompt,
                                  markdown_context=f.markdown_context)
                imported += 1
                log.info("imported agent %s from %s", f.id, self.files.path(f.id))
            await session.commit()
        return imported


def _parse_ts(value: str) -> float:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
