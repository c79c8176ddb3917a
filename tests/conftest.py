"""Shared fixtures: a real node process on a free loopback port, DCMTK peers, data paths."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dicom_node.jobs import JobStore
from dicom_node.loopback import free_port, wait_for_port

from dicom_factory import SHARED_CXR, SHARED_DICOM

CALLING_AE = "STORESCU"
NODE_AE = "DICOM_NODE"






def require_tool(name: str) -> str:
    """Path of a Debian tool; skip locally when missing, fail in CI (make test installs it)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (`make test` installs the Debian packages)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def terminate(proc: subprocess.Popen[bytes], grace: float) -> int:
    """SIGTERM, then SIGKILL if ``proc`` has not ended after ``grace`` seconds; return
    its exit code."""
    proc.terminate()
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=15)


class NodeProcess:
    """``dicom-node serve`` as a real child process on a free loopback port."""

    def __init__(self, data_dir: Path, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.extra_args = extra_args or ["--allow-calling-ae", CALLING_AE]
        self.env = {**os.environ, **(env or {})}
        self.log_path = data_dir.parent / f"{data_dir.name}-node.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NodeProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "serve", "--host", "127.0.0.1",
             "--port", str(self.port), "--data-dir", str(self.data_dir), *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env,
        )
        log.close()
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> int:
        """SIGTERM, bounded wait, then SIGKILL; return the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        return terminate(self.proc, 15)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=15)

    def job_store(self) -> JobStore:
        """The node's job store (a context manager: it closes on leaving)."""
        return JobStore(f"sqlite:///{self.data_dir / 'dicom-node.db'}")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def wait_until(condition: Callable[[], bool], timeout: float = 180, what: str = "") -> None:
    """Poll ``condition`` until true, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what or condition}")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    """A started node that accepts calling AE ``STORESCU``."""
    process = NodeProcess(tmp_path / "var").start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def shared_dicom() -> Path:
    if not SHARED_DICOM.is_dir():
        pytest.skip("../shared/data/dicom is absent (a fresh clone has no shared data)")
    return SHARED_DICOM


@pytest.fixture
def shared_cxr() -> Path:
    if not SHARED_CXR.is_dir():
        pytest.skip("../shared/data/cxr-dev is absent (a fresh clone has no shared data)")
    return SHARED_CXR


@pytest.fixture(scope="session")
def small_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained concatenated network at 96x96, saved as an artifact (built once)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from model import card, network

    out = tmp_path_factory.mktemp("artifact") / "concat96"
    built = network.build("concatenated", 96, seed=7)
    card.save_artifact(built, out, {"version": "0.0.1", "architecture": "concatenated",
                                    "input_size": 96, "trained": False})
    return out
