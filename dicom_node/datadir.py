"""One receiving node per data directory.

A receiving node owns its spool: at start-up it removes partial files and
quarantines spool files without a job row, which are, for a node that is
running, files it has just renamed and not yet committed. A second node on the
same data directory (systemd plus a start by hand) would quarantine the first
one's instances in flight. So a receiving node holds an exclusive lock on
``<data_dir>/node.lock`` and on ``<storage_dir>/node.lock`` (``flock``; the spool
may be configured elsewhere) from before it touches either (the database schema,
the spool, a model installed by ``serve --model``) until it stops; another node
on either refuses to start and names the one running. The
kernel releases the lock when the process ends, however it ends: a node killed
with SIGKILL leaves no stale lock. ``dicom-node worker`` processes (classify and
deliver only) do not recover the spool and take no lock; neither do the
commands (``model install``, ``jobs``) that act on a running node's data.
"""

from __future__ import annotations

import fcntl
import os
import socket
from datetime import UTC, datetime
from pathlib import Path

from dicom_node.errors import ConfigError

LOCK_NAME = "node.lock"


class DataDirInUse(ConfigError):
    """Another node holds the data directory's lock; the message names it."""


class DataDirLock:
    """The exclusive lock of one data directory, held by the node that receives."""

    def __init__(self, data_dir: Path, what: str = "data directory") -> None:
        self.data_dir = data_dir
        self.what = what
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock and record who holds it; DataDirInUse when another node does."""
        if self._fd is not None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUse(
                f"the {self.what} {self.data_dir} is in use by another node ({holder}); "
                f"stop that one first, or give this one its own data directory") from None
        except BaseException:
            os.close(fd)
            raise
        started = datetime.now(UTC).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n"
                  .encode("ascii", "replace"), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the lock back (the file stays: removing it would race a node starting)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
