"""``dicom-node serve`` as a real child process on a free loopback port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dicom_node.jobs import JobStore
from dicom_node.loopback import free_port, wait_for_port

from helpers.environment import CALLING_AE
from helpers.files import log_so_far

#: Settings for tests that wait on deliveries: quick retries and dispatch, batches not
#: held back, INFO logs (to check what they say).
FAST_DELIVERY = {
    "DICOM_NODE_RETRY_BASE_SECONDS": "0.5", "DICOM_NODE_RETRY_MAX_SECONDS": "1",
    "DICOM_NODE_DELIVERY_TIMEOUT": "3", "DICOM_NODE_DISPATCH_INTERVAL_SECONDS": "0.3",
    "DICOM_NODE_MAX_BATCH_DELAY_MS": "100", "DICOM_NODE_LOG_LEVEL": "INFO",
}


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600
        ) -> subprocess.CompletedProcess[str]:
    """``dicom-node ARGS...`` run to its end, output captured (``env`` adds to the
    environment)."""
    return subprocess.run([sys.executable, "-m", "dicom_node", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def terminate(proc: subprocess.Popen[bytes], grace: float) -> int:
    """SIGTERM, then SIGKILL if ``proc`` has not ended after ``grace`` seconds; return
    its exit code."""
    proc.terminate()
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=15)


def paused_while(proc: subprocess.Popen[bytes], condition: Callable[[], bool]) -> bool:
    """Whether ``condition`` holds both before ``proc`` is paused (SIGSTOP) and after,
    when what it looks at can no longer change: ``proc`` is left paused only then (it
    may have moved on between the first look and the pause). For a test that must
    catch a process in a passing state, and kill it there (SIGKILL ends a stopped
    process too)."""
    if not condition():
        return False
    proc.send_signal(signal.SIGSTOP)
    if condition():
        return True
    proc.send_signal(signal.SIGCONT)
    return False


class NodeProcess:
    """``dicom-node serve`` as a real child process on a free loopback port."""

    def __init__(self, data_dir: Path, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None, allow_unvalidated: bool = True) -> None:
        """``allow_unvalidated``: the node serves the tests' small untrained models (its
        results then say so), as ``make demo`` does; False for the clinical gate."""
        self.data_dir = data_dir
        self.port = free_port()
        self.extra_args = extra_args if extra_args is not None else [
            "--allow-calling-ae", CALLING_AE]
        self.env = {**os.environ,
                    "DICOM_NODE_ALLOW_UNVALIDATED_MODELS": str(allow_unvalidated).lower(),
                    **(env or {})}
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
    def spool(self) -> Path:
        """The node's spool directory (the default under its data directory)."""
        return self.data_dir / "spool"

    @property
    def log(self) -> str:
        return log_so_far(self.log_path)


def all_delivered(node: NodeProcess, count: int) -> bool:
    """``count`` jobs done, each with its SR and its evidence image delivered."""
    from dicom_node.db import DeliveryState, JobState

    with node.job_store() as store:
        jobs = store.list()
        deliveries = store.deliveries([j.id for j in jobs])
    return (len(jobs) == count and all(j.state is JobState.DONE for j in jobs)
            and all(len(deliveries[j.id]) == 2 and all(
                d.state is DeliveryState.DONE for d in deliveries[j.id]) for j in jobs))


def node_with_destinations(tmp_path: Path, artifact: Path,
                           destinations: list[dict[str, Any]], env: dict[str, str]
                           ) -> NodeProcess:
    """A started ``dicom-node serve`` with ``artifact`` installed and ``destinations``
    as ``[[destinations]]`` tables of its config file (``env`` adds to its environment).

    Parameters
    ----------
    tmp_path
        Where its config file and data directory go.
    artifact
        The model it installs at start.
    destinations
        The tables, as dicts.
    env
        Settings as DICOM_NODE_* variables (e.g. FAST_DELIVERY).
    """
    config = tmp_path / "node.toml"
    config.write_text("".join(
        "[[destinations]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in d.items())
        for d in destinations))
    return NodeProcess(tmp_path / "var", extra_args=[
        "--allow-calling-ae", CALLING_AE, "--model", str(artifact), "--config", str(config)],
        env=env).start()
