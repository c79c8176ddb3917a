"""bench/e2e.py's sustained rate: the pipeline's throughput in its steady state, not the
fill and tail of a finite queue."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def e2e():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_e2e", ROOT / "bench" / "e2e.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_e2e"] = module
    spec.loader.exec_module(module)
    return module


def dispatched(rate: float, images: int, every: float, start: float) -> list[float]:
    """When each result lands at a PACS: classified at ``rate`` from ``start``, sent in
    bursts every ``every`` seconds, a few milliseconds apart within a burst."""
    done = start + np.arange(1, images + 1) / rate
    sent = np.ceil((done - start) / every) * every + start
    within = np.concatenate([np.arange(np.sum(sent == t)) for t in np.unique(sent)])
    return list(sent + 0.003 * within)


@pytest.mark.parametrize("every", [0.5, 0.37, 1.3])
def test_the_steady_rate_is_the_pipelines_rate_whatever_its_fill_and_tail(
        e2e, every: float) -> None:  # type: ignore[no-untyped-def]
    arrived = dispatched(20.0, 300, every, start=0.6)  # 0.6 s of fill after "ready"
    drained = 300 / (max(arrived) - 0.0)
    assert drained < 0.97 * 20.0  # a finite queue's figure counts the fill and the tail
    assert e2e.steady_rate(arrived) == pytest.approx(20.0, rel=0.01)
    assert e2e.steady_rate(list(reversed(arrived))) == pytest.approx(20.0, rel=0.01)


def test_a_slower_second_half_lowers_the_steady_rate(e2e) -> None:  # type: ignore[no-untyped-def]
    fast = dispatched(20.0, 150, 0.5, start=0.0)
    slow = dispatched(10.0, 150, 0.5, start=max(fast))
    rate = e2e.steady_rate(fast + slow)
    assert 12.0 < rate < 16.0  # between the two, weighted by time, not the faster one


def test_node_time_counts_only_the_nodes_turns(e2e) -> None:  # type: ignore[no-untyped-def]
    turns = [(100.0, 102.0), (104.0, 106.0), (108.0, 110.0)]
    stamps = [100.5, 102.0, 103.0, 104.0, 105.5, 109.0, 111.0]
    # in its first turn; at its end; between turns (a file finished after the stop):
    # the turn's end; the second turn's start; within it; the third; after the last.
    assert e2e.node_time(stamps, turns) == [0.5, 2.0, 2.0, 2.0, 3.5, 5.0, 6.0]


def test_interleaved_arrivals_give_the_nodes_own_rate(e2e) -> None:  # type: ignore[no-untyped-def]
    # A node classifying 20 images a second of its own time, stopped every 2 s for 2 s.
    own = dispatched(20.0, 300, 0.5, start=0.4)
    turns = [(4.0 * k, 4.0 * k + 2.0) for k in range(10)]
    wall = [4.0 * int(t // 2.0) + t % 2.0 for t in own]  # own time -> wall clock
    assert e2e.steady_rate(wall) < 11.0  # over the wall clock: about half
    assert e2e.steady_rate(e2e.node_time(wall, turns)) == pytest.approx(20.0, rel=0.02)


def test_a_stopped_process_is_seen_stopped(e2e) -> None:  # type: ignore[no-untyped-def]
    proc = subprocess.Popen([sys.executable, "-c", "import time; print(flush=True); "
                             "time.sleep(60)"], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"\n"
        time.sleep(0.2)  # asleep, not stopped
        assert not e2e._stopped(proc.pid)
        os.kill(proc.pid, signal.SIGSTOP)
        assert settles(lambda: e2e._stopped(proc.pid))
        os.kill(proc.pid, signal.SIGCONT)
        assert settles(lambda: not e2e._stopped(proc.pid))
    finally:
        proc.kill()
        proc.wait(timeout=10)


def settles(check: Callable[[], bool], seconds: float = 5.0) -> bool:
    """Whether ``check`` comes true within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return False
