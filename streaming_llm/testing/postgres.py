"""A throwaway PostgreSQL server for tests and benches: ``initdb`` + ``pg_ctl`` in a temporary
directory, listening on a free loopback port only, with a fresh database per caller.

PostgreSQL refuses to run as root; as root the server runs as an unprivileged user (``postgres``
when it exists, else ``nobody``) through ``runuser``, in a directory that user owns. The
binaries come from Debian's ``postgresql`` package (``/usr/lib/postgresql/<version>/bin``) or
``PATH``. Settings favour speed over durability of the *server* (``fsync=off``): what the tests
kill is the service, never PostgreSQL.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .server import free_port

USER = "streaming"  # the database superuser initdb creates


def bindir() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` are, newest version first; None when not installed."""
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                            key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
                            reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


@dataclass
class PostgresServer:
    port: int
    bin: Path
    data: Path
    run_as: list[str]  # the command prefix that runs a server binary as its owner

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its ``postgresql+asyncpg://`` URL."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        subprocess.run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                        "-U", USER, name], check=True, capture_output=True, timeout=60)
        return self.url(name)

    def restart(self) -> None:
        """Stop the server (dropping every connection) and start it again on the same port."""
        # `restart` starts it with the options it was started with (port, loopback only).
        subprocess.run([*self.run_as, str(self.bin / "pg_ctl"), "-D", str(self.data), "-l",
                        str(self.data / "server.log"), "-m", "fast", "-w", "restart"],
                       check=True, capture_output=True, timeout=90, cwd=self.data.parent)

    def log(self) -> str:
        path = self.data / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _owner() -> tuple[list[str], int | None, int | None]:
    """(command prefix, uid, gid) to run the server with: nothing special unless we are root."""
    if os.geteuid() != 0:
        return [], None, None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return ["runuser", "-u", name, "--"], entry.pw_uid, entry.pw_gid
    raise RuntimeError("running as root and no unprivileged user (postgres, nobody) to run "
                       "PostgreSQL as")


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Start a server; stop it and remove its files on exit."""
    binaries = bindir()
    if binaries is None:
        raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql; "
                           "`make test` does it)")
    run_as, uid, gid = _owner()
    # Directly under the temp dir: pytest's own temp dirs are private to root.
    top = Path(tempfile.mkdtemp(prefix="streaming-llm-pg-"))
    data = top / "data"
    try:
        if uid is not None and gid is not None:
            os.chown(top, uid, gid)
        subprocess.run([*run_as, str(binaries / "initdb"), "-D", str(data), "-U", USER,
                        "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions"],
                       check=True, capture_output=True, timeout=120, cwd=top)
        port = free_port()
        options = (f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
                   "-c fsync=off -c full_page_writes=off -c max_connections=200")
        started = subprocess.run(
            [*run_as, str(binaries / "pg_ctl"), "-D", str(data), "-l", str(data / "server.log"),
             "-o", options, "-w", "-t", "60", "start"], check=False, capture_output=True,
            text=True, cwd=top, timeout=90)
        server = PostgresServer(port, binaries, data, run_as)
        if started.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {started.stdout}{started.stderr}\n"
                               f"{server.log()}")
        try:
            yield server
        finally:
            subprocess.run([*run_as, str(binaries / "pg_ctl"), "-D", str(data), "-m",
                            "immediate", "-w", "stop"], check=False, capture_output=True,
                           timeout=60)
    finally:
        shutil.rmtree(top, ignore_errors=True)
