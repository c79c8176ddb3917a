"""The spool: received instances written durably under names we generate.

A file is written to ``<spool>/.tmp/<random>.part``, fsynced, renamed to
``<spool>/<xx>/<random>.dcm`` and the directory fsynced, so a crash leaves
either a complete file under its final name or a ``.part`` file that recovery
removes. No name is ever derived from received data (UIDs, Patient ID): the
random part is a UUID4. Files are written 0640 and start with a zeroed
preamble, so a received PE/ELF preamble (CVE-2019-11687) is never stored.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from dicom_node import faults
from dicom_node.errors import OutOfResources

LOGGER = logging.getLogger(__name__)

_TMP = ".tmp"
_QUARANTINE = ".quarantine"
_SUFFIX = ".dcm"
#: Where the worker keeps the SRs it produced (not received files).
REPORT_DIR = "sr"
#: The study results' HL7 and FHIR messages, one file per delivery.
MESSAGE_DIR = "messages"
_MESSAGE_SUFFIXES = (".hl7", ".json")
_FILE_MODE = 0o640
_SHARD = re.compile(r"^[0-9a-f]{2}$")


class _LowSpace:
    """Refusals for lack of disk space, logged once an episode: when the first instance
    is refused, and when one is stored again (with how many were refused meanwhile),
    not once per instance of a PACS retrying a whole study."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = False
        self._refused = 0

    def refused(self, message: str, *args: object) -> None:
        with self._lock:
            self._refused += 1
            first, self._active = not self._active, True
        if first:
            LOGGER.error(message + "; refusing instances with 0xA700 until space is freed",
                         *args)

    def stored(self) -> None:
        if not self._active:  # the common case, without the lock
            return
        with self._lock:
            if not self._active:
                return
            refused, self._active, self._refused = self._refused, False, 0
        LOGGER.warning("disk space available again: receiving (%d instance(s) refused "
                       "meanwhile)", refused)


@dataclass(frozen=True)
class SpooledFile:
    """A file now durable in the spool; ``name`` is relative to the spool root."""

    name: str
    size: int


