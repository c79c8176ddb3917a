"""A real PostgreSQL server for a test: Debian's binaries, a throwaway cluster, loopback.

The server is ``initdb`` + ``postgres`` from ``/usr/lib/postgresql/<version>/bin`` (the
newest installed), run in the foreground as a child process that the test owns: TCP on
127.0.0.1 only, on a free port, its unix socket in its own directory, ``fsync`` off
(a test's cluster need not survive a power cut), trust authentication (nothing but
loopback reaches it). PostgreSQL refuses to run as root, and the suite runs as root in
CI: then the server runs as the ``postgres`` user (made by Debian's package; else
``nobody``), from a private directory that user owns. That directory cannot be under
pytest's ``tmp_path``, which pytest keeps readable by root only (mode 0700 all the way
down); it is a ``mkdtemp`` directory in the system's temporary folder (mode 0700, owned
by that user) and is removed at :meth:`PostgresServer.stop`. Run as another user, the
server's directory is the ``root`` given. Every wait is bounded.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from dicom_node.loopback import free_port

from helpers.environment import missing
from helpers.files import log_so_far

#: Where Debian's postgresql-<version> package puts the server's programs.
DEBIAN_POSTGRESQL = Path("/usr/lib/postgresql")
#: The cluster's superuser (initdb -U), the one the tests connect as.
SUPERUSER = "postgres"


def binaries() -> Path:
    """The ``bin`` folder of the newest PostgreSQL installed (initdb and postgres in it);
    skip locally, fail in CI (``make test`` installs Debian's ``postgresql``)."""
    found = sorted((p for p in DEBIAN_POSTGRESQL.glob("*/bin")
                    if (p / "initdb").is_file() and (p / "postgres").is_file()),
                   key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.name)])
    if not found:
        missing(f"PostgreSQL is not installed (no {DEBIAN_POSTGRESQL}/<version>/bin/initdb; "
                "`make test` installs the Debian package postgresql)")
    return found[-1]


def _server_user() -> pwd.struct_passwd | None:
    """The unprivileged user to run the server as when we are root; None otherwise."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    missing("running as root, and neither a postgres nor a nobody user to run PostgreSQL as")
    raise AssertionError("unreachable")


class PostgresServer:
    """One throwaway PostgreSQL cluster, started by :meth:`start`, gone after :meth:`stop`."""

    def __init__(self, root: Path, start_timeout: float = 60) -> None:
        """``root``: a folder for the server's log (and, when not root, its files)."""
        self.bin = binaries()
        self.user = _server_user()
        root.mkdir(parents=True, exist_ok=True)
        self.base = (Path(tempfile.mkdtemp(prefix="dicom-node-postgres-"))
                     if self.user is not None else root / "postgres")
        self.base.mkdir(parents=True, exist_ok=True)
        self.data = self.base / "data"
        self.sockets = self.base / "sockets"
        self.log_path = root / "postgres.log"
        self.port = free_port()
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def _run_as_server_user(self) -> dict[str, Any]:
        """``subprocess`` arguments that drop to the server's user (none when not root)."""
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}

    def start(self) -> PostgresServer:
        """initdb, then the server; return once it accepts connections."""
        self.sockets.mkdir(exist_ok=True)
        if self.user is not None:
            for path in (self.base, self.sockets):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        env = {**os.environ, "LC_ALL": "C.UTF-8", "TZ": "UTC"}
        subprocess.run(
            [str(self.bin / "initdb"), "--pgdata", str(self.data), "--username", SUPERUSER,
             "--auth", "trust", "--encoding", "UTF8", "--no-locale", "--no-sync"],
            check=True, capture_output=True, timeout=120, env=env, cwd=self.base,
            **self._run_as_server_user())
        log = self.log_path.open("ab")
        # TimeZone is deliberately not UTC: the node must not depend on the server's zone.
        self.proc = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.sockets}",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "shared_buffers=32MB", "-c", "max_connections=200",
             "-c", "TimeZone=America/New_York"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.base,
            **self._run_as_server_user())
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + self.start_timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n{self.log}")
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"postgres not ready after {self.start_timeout} s:\n"
                                       f"{self.log}") from None
                time.sleep(0.2)

    def dsn(self, database: str) -> str:
        """libpq connection string of ``database`` over TCP on loopback."""
        return (f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={database} "
                "connect_timeout=10")

    def url(self, database: str) -> str:
        """SQLAlchemy URL of ``database`` (psycopg 3), as ``database_url`` takes it."""
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database ``name`` (letters, digits, underscores); its URL."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    @property
    def log(self) -> str:
        return log_so_far(self.log_path)

    def stop(self) -> None:
        """Fast shutdown (SIGINT: sessions ended, no wait for clients), bounded; then
        SIGKILL; then the cluster's files are removed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        shutil.rmtree(self.base, ignore_errors=True)
