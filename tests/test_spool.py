"""The spool: crash-safe writes under our own names, recovery of leftovers."""

from __future__ import annotations

import errno
import os
import re
import stat
import uuid
from pathlib import Path

import pytest

from dicom_node.errors import OutOfResources, Status
from dicom_node.spool import Spool

#: A spooled file's name: a shard directory, then 32 hex digits and .dcm.
NAME = re.compile(r"(?P<shard>[0-9a-f]{2})/(?P<token>[0-9a-f]{32})\.dcm")


def test_write_is_complete_private_and_named_by_us(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spooled = spool.write([b"head", b"body" * 1000])
    path = spool.path(spooled.name)
    assert path.read_bytes() == b"head" + b"body" * 1000
    assert spooled.size == 4004
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode & 0o111 == 0 and mode & 0o007 == 0
    assert NAME.fullmatch(spooled.name)
    assert not any((tmp_path / "spool" / ".tmp").iterdir())


def test_names_are_fresh_uuid4s_never_derived_from_the_data(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    received = b"1.2.826.0.1.3680043.8.498.1 ../../etc/passwd Doe^Jane"
    names = [spool.write([received]).name, spool.write([received]).name,
             spool.write([b"other"]).name]
    assert len(set(names)) == 3  # the same bytes twice: two names
    for name in names:
        match = NAME.fullmatch(name)
        assert match is not None, name
        token = uuid.UUID(hex=match["token"])
        assert token.version == 4 and token.variant == uuid.RFC_4122  # random, not hashed
        assert match["shard"] == match["token"][:2]


def test_path_refuses_names_outside_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    for name in ("../../etc/passwd", "/etc/passwd", "ab/../../x.dcm", "ab/x.txt"):
        with pytest.raises(ValueError):
            spool.path(name)


def test_not_enough_free_space_is_out_of_resources(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=2**62)
    with pytest.raises(OutOfResources) as info:
        spool.write([b"x"])
    assert info.value.status == Status.OUT_OF_RESOURCES
    assert list(spool.files()) == []


def test_enospc_during_write_leaves_nothing(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool")
    real_write = os.write

    def full_disk(fd: int, data: bytes) -> int:
        if len(data) > 10:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OutOfResources, match="disk full"):
        spool.write([b"x" * 100])
    monkeypatch.undo()
    assert list(spool.files()) == []
    assert not any((tmp_path / "spool" / ".tmp").iterdir())


def test_partials_removed_and_orphans_quarantined(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    (tmp_path / "spool" / ".tmp" / "dead.part").write_bytes(b"half")
    kept = spool.write([b"kept"]).name
    orphan = spool.write([b"orphan"]).name
    assert spool.remove_partials() == 1
    assert spool.quarantine([orphan]) == 1
    assert list(spool.files()) == [kept]
    assert (tmp_path / "spool" / ".quarantine" / Path(orphan).name).read_bytes() == b"orphan"


def test_other_directories_are_not_received_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    kept = spool.write([b"image"]).name
    (tmp_path / "spool" / "sr").mkdir()
    (tmp_path / "spool" / "sr" / "job-1.dcm").write_bytes(b"report")
    assert list(spool.files()) == [kept]
    assert spool.quarantine(sorted(set(spool.files()) - {kept})) == 0
    assert (tmp_path / "spool" / "sr" / "job-1.dcm").exists()
