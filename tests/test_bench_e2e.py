"""bench/e2e.py's sustained rate: the pipeline's throughput in its steady state, not the
fill and tail of a finite queue."""

from __future__ import annotations

import importlib.util
import sys
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
