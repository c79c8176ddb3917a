"""AE titles, required tools and files, and bounded waits."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

#: The calling AE title the tests' senders use (DCMTK storescu's default).
CALLING_AE = "STORESCU"
#: The node's AE title (its default).
NODE_AE = "DICOM_NODE"
#: DCMTK tools need Nagle off on loopback (else ~40 ms per DIMSE exchange).
DCMTK_ENV = {"TCP_NODELAY": "1"}


def in_ci() -> bool:
    """Whether the suite runs in CI (``CI`` set to anything but empty/false/0)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(message: str) -> None:
    """Something the suite requires is absent: fail in CI, skip elsewhere."""
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


def require_tool(name: str) -> str:
    """Path of a Debian tool; skip locally when missing, fail in CI (make test installs it)."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed (`make test` installs the Debian packages)")
    assert path is not None
    return path


def require_files(folder: Path, names: Iterable[str], what: str) -> Path:
    """``folder``, if it holds every file in ``names``; skip locally, fail in CI otherwise."""
    absent = [name for name in names if not (folder / name).is_file()]
    if absent:
        missing(f"{what} at {folder} lacks {', '.join(absent)}")
    return folder


def wait_until(condition: Callable[[], bool], timeout: float = 180, what: str = "",
               interval: float = 0.2) -> None:
    """Poll ``condition`` until true, at most ``timeout`` seconds (TimeoutError after)."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(interval)
