"""bench/e2e.py's sustained rate: the pipeline's throughput in its steady state, not the
fill and tail of a finite queue, and the node's own when it takes turns with the engine;
and its measure of delivering SRs in compiled code (DCMTK)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from pydicom.uid import generate_uid

from dicom_node.report import Classification, ReportBuilder
from model.card import ModelCard

from dicom_factory import dx_16bit
from helpers.environment import require_tool

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def e2e() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_e2e", ROOT / "bench" / "e2e.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_e2e"] = module
    spec.loader.exec_module(module)
    return module


def dispatched(rate: float, images: int, every: float, start: float,
               slow_first: int = 0) -> list[float]:
    """When each result lands at a PACS: classified at ``rate`` from ``start`` (the first
    ``slow_first`` at half that rate), sent in bursts every ``every`` seconds, a few
    milliseconds apart within a burst."""
    gaps = np.full(images, 1 / rate)
    gaps[:slow_first] *= 2
    done = start + np.cumsum(gaps)
    sent = np.ceil((done - start) / every) * every + start
    within = np.concatenate([np.arange(np.sum(sent == t)) for t in np.unique(sent)])
    return list(sent + 0.003 * within)


@pytest.mark.parametrize("every", [0.5, 0.37, 1.3])
def test_the_steady_rate_is_the_pipelines_rate_whatever_its_fill_and_tail(
        e2e: ModuleType, every: float) -> None:
    # 0.6 s before the first result is classified; the first 30 at half the rate (a
    # pipeline filling); the last results wait for their dispatch.
    arrived = dispatched(20.0, 300, every, start=0.6, slow_first=30)
    drained = 300 / (max(arrived) - 0.0)
    assert drained < 0.95 * 20.0  # a finite queue's figure counts the fill and the tail
    assert e2e.steady_rate(arrived) == pytest.approx(20.0, rel=0.02)


def test_a_slower_second_half_lowers_the_steady_rate(e2e: ModuleType) -> None:
    fast = dispatched(20.0, 150, 0.5, start=0.0)
    slow = dispatched(10.0, 150, 0.5, start=max(fast))
    assert 11.0 < e2e.steady_rate(fast + slow) < 15.0  # well under the faster half's 20


def test_node_time_counts_only_the_nodes_turns(e2e: ModuleType) -> None:
    turns = [(100.0, 102.0), (104.0, 106.0), (108.0, 110.0)]
    stamps = [100.5, 102.0, 103.0, 104.0, 105.5, 109.0, 111.0]
    # in its first turn; at its end; between turns (a file finished after the stop):
    # the turn's end; the second turn's start; within it; the third; after the last.
    assert e2e.node_time(stamps, turns) == [0.5, 2.0, 2.0, 2.0, 3.5, 5.0, 6.0]


def test_interleaved_arrivals_give_the_nodes_own_rate(e2e: ModuleType) -> None:
    # A node classifying 20 images a second of its own time, stopped every 2 s for 2 s.
    own = dispatched(20.0, 300, 0.5, start=0.4)
    turns = [(4.0 * k, 4.0 * k + 2.0) for k in range(10)]
    wall = [4.0 * int(t // 2.0) + t % 2.0 for t in own]  # own time -> wall clock
    assert e2e.steady_rate(wall) < 11.0  # over the wall clock: about half
    assert e2e.steady_rate(e2e.node_time(wall, turns)) == pytest.approx(20.0, rel=0.02)


def test_a_stopped_process_is_seen_stopped_in_every_thread(e2e: ModuleType) -> None:
    child = ("import threading, time; threading.Thread(target=time.sleep, args=(60,), "
             "daemon=True).start(); print(flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"\n"
        assert len(os.listdir(f"/proc/{proc.pid}/task")) == 2
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


def test_dcmtk_delivers_every_sr_and_its_cpu_is_counted(e2e: ModuleType, tmp_path: Path) -> None:
    """The bench's delivery in compiled code: each SR stored by a second storescp, and
    the CPU an SR of both sides, beyond storescu's start, counted."""
    require_tool("storescu")
    require_tool("storescp")
    builder = ReportBuilder(ModelCard(version="1.0.0", architecture="concatenated",
                                      input_size=300, sha256="0" * 64, trained=False))
    result = Classification("normal", {"covid": 0.1, "normal": 0.8, "pneumonia": 0.1})
    source = dx_16bit()
    srs = []
    for i in range(120):
        srs.append(path := tmp_path / f"SR.{i}")
        path.write_bytes(builder.encode(source, result, generate_uid(), generate_uid()))
    send, receive = e2e.dcmtk_delivery_cpu(srs, tmp_path / "pacs")
    # storescp names a file by its SOP class and SOP Instance UID: one for each SR, none
    # left out, and the bench finds them there as it finds those of its runs, and not
    # the evidence images beside them.
    assert len(list((tmp_path / "pacs").iterdir())) == len(srs)
    (tmp_path / "pacs" / f"SC.{generate_uid()}").write_bytes(srs[0].read_bytes())
    assert sorted(e2e.stored_srs(tmp_path / "pacs", 500)) == sorted(
        p for p in (tmp_path / "pacs").iterdir() if p.name.startswith("SR3."))
    assert len(e2e.stored_srs(tmp_path / "pacs", 100)) == 100
    # Each side spends CPU on each SR beyond the first (0.8-1 ms on the machines so far,
    # and some 50 us at the least: storescu reads and parses each file, storescp writes
    # it), and less than a PACS in Python would.
    assert 5e-5 < send < 0.02 and 5e-5 < receive < 0.02
    # The same SR twice is one object at the PACS: the bench stops rather than count a
    # delivery that is not one an SR.
    with pytest.raises(RuntimeError, match="stored 1 of 2"):
        e2e.dcmtk_delivery_cpu([srs[0], srs[0]], tmp_path / "pacs-2")
