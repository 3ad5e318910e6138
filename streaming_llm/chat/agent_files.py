"""The Markdown mirror of agents: ``{agents_dir}/{id}.md``, readable and hand-editable.

Format (front matter with JSON-quoted strings, which YAML also reads; body = Markdown context)::

    ---
    id: reviewer
    name: "Reviewer"
    system_prompt: "You review pull requests.\\nBe brief."
    tools: [{"name":"get_weather","description":"The weather","parameters":{"type":"object"}}]
    ---
    # Context
    ...

``tools`` (optional) is the agent's tools as one line of JSON (YAML reads it as a flow list).
Hand-written files may also use plain ``key: text`` values or YAML block scalars (``key: |``
followed by indented lines). Writes are atomic (temp file in the same directory + ``os.replace``),
so a reader never sees half a file.

The folder is read as untrusted input, because anyone who can write into it can try to stop or
subvert start-up. Only regular files directly inside it are read: each entry is ``lstat``-ed
first and opened with ``O_NOFOLLOW | O_NONBLOCK`` (a symlink, FIFO, socket, device or directory
named ``x.md`` is skipped, and a FIFO swapped in between the two calls cannot block the open),
the size is read with ``fstat`` before a byte is parsed (:data:`MAX_FILE_BYTES`), and at most
that many bytes are read. Every skipped file gets one warning naming it and the reason. Clean-up
after a crash removes only this module's own temp names (``.{agent id}.{8 random}.tmp``, regular
files), never anything a person put there.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..files import write_atomically
from ..ids import is_agent_id

log = logging.getLogger(__name__)

#: Largest agent file read: the largest valid agent (``agents.AgentIn``: 200 + 100 000 + 1 000 000
#: characters) is under 5 MB even with every character 4 bytes of UTF-8 or a 6-byte JSON escape.
MAX_FILE_BYTES = 8 * 1024 * 1024

#: The temp names :func:`streaming_llm.files.write_atomically` makes for an agent: ``.{id}.`` +
#: tempfile's 8 random characters + ``.tmp``. Nothing else is ever removed by the clean-up.
_TEMP_NAME = re.compile(r"\.(?P<id>[a-z0-9_-]{1,64})\.[a-z0-9_]{8}\.tmp")
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


class MalformedAgentFile(ValueError):
    pass


@dataclass(frozen=True)
class AgentFile:
    id: str
    name: str
    system_prompt: str
    markdown_context: str
    mtime: float = 0.0
    tools: str | None = None  # JSON text, as written (checked by the agent service)


def render(agent_id: str, name: str, system_prompt: str, markdown_context: str,
           tools: str | None = None) -> str:
    head = [
        "---",
        f"id: {agent_id}",
        f"name: {json.dumps(name, ensure_ascii=False)}",
        f"system_prompt: {json.dumps(system_prompt, ensure_ascii=False)}",
        *([f"tools: {tools}"] if tools else []),  # one line: JSON escapes line breaks
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

    def write(self, agent_id: str, name: str, system_prompt: str, markdown_context: str,
              tools: str | None = None) -> None:
        self._write_bytes(agent_id, render(agent_id, name, system_prompt, markdown_context,
                                           tools).encode())

    def _write_bytes(self, agent_id: str, data: bytes) -> None:
        # the ``.{id}.`` temp prefix is what remove_leftovers() looks for after a crash
        write_atomically(self.path(agent_id), data, temp_prefix=f".{agent_id}.")

    def read_bytes(self, agent_id: str) -> bytes | None:
        """The file as it is now (None when absent), to :meth:`restore` after a failed update."""
        try:
            return _read_regular(self.path(agent_id))[0]
        except (OSError, MalformedAgentFile):  # absent, unreadable, or not a regular file
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
        """Delete temp files of writes cut short by a crash (``.{id}.XXXXXXXX.tmp``); never agents.

        Only names :func:`write_atomically` makes, and only regular files: a person's
        ``.notes.tmp`` or a directory named ``.x.tmp`` stay where they are.
        """
        removed = []
        for entry in self._entries():
            match = _TEMP_NAME.fullmatch(entry.name)
            if match is None or not is_agent_id(match["id"]):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                log.warning("removing %s, left behind by an interrupted write", entry.path)
                os.unlink(entry.path)
            except OSError as exc:
                log.warning("could not remove %s: %s", entry.path, exc.strerror or exc)
                continue
            removed.append(Path(entry.path))
        return removed

    def scan(self) -> list[AgentFile]:
        """Every well-formed ``*.md`` agent file; any other ``*.md`` entry is logged and skipped."""
        found: list[AgentFile] = []
        for entry in self._entries():
            if not entry.name.endswith(".md"):
                continue
            path = Path(entry.path)
            try:
                found.append(self._load(path))
            except (MalformedAgentFile, OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                log.warning("skipping agent file %s: %s", path, reason)
        return found

    def _entries(self) -> Iterator[os.DirEntry[str]]:
        """The folder's entries by name; none (and one warning) when it cannot be listed."""
        if not self.directory.is_dir():
            return iter(())
        try:
            with os.scandir(self.directory) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            log.warning("cannot list the agents directory %s: %s", self.directory,
                        exc.strerror or exc)
            return iter(())
        return iter(entries)

    def _load(self, path: Path) -> AgentFile:
        agent_id = path.stem
        if not is_agent_id(agent_id):
            raise MalformedAgentFile(
                f"file name {path.name!r} is not a valid agent id "
                "(1-64 lower-case letters, digits, '-' or '_')")
        data, mtime = _read_regular(path)
        fields = parse(data.decode("utf-8"), source=str(path))
        if fields.get("id", agent_id) != agent_id:
            raise MalformedAgentFile(f"front matter id {fields['id']!r} does not match the file name")
        name = fields.get("name", "")
        if not name.strip():
            raise MalformedAgentFile("front matter has no 'name'")
        return AgentFile(
            id=agent_id, name=name, system_prompt=fields.get("system_prompt", ""),
            markdown_context=fields["markdown_context"], mtime=mtime,
            tools=fields.get("tools") or None,
        )


def _read_regular(path: Path) -> tuple[bytes, float]:
    """``(contents, mtime)`` of ``path`` if it is a regular file of at most :data:`MAX_FILE_BYTES`.

    Raise :class:`MalformedAgentFile` saying why not (symlink, FIFO, device, too large, ...).
    """
    kind = _kind(os.lstat(path).st_mode)
    if kind is not None:
        raise MalformedAgentFile(f"{kind}, not a regular file")
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # it became a symlink since the lstat
            raise MalformedAgentFile("a symbolic link, not a regular file") from None
        raise
    try:
        info = os.fstat(fd)
        kind = _kind(info.st_mode)
        if kind is not None:  # swapped since the lstat
            raise MalformedAgentFile(f"{kind}, not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise MalformedAgentFile(
                f"{info.st_size} bytes, more than the {MAX_FILE_BYTES} an agent file may have")
        chunks, size = [], 0
        while chunk := os.read(fd, min(1 << 20, MAX_FILE_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_FILE_BYTES:  # grew since the fstat
                raise MalformedAgentFile(
                    f"more than the {MAX_FILE_BYTES} bytes an agent file may have")
        return b"".join(chunks), info.st_mtime
    finally:
        os.close(fd)


def _kind(mode: int) -> str | None:
    """What a non-regular file is, in words; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a plain file"
