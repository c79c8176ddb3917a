"""A real full disk: the node's data directory on a small tmpfs the test mounts (root
only; marker ``long``, run with ``make test-long``). The node answers 0xA700, logs the
episode once, keeps running, and receives normally once space is freed."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_factory import chest_image
from helpers.dimse import associate
from helpers.processes import NodeProcess

pytestmark = [pytest.mark.integration, pytest.mark.long]


@contextlib.contextmanager
def small_filesystem(where: Path, megabytes: int) -> Iterator[Path]:
    where.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m,mode=0700", "tmpfs",
                    str(where)], check=True, timeout=30)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, timeout=30)


def statuses(port: int, count: int, seed: int) -> list[int]:
    """C-STORE ``count`` images of about 1 MB on one association; their statuses."""
    datasets = [chest_image(rows=1024, columns=512, seed=seed + i) for i in range(count)]
    assoc = associate(port, datasets[:1])
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


@pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true",
                    reason="mounting a tmpfs needs root (in CI this fails instead)")
def test_a_full_disk_is_refused_logged_once_and_recovered(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "small", 24) as small:
        ballast = small / "ballast"
        ballast.write_bytes(bytes(12 * 2**20))
        node = NodeProcess(small / "var", env={"DICOM_NODE_MIN_FREE_DISK_MB": "0",
                                               "DICOM_NODE_LOG_LEVEL": "INFO"}).start()
        try:
            first = statuses(node.port, 16, 0)
            stored = first.count(0x0000)
            assert 0 < stored < 16 and set(first) == {0x0000, 0xA700}, first
            assert first[stored:] == [0xA700] * (16 - stored)  # full: every later one refused
            ballast.unlink()  # space freed
            assert statuses(node.port, 4, 100) == [0x0000] * 4
            with node.job_store() as store:
                assert store.counts() == {"queued": stored + 4}
            log = node.log
            assert log.count("refusing instances with 0xA700") == 1, log[-3000:]
            assert log.count("0xA700") == 1, log[-3000:]  # no line per instance
            assert log.count("disk space available again") == 1
            assert "Traceback" not in log
        finally:
            node.stop()