class Spool:
    """Durable, crash-safe storage of received files."""

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self._low_space = _LowSpace()
        self._tmp = root / _TMP
        self._tmp.mkdir(parents=True, exist_ok=True, mode=0o750)
        _fsync_dir(root)

    def path(self, name: str) -> Path:
        """Absolute path of a spooled file; ``name`` must be one this spool generated."""
        candidate = (self.root / name).resolve()
        if self.root.resolve() not in candidate.parents or not name.endswith(
                (_SUFFIX, *_MESSAGE_SUFFIXES)):
            raise ValueError("not a spool file name")
        return candidate

    def write(self, chunks: Sequence[bytes]) -> SpooledFile:
        """Write ``chunks`` as one new file; return once it is durable under its final name.

        Raises :class:`OutOfResources` when the disk is (or would be) too full or
        the file system refuses the write; nothing is left behind in that case.
        """
        size = sum(len(c) for c in chunks)
        self._check_free_space(size)
        token = uuid.uuid4().hex
        name = f"{token[:2]}/{token}{_SUFFIX}"
        try:
            self._durable_write(name, chunks, received=True)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._low_space.refused("disk full: %s", os.strerror(exc.errno))
                raise OutOfResources("cannot store instance: disk full", logged=True) from exc
            LOGGER.error("spool write failed: %s", os.strerror(exc.errno or 0))
            raise OutOfResources("cannot store instance: write failed") from exc
        self._low_space.stored()
        return SpooledFile(name=name, size=size)

    def write_report(self, job_id: int, data: bytes) -> str:
        """Write a job's SR durably as ``sr/job-<id>.dcm`` (our id, never a received
        string), replacing an earlier one; return its name relative to the root."""
        name = f"{REPORT_DIR}/job-{int(job_id)}{_SUFFIX}"
        self._durable_write(name, [data])
        return name

    def write_evidence(self, job_id: int, data: bytes) -> str:
        """Write a job's evidence image durably as ``sr/evidence-<id>.dcm``; return its
        name relative to the root."""
        name = f"{REPORT_DIR}/evidence-{int(job_id)}{_SUFFIX}"
        self._durable_write(name, [data])
        return name

    def write_message(self, delivery_id: int, data: bytes, suffix: str) -> str:
        """Write a study result's message for one delivery durably as
        ``messages/delivery-<id><suffix>`` (``.hl7``, ``.json``); return its name."""
        if suffix not in _MESSAGE_SUFFIXES:
            raise ValueError(f"message suffix {suffix!r}")
        name = f"{MESSAGE_DIR}/delivery-{int(delivery_id)}{suffix}"
        self._durable_write(name, [data])
        return name

    def _durable_write(self, name: str, chunks: Sequence[bytes], received: bool = False
                       ) -> None:
        """temp file -> fsync -> rename to ``name`` -> fsync its directory; nothing
        is left behind on failure (raises OSError). ``received``: a received
        instance (the steps :mod:`dicom_node.faults` can stop at)."""
        tmp = self._tmp / f"{uuid.uuid4().hex}.part"
        final = self.root / name
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
            try:
                _write_all(fd, chunks)
                if received and faults.ARMED:
                    faults.reached("temp_written")
                os.fsync(fd)
                if received and faults.ARMED:
                    faults.reached("temp_fsynced")
            finally:
                os.close(fd)
            if not final.parent.is_dir():
                final.parent.mkdir(mode=0o750, exist_ok=True)
                _fsync_dir(self.root)
            os.replace(tmp, final)
            if received and faults.ARMED:
                faults.reached("renamed")
            _fsync_dir(final.parent)
        except OSError:
            _unlink_quietly(tmp)
            raise

    def check_writable(self) -> None:
        """Write, sync and delete a small file where received files are first written
        (its temporary directory): OSError when the spool cannot take a file."""
        fd, name = tempfile.mkstemp(prefix="writable-", dir=self._tmp)
        try:
            _write_all(fd, [b"ok"])
            os.fsync(fd)
        finally:
            os.close(fd)
            _unlink_quietly(Path(name))

    def remove(self, name: str) -> None:
        """Delete a spooled file (used when its job row could not be committed)."""
        _unlink_quietly(self.path(name))

    def _check_free_space(self, size: int) -> None:
        free = shutil.disk_usage(self.root).free
        if free - size < self.min_free_bytes:
            self._low_space.refused("disk space low: %d MB free, minimum %d MB",
                                    free // 2**20, self.min_free_bytes // 2**20)
            raise OutOfResources("not enough free disk space", logged=True)

    def files(self) -> Iterator[str]:
        """Every received file in the spool, relative to the root.

        Only the two-hex-digit shard directories hold received files; other
        directories (the worker's ``sr/``) are not the receive path's business.
        """
        for shard in sorted(self.root.iterdir()):
            if not _SHARD.match(shard.name) or not shard.is_dir():
                continue
            for entry in sorted(shard.iterdir()):
                if entry.suffix == _SUFFIX:
                    yield f"{shard.name}/{entry.name}"

    def remove_partials(self) -> int:
        """Remove ``.part`` files left by a crash mid-write; return how many."""
        count = 0
        for entry in self._tmp.iterdir():
            _unlink_quietly(entry)
            count += 1
        if count:
            LOGGER.warning("removed %d partial file(s) left by an interrupted write", count)
        return count

    def quarantine(self, names: Iterator[str] | list[str]) -> int:
        """Move files that have no job row out of the spool; return how many.

        Such a file was renamed but its row never committed, so the sender was
        never acknowledged; it is kept aside for inspection, not processed.
        """
        target = self.root / _QUARANTINE
        count = 0
        for name in names:
            target.mkdir(mode=0o750, exist_ok=True)
            os.replace(self.path(name), target / Path(name).name)
            count += 1
        if count:
            _fsync_dir(target)
            LOGGER.warning("quarantined %d spool file(s) without a job row", count)
        return count


def _write_all(fd: int, chunks: Sequence[bytes]) -> None:
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            written = os.write(fd, view)
            view = view[written:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
