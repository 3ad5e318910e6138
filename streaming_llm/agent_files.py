"""The Markdown mirror of agents: ``{agents_dir}/{id}.md``, readable and hand-editable.

Format (front matter with JSON-quoted strings, which YAML also reads; body = Markdown context)::

    ---
    id: reviewer
    name: "Reviewer"
    system_prompt: "You review pull requests.\\nBe brief."
    ---
    # Context
    ...

Hand-written files may also use plain ``key: text`` values or YAML block scalars (``key: |``
followed by indented lines). Writes are atomic (temp file in the same directory + ``os.replace``),
so a reader never sees half a file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .files import write_atomically
from .ids import is_agent_id

log = logging.getLogger(__name__)


class MalformedAgentFile(ValueError):
    pass


@dataclass(frozen=True)
class AgentFile:
    id: str
    name: str
    system_prompt: str
    markdown_context: str
    mtime: float = 0.0


def render(agent_id: str, name: str, system_prompt: str, markdown_context: str) -> str:
    head = [
        "---",
        f"id: {agent_id}",
        f"name: {json.dumps(name, ensure_ascii=False)}",
        f"system_prompt: {json.dumps(system_prompt, ensure_ascii=False)}",
        "---",
    ]
    return "\n".join(head) + "\n" + markdown_context


def parse(text: str, *, source: str = "<text>") -> dict[str, str]:
    """Return the front-matter fields plus ``markdown_context``; raise MalformedAgentFile."""
    text = text.removeprefix("\ufeff")
    lines = text.split("\n")
    if not lines or lines[0].rstrip("\r") != "---":
        raise MalformedAgentFile(f"{source}: missing front matter (first line must be '---')")
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].rstrip("\r") == "---")
    except StopIteration:
        raise MalformedAgentFile(f"{source}: front matter is not closed with '---'") from None
    fields: dict[str, str] = {}
    i = 1
    while i < end:
        line = lines[i].rstrip("\r")
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, raw = line.partition(":")
        key, raw = key.strip(), raw.strip()
        if not sep or not key or key[0].isspace():
            raise MalformedAgentFile(f"{source}: line {i}: expected 'key: value'")
        if raw in ("|", "|-", ">", ">-"):
            block: list[str] = []
            while i < end and (lines[i].startswith((" ", "\t")) or not lines[i].strip()):
                block.append(lines[i].rstrip("\r"))
                i += 1
            indent = min((len(b) - len(b.lstrip()) for b in block if b.strip()), default=0)
            value = "\n".join(b[indent:] for b in block).rstrip("\n")
            fields[key] = value.replace("\n", " ") if raw.startswith(">") else value
        elif raw.startswith('"'):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise MalformedAgentFile(f"{source}: line {i}: bad quoted string ({exc.msg})") from None
            if not isinstance(value, str):
                raise MalformedAgentFile(f"{source}: line {i}: expected a string")
            fields[key] = value
        elif raw.startswith("'") and raw.endswith("'") and len(raw) >= 2:
            fields[key] = raw[1:-1].replace("''", "'")
        else:
            fields[key] = raw
    fields["markdown_context"] = "\n".join(lines[end + 1:])
    return fields


class AgentFiles:
    """Reads and writes the agents directory. Only validated ids ever reach a path."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, agent_id: str) -> Path:
        if not is_agent_id(agent_id):  # defence in depth: routes validate first
            raise ValueError(f"refusing path for invalid agent id {agent_id!r}")
        return self.directory / f"{agent_id}.md"

    def write(self, agent_id: str, name: str, system_prompt: str, markdown_context: str) -> None:
        self._write_bytes(agent_id, render(agent_id, name, system_prompt, markdown_context).encode())

    def _write_bytes(self, agent_id: str, data: bytes) -> None:
        # the ``.{id}.`` temp prefix is what remove_leftovers() looks for after a crash
        write_atomically(self.path(agent_id), data, temp_prefix=f".{agent_id}.")

    def read_bytes(self, agent_id: str) -> bytes | None:
        """The file as it is now (None when absent), to :meth:`restore` after a failed update."""
        try:
            return self.path(agent_id).read_bytes()
        except OSError:  # absent, or unreadable: then the write that follows reports why
            return None

    def restore(self, agent_id: str, previous: bytes | None) -> None:
        """Put back what :meth:`read_bytes` returned (remove the file if there was none)."""
        if previous is None:
            self.remove(agent_id)
            return
        self._write_bytes(agent_id, previous)

    def remove(self, agent_id: str) -> None:
        self.path(agent_id).unlink(missing_ok=True)

    def remove_leftovers(self) -> list[Path]:
        """Delete temp files of writes cut short by a crash (``.{id}.*.tmp``); never agents."""
        if not self.directory.is_dir():
            return []
        stale = sorted(self.directory.glob(".*.tmp"))
        for path in stale:
            log.warning("removing %s, left behind by an interrupted write", path)
            path.unlink(missing_ok=True)
        return stale

    def scan(self) -> list[AgentFile]:
        """Every well-formed ``*.md`` agent file; malformed ones are logged and skipped."""
        if not self.directory.is_dir():
            return []
        found: list[AgentFile] = []
        for path in sorted(self.directory.glob("*.md")):
            if path.name.startswith("."):
                continue
            try:
                found.append(self._load(path))
            except (MalformedAgentFile, OSError, UnicodeDecodeError) as exc:
                log.warning("skipping agent file %s: %s", path, exc)
        return found

    def _load(self, path: Path) -> AgentFile:
        agent_id = path.stem
        if not is_agent_id(agent_id):
            raise MalformedAgentFile(
                f"file name {path.name!r} is not a valid agent id "
                "(1-64 lower-case letters, digits, '-' or '_')")
        fields = parse(path.read_text(encoding="utf-8"), source=str(path))
        if fields.get("id", agent_id) != agent_id:
            raise MalformedAgentFile(f"front matter id {fields['id']!r} does not match the file name")
        name = fields.get("name", "").strip()
        if not name:
            raise MalformedAgentFile("front matter has no 'name'")
        return AgentFile(
            id=agent_id, name=name, system_prompt=fields.get("system_prompt", ""),
            markdown_context=fields["markdown_context"], mtime=path.stat().st_mtime,
        )
