"""A private PostgreSQL server for tests: initdb into a temporary directory, listening only on
a unix socket there, stopped and removed afterwards. Nothing on the machine is assumed running
(DESIGN.md §6) and Debian's own cluster is never touched."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

PG_USER = "postgres"  # the OS user that owns the data directory when the tests run as root


def find_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/N/bin with initdb and pg_ctl, or initdb on PATH."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda d: int(Path(d).parent.name) if Path(d).parent.name.isdigit() else 0,
        reverse=True,
    )
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for directory in candidates:
        if all(os.access(Path(directory) / tool, os.X_OK) for tool in ("initdb", "pg_ctl")):
            return Path(directory)
    return None


def unavailable_reason() -> str | None:
    if find_bindir() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) not found; install the Debian package postgresql (scripts/setup.sh)"
    if os.geteuid() == 0:
        # initdb refuses to run as root: the cluster belongs to the postgres user.
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            return f"running as root but there is no {PG_USER!r} user to own the test cluster"
        if shutil.which("runuser") is None:
            return "running as root but runuser (util-linux) is missing"
    return None


def _free_port() -> int:
    # The server listens on no TCP address; the port only names its socket file. A free TCP
    # port is still a cheap way to pick a number nobody else's socket uses.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    def __init__(self) -> None:
        bindir = find_bindir()
        if bindir is None:
            raise RuntimeError(unavailable_reason() or "PostgreSQL not found")
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="goldilocks-pg-"))
        self.data = self.root / "data"
        self.sockdir = self.root / "sock"
        self.log = self.root / "server.log"
        self.port = _free_port()
        self._as_owner = ["runuser", "-u", PG_USER, "--"] if os.geteuid() == 0 else []

    def start(self) -> PostgresServer:
        self.sockdir.mkdir()
        if self._as_owner:
            entry = pwd.getpwnam(PG_USER)
            for path in (self.root, self.sockdir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        options = (
            f"-k {self.sockdir} -p {self.port} -c listen_addresses='' "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"  # test data only
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options, "start")
        return self

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str | None = None) -> str:
        """A URL for `database` (default: a new name); the Store creates the database itself."""
        name = database or f"t_{uuid.uuid4().hex[:12]}"
        return f"postgresql+psycopg://postgres@/{name}?host={self.sockdir}&port={self.port}"

    def _run(self, tool: str, *args: str) -> None:
        command = [*self._as_owner, str(self.bindir / tool), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.root, check=False)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}{log}"
            )
