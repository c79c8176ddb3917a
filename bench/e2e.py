"""End to end on CPU: C-STORE response -> SR (and evidence image) stored at the PACS,
latency and throughput, with evidence images on and off.

Runs ``dicom-node serve`` (fp32 model: untrained concatenated network at 300 px
unless --model is given) sending its SRs to DCMTK ``storescp``. Measures:

* latency from our C-STORE response to the SR stored at the PACS, for single
  images on an idle node (p50, p95);
* sustained throughput of the pipeline (queue -> preprocess -> inference -> SR
  -> send) over a queue of images: a second node receives the burst before any
  model is installed, then the model is installed and the rate is the steady
  one, the slope of results stored at the PACS against time after the first
  tenth (:func:`steady_rate`; the whole queue from the model's ready moment to
  the last result, which also counts the pipeline's fill and tail, is printed
  beside it) -- with the per-image
  breakdown (queue wait, preprocess, inference, SR, send) from the node's log
  and job store. This is the figure compared with the engine; evidence images
  are on (the node's default) and both objects must have arrived. The same
  queue with evidence images off gives their extra cost per image, in forward
  passes of the bare engine (target: under one), and the figure the target is
  about: sustained with evidence images off over the bare engine, the median of
  three runs (one with ``--quick``), each on a node of its own, each printed. In
  those runs the node and the bare engine take turns of two seconds, the node
  stopped (SIGSTOP) while the engine runs, so that both are measured in the same
  spells of this VM (:func:`interleaved_run`);
* the same burst received while it is being classified ("live"): on this
  2-core machine receiving 8 MB images takes CPU from the network, so this
  figure shows what a PACS pushing at full speed costs;
* the bare engine's throughput on the same model in the same run at the node's
  batch size, measured right before and right after the sustained phase with
  evidence images on (this shared VM's speed drifts by several per cent over
  minutes; that phase's ratio uses their mean) and, stricter, at the engine's best batch
  size of 1..16 (measured afterwards; both ratios printed), called from each of
  the engine's lanes at once (two for OpenVINO on a CPU), as the node's worker
  calls it, so that the engine is measured at its best;
* CPU seconds of the node and of this process (sender and PACS) per phase; with
  evidence images off, the node's thread by thread (named for the bench by
  ``bench/threadnames``), against the most that 0.85 of the engine leaves for
  everything outside the network;
* a reference for what the node spends outside the network: reading and
  preprocessing a source (the floor) and delivering its SR in compiled code (the runs'
  SRs sent by DCMTK ``storescu`` in one association to a second ``storescp`` on the
  same cores, both sides' CPU counted), with the SR's making, its durable write and the
  job store free; and the bound that sets on the ratio if the network cost in the node
  what it costs bare (``least_bound``).

The sender sends files by path without re-encoding them, as a PACS sends from
its archive. ``--int8`` serves the int8 model instead (made by the product's
``model quantize`` path from a network with a fitted head, ``bench/models.py``;
about 3 minutes more), installed with ``--force`` whatever its parity (this bench
measures speed), with bursts three times longer: the int8 engine is several times
faster. Ends with one ``bench:`` line.
Usage: python bench/e2e.py [--quick] [--model DIR] [--int8] [--batch-size N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dicom_node.libraries import configure  # noqa: E402
from dicom_node.loopback import free_port, wait_for_port  # noqa: E402
from dicom_node.tcp import NO_DELAY, send_c_store  # noqa: E402

DX = DigitalXRayImageStorageForPresentation
#: How many runs of the queue with evidence images off give the target's figure (their
#: median); ``--quick``: one.
NO_EVIDENCE_RUNS = 3
#: How long the node, then the bare engine, runs in each turn of :func:`interleaved_run`.
TURN_SECONDS = 2.0
#: After the engine's turn, before the node's: the engine's threads spin a while.
SETTLE_SECONDS = 0.2
#: Fewer of the node's turns than this and its rate is the whole queue's, not a steady
#: one (too few dispatches for a slope).
MIN_STEADY_TURNS = 3
#: The share of a queue's first results the steady rate leaves out (:func:`steady_rate`).
STEADY_SKIP = 0.1
#: How often the bench looks for the PACS's files (their modification times are the
#: figures, so this changes none of them: it only takes CPU from the node it measures).
POLL_SECONDS = 0.5
_BATCH = re.compile(r"batch of (\d+): preprocess (\d+) ms, inference (\d+) ms, SR (\d+) ms")
_READY = re.compile(r"^(\S+ \S+) INFO dicom_node.model_holder: model \S+ ready "
                    r"\(batches of up to (\d+)\)", re.MULTILINE)
# Send files as stored (the bench is a PACS sending from its archive, not an encoder).
configure()


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    return _cpu_seconds(Path(f"/proc/{pid}/stat"))


def thread_on_cpu(pid: int) -> float:
    """Seconds the main thread of a process has run, to the nanosecond
    (``/proc/<pid>/schedstat``): for a one-thread peer's CPU over a short span, where
    :func:`process_cpu`'s ticks of 10 ms are too coarse."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def _cpu_seconds(stat: Path) -> float:
    """User + system CPU seconds in a ``/proc`` stat file (a process's or a thread's)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by the node, the PACS and this process (the sender) between
    start() and stop()."""

    def __init__(self, node_pid: int, pacs_pid: int) -> None:
        self.pids = node_pid, pacs_pid
        self.node = self.pacs = self.bench = 0.0

    def start(self) -> CpuMeter:
        self._start = [process_cpu(pid) for pid in self.pids] + [time.process_time()]
        return self

    def stop(self) -> CpuMeter:
        now = [process_cpu(pid) for pid in self.pids] + [time.process_time()]
        self.node, self.pacs, self.bench = (b - a for a, b in zip(self._start, now, strict=True))
        return self

    def __str__(self) -> str:
        return f"CPU s: node {self.node:.1f}, PACS {self.pacs:.1f}, sender {self.bench:.1f}"


#: Given to the node's process only: names its OS threads after its Python threads.
THREAD_NAMES = ROOT / "bench" / "threadnames"
#: The node's threads by the start of their name (Linux keeps 15 characters). OpenVINO's
#: threads are started by the worker's thread, and take its name; the lanes make the
#: engine's calls, as the bare engine's own lanes do (whose CPU its figure includes).
THREAD_GROUPS = (("inference-work", "network"), ("lane", "network"), ("report", "sr"),
                 ("preprocess", "decode"), ("ThreadPoolExec", "scheduler"),
                 ("feeder", "feeder"))


def _threads(pid: int) -> dict[str, tuple[str, float]]:
    """Thread id -> (OS name, user + system CPU seconds) of a process's living threads."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            found[tid] = (Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip(),
                          _cpu_seconds(Path(f"/proc/{pid}/task/{tid}/stat")))
        except OSError:  # it ended meanwhile
            continue
    return found


class ThreadCpu:
    """The node's CPU seconds between start() and stop(), by group of threads
    (:data:`THREAD_GROUPS`; "other" for the rest). Its threads are read every second,
    so that one ending meanwhile keeps what it had spent by its last reading; what the
    process spent beyond its threads' readings (delivery's association threads, which
    live for a dispatch) is "short-lived"."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.groups: dict[str, float] = {}

    def start(self) -> ThreadCpu:
        self._process = process_cpu(self.pid)
        self._first = _threads(self.pid)
        self._last = dict(self._first)
        self._done = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        while not self._done.wait(1.0):
            self._last.update(_threads(self.pid))

    def stop(self) -> ThreadCpu:
        self._done.set()
        self._reader.join()
        self._last.update(_threads(self.pid))
        spent = process_cpu(self.pid) - self._process
        groups = dict.fromkeys([g for _, g in THREAD_GROUPS] + ["other"], 0.0)
        for tid, (name, cpu) in self._last.items():
            group = next((g for start, g in THREAD_GROUPS if name.startswith(start)), "other")
            groups[group] += cpu - self._first.get(tid, (name, 0.0))[1]
        groups["short-lived"] = max(spent - sum(groups.values()), 0.0)
        self.groups = groups
        return self


class Looker:
    """Called: when each of the source images ``uids`` had its results (the SR, and
    the evidence image when the node makes them) stored at the PACS, by source SOP
    Instance UID; None while any is missing. What it has seen is kept between calls."""

    def __init__(self, folder: Path, node: Node, uids: list[str]) -> None:
        self.folder, self.node, self.uids = folder, node, uids
        self.made: dict[str, tuple[str, ...]] = {}
        self.stored: dict[str, str] = {}  # storescp names a file <modality>.<SOP Instance UID>

    def __call__(self) -> dict[str, float] | None:
        if len(self.made) < len(self.uids):
            self.made.update(self.node.result_uids(self.uids))
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if "." in entry.name:
                    self.stored.setdefault(entry.name.split(".", 1)[1], entry.name)
        if self.done() < len(self.uids):
            return None
        time.sleep(0.05)  # the last file's write is complete
        return {source: max(os.stat(self.folder / self.stored[u]).st_mtime for u in us)
                for source, us in self.made.items()}

    def done(self) -> int:
        """How many of the source images have all their results stored."""
        return sum(all(u in self.stored for u in us) for us in self.made.values())


class TimingPACS:
    """DCMTK ``storescp`` as the PACS (a C peer, as a real PACS would be, and cheap on
    the 2 cores it shares with the node). When an SR was stored is its file's
    modification time; which source image it is for comes from the node's job store."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [shutil.which("storescp") or "storescp", "-aet", "PACS", "-od", str(folder),
             str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "TCP_NODELAY": "1"})
        wait_for_port(self.port)

    def wait_for(self, node: Node, uids: list[str], timeout: float) -> dict[str, float]:
        """Wait until the results (the SR, and the evidence image when the node makes
        them) of the source images ``uids`` are stored; return when each image's last
        one was, by source SOP Instance UID."""
        deadline = time.monotonic() + timeout
        look = self.looker(node, uids)
        # When each file was stored is its modification time, so how often this looks
        # changes none of the figures; it only takes CPU from the node it measures
        # (on 2 cores, looking every 20 ms through a folder of 1,500 files took 3 %;
        # every 100 ms, the job store's rows read each time, 1 %).
        while (found := look()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{look.done()}/{len(uids)} images' results stored")
            time.sleep(POLL_SECONDS)
        return found

    def looker(self, node: Node, uids: list[str]) -> Looker:
        """A look at the PACS's folder for the results of ``uids``, taken when called."""
        return Looker(self.folder, node, uids)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def chest(size: int, seed: int, window: bool = True) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = DX, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality, ds.BodyPartExamined = "Bench", "B", "DX", "CHEST"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if window:
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def chest_files(folder: Path, size: int, seeds: range, window: bool = True
                ) -> list[tuple[str, Path]]:
    """(SOP Instance UID, file) of one synthetic chest DX per seed, written to ``folder``;
    ``window``: with a Window Center and Width (else shown stretched over its values)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for seed in seeds:
        ds = chest(size, seed, window)
        path = folder / f"{seed}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append((str(ds.SOPInstanceUID), path))
    return out


class Sender:
    """One association to the node; returns the time each C-STORE response came back."""

    def __init__(self, port: int) -> None:
        ae = AE(ae_title="STORESCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        ae.add_requested_context(DX, ExplicitVRLittleEndian)
        # TCP_NODELAY, as a DCMTK sender with TCP_NODELAY=1 (tcp.NO_DELAY explains why)
        self.assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE",
                                  evt_handlers=[NO_DELAY])
        if not self.assoc.is_established:
            raise RuntimeError("node refused the association")

    def send(self, path: Path) -> float:
        status = send_c_store(self.assoc, path)
        acked = time.time()
        if int(status.Status) != 0:
            raise RuntimeError(f"node answered 0x{int(status.Status):04X}")
        return acked

    def close(self) -> None:
        self.assoc.release()


def card_of(artifact: Path) -> Any:
    """The model card of ``artifact``."""
    from model import card

    return card.verify(artifact)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def breakdown(data: Path, log: str, uids: list[str]) -> dict[str, float]:
    """Mean seconds per image of each stage for the jobs of ``uids``."""
    batches = [tuple(map(int, m.groups())) for m in _BATCH.finditer(log)]
    with sqlite3.connect(data / "dicom-node.db") as db:
        marks = ",".join("?" * len(uids))
        rows = db.execute(
            f"SELECT j.created_at, j.finished_at, d.delivered_at FROM jobs j "
            f"JOIN deliveries d ON d.job_id = j.id WHERE j.sop_instance_uid IN ({marks})",
            uids).fetchall()

    def ts(text: str) -> float:
        return datetime.fromisoformat(text).timestamp()

    images = sum(b[0] for b in batches) or 1
    preprocess = sum(b[1] for b in batches) / 1000 / images
    inference = sum(b[2] for b in batches) / 1000 / images
    report = sum(b[3] for b in batches) / 1000 / images
    in_node = statistics.mean(ts(f) - ts(c) for c, f, _ in rows)
    send = statistics.mean(ts(d) - ts(f) for _, f, d in rows)
    return {"queue_wait": max(in_node - preprocess - inference - report, 0.0),
            "preprocess": preprocess, "inference": inference, "sr": report, "send": send}


def _engine_input(engine: Any, batch: int) -> np.ndarray:
    """A batch of ``batch`` random images of the engine's input size."""
    return np.random.default_rng(0).random((batch, engine.input_size, engine.input_size, 3),
                                           dtype=np.float32)


def _engine_calls(engine: Any, batch: int, calls: int) -> None:
    """``calls`` forward passes of ``batch`` images, from each of the engine's lanes at
    once (``engine.lanes``: two for OpenVINO on a CPU, as the node's worker drives it),
    so that the bare engine is measured at its best, never between its batches."""
    from concurrent.futures import ThreadPoolExecutor

    x = _engine_input(engine, batch)

    def lane() -> None:
        for _ in range(calls):
            engine.predict(x)

    with ThreadPoolExecutor(max_workers=engine.lanes) as lanes:
        for running in [lanes.submit(lane) for _ in range(engine.lanes)]:
            running.result()


def engine_rate(engine: Any, batch: int, images: int) -> float:
    """The bare engine's images/s at ``batch``, over about ``images`` images a lane."""
    _engine_calls(engine, batch, 1)
    calls = max(2, images // batch)
    start = time.perf_counter()
    _engine_calls(engine, batch, calls)
    return engine.lanes * calls * batch / (time.perf_counter() - start)


def engine_cpu_per_image(engine: Any, batch: int, images: int) -> float:
    """CPU seconds (all of this process's threads) the bare engine spends on one image at
    ``batch``: its share of a saturated CPU, whatever this shared VM's speed is doing."""
    _engine_calls(engine, batch, 1)
    calls = max(2, images // batch)
    start = time.process_time()
    _engine_calls(engine, batch, calls)
    return (time.process_time() - start) / (engine.lanes * calls * batch)


def floor_cpu_per_image(files: list[tuple[str, Path]], size: int) -> float:
    """CPU seconds to read one source file and make its network input, as the node does
    (``preprocess.read_source`` and ``preprocess.dicom_tensor``), on one thread: work no
    DICOM classifier can leave out, before any SR is built or sent."""
    from model import preprocess

    start = time.process_time()
    for _, path in files:
        preprocess.dicom_tensor(preprocess.read_source(path), size)
    return (time.process_time() - start) / len(files)


def stored_srs(folder: Path, most: int) -> list[Path]:
    """Up to ``most`` of the SRs ``storescp`` stored in ``folder``: it names a file by
    its SOP class's modality ("SR3" for a Comprehensive 3D SR), a dot, and its SOP
    Instance UID; the evidence images are "SC" (Secondary Capture)."""
    return sorted(p for p in folder.iterdir() if p.name.split(".", 1)[0].startswith("SR"))[:most]


def dcmtk_delivery_cpu(srs: list[Path], work: Path) -> tuple[float, float]:
    """CPU seconds an SR for DCMTK to send ``srs`` to a PACS in one association
    (``storescu``) and for the PACS to receive them (``storescp``, another one), each
    less what it spends on a single SR (starting, associating, releasing): delivering the
    SRs in compiled code, with the PACS on the same cores as in the runs. The sender's
    CPU is its own resource usage (``os.wait4``: no other child of this process can
    count); the PACS's, one thread, :func:`thread_on_cpu`."""
    if len(srs) < 2:
        raise RuntimeError(f"{len(srs)} SRs to send: at least 2 are needed")
    storescu = shutil.which("storescu") or "storescu"
    pacs = TimingPACS(work)

    def send(paths: list[Path]) -> tuple[float, float]:
        received = thread_on_cpu(pacs.proc.pid)
        proc = subprocess.Popen([storescu, "-R", "-aec", "PACS", "127.0.0.1", str(pacs.port),
                                 *map(str, paths)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env={**os.environ, "TCP_NODELAY": "1"})
        timeout = threading.Timer(300, proc.kill)
        timeout.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timeout.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, proc.args)
        return usage.ru_utime + usage.ru_stime, thread_on_cpu(pacs.proc.pid) - received

    try:
        ones = [send(srs[:1]) for _ in range(3)]
        sent, received = send(srs)
        stored = sum(1 for _ in pacs.folder.iterdir())
    finally:
        pacs.stop()
    if stored < len(srs):  # storescp answers each C-STORE once it has written the file
        raise RuntimeError(f"the DCMTK PACS stored {stored} of {len(srs)} SRs")
    beyond = len(srs) - 1
    return (max(sent - min(s for s, _ in ones), 0.0) / beyond,
            max(received - min(r for _, r in ones), 0.0) / beyond)


class Node:
    """``dicom-node serve`` in a child process, its SRs going to ``pacs``."""

    def __init__(self, work: Path, name: str, pacs: TimingPACS, model: Path | None,
                 batch_size: int | None, evidence: bool = True) -> None:
        self.data = work / name
        self.evidence = evidence
        self.port = free_port()
        self.log_path = work / f"{name}.log"
        command = [sys.executable, "-m", "dicom_node", "serve", "--port", str(self.port),
                   "--data-dir", str(self.data), "--allow-calling-ae", "STORESCU",
                   "--destination", f"PACS@127.0.0.1:{pacs.port}"]
        if model is not None:  # installed as IT staff would, forced past int8 parity
            self.install(model, force=True)
        # The bench's model is untrained: the node serves it because this allows it (speed
        # does not depend on the weights), and every SR says UNVALIDATED MODEL.
        # Its threads named (bench/threadnames), so that their CPU can be read.
        python_path = os.pathsep.join(filter(None, [str(THREAD_NAMES),
                                                    os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": python_path, "DICOM_NODE_MIN_FREE_DISK_MB": "0",
               "DICOM_NODE_ALLOW_UNVALIDATED_MODELS": "true",
               "DICOM_NODE_EVIDENCE_IMAGE": str(evidence).lower()}
        if batch_size is not None:
            env["DICOM_NODE_BATCH_SIZE"] = str(batch_size)
        self.process = subprocess.Popen(command, stdout=self.log_path.open("wb"),
                                        stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        wait_for_port(self.port)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def result_uids(self, uids: list[str]) -> dict[str, tuple[str, ...]]:
        """Source SOP Instance UID -> the SOP Instance UIDs of its SR (and evidence
        image), for the jobs received so far."""
        with sqlite3.connect(self.data / "dicom-node.db", timeout=30) as db:
            marks = ",".join("?" * len(uids))
            rows = db.execute(f"SELECT sop_instance_uid, sr_sop_instance_uid, "
                              f"evidence_sop_instance_uid FROM jobs "
                              f"WHERE sop_instance_uid IN ({marks})", uids).fetchall()
        return {source: (sr, evidence) if self.evidence else (sr,)
                for source, sr, evidence in rows}

    def install(self, artifact: Path, force: bool = False) -> None:
        """``model install``; ``force``: whatever an int8 model's recorded parity."""
        subprocess.run([sys.executable, "-m", "dicom_node", "model", "install", str(artifact),
                        "--allow-unvalidated", "--data-dir", str(self.data),
                        *(["--force"] if force else [])], check=True,
                       cwd=ROOT, stdout=subprocess.DEVNULL)

    def ready_at(self, timeout: float) -> tuple[float, int]:
        """When the worker had the model loaded and warm, and its batch size (from the
        node's log)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = _READY.search(self.log())
            if found:
                ready = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                return ready, int(found.group(2))
            time.sleep(0.2)
        raise TimeoutError("the model never became ready")

    def queue(self, files: list[tuple[str, Path]]) -> None:
        """Send ``files`` over one association (no model yet: each is queued)."""
        sender = Sender(self.port)
        for _, path in files:
            sender.send(path)
        sender.close()

    def serve(self, artifact: Path, batch: int) -> float:
        """Install ``artifact`` (``--force``: whatever an int8 model's recorded parity);
        when the worker had it loaded and warm, at ``batch`` images a batch."""
        self.install(artifact, force=True)
        ready, logged_batch = self.ready_at(600)
        assert logged_batch == batch, (logged_batch, batch)
        return ready

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)


class QueuedRun(NamedTuple):
    """One :func:`queued_run`: its steady rate and the whole queue's (images/s), the
    node's CPU, and the bare engine before and after it."""

    steady: float
    drain: float
    cpu: CpuMeter
    stages: dict[str, float]
    before: float
    after: float


def steady_rate(times: list[float], skip: float = STEADY_SKIP) -> float:
    """Images a second in the steady state: the least-squares slope of the number of
    results stored against when each was, leaving out the first ``skip`` of them.

    A queue drained from the model's ready moment to its last result also counts the
    pipeline's fill (the first batch read, classified and sent before the first result
    lands: 0.3-0.7 s) and its tail (the last results wait for the dispatcher's next
    pass), latency rather than throughput: over 300 images at 20 a second, up to a few
    per cent of the figure. The results land in bursts, one a dispatch; over a regular
    staircase the slope is its rate (within 1 % for dispatches every 0.37-1.3 s,
    ``tests/test_bench_e2e.py``). If the rate changes within the run, the slope is a
    least-squares compromise, not the mean rate."""
    stamps = np.sort(np.asarray(times, dtype=np.float64))
    first = int(len(stamps) * skip)
    counts = np.arange(first + 1, len(stamps) + 1, dtype=np.float64)
    return float(np.polyfit(stamps[first:] - stamps[first], counts, 1)[0])


def queued_run(work: Path, name: str, pacs: TimingPACS, artifact: Path, batch_size: int | None,
               files: list[tuple[str, Path]], engine: Any, node_batch: int) -> QueuedRun:
    """A queue of images, then the model, evidence images on: the pipeline's sustained
    throughput, with the bare engine (same model, the node's batch size) measured in
    this process right before and right after it (this shared VM's speed drifts by
    several per cent over minutes, so the baseline brackets the run it is compared
    with)."""
    node = Node(work, name, pacs, None, batch_size)
    try:
        node.queue(files)
        before = engine_rate(engine, node_batch, 64)
        offset = len(node.log())
        ready = node.serve(artifact, node_batch)
        cpu = CpuMeter(node.process.pid, pacs.proc.pid).start()
        uids = [uid for uid, _ in files]
        arrived = pacs.wait_for(node, uids, 1800)
        drain = len(files) / (max(arrived.values()) - ready)
        cpu.stop()
        after = engine_rate(engine, node_batch, 64)
        time.sleep(0.5)
        stages = breakdown(node.data, node.log()[offset:], uids)
    finally:
        node.stop()
        shutil.rmtree(node.data, ignore_errors=True)  # its spool: 8 MB an image
    return QueuedRun(steady_rate(list(arrived.values())), drain, cpu, stages, before, after)


class InterleavedRun(NamedTuple):
    """One :func:`interleaved_run`: the node's steady rate over its own turns, the bare
    engine's over its turns (images/s), the node's CPU, and how many turns the node had
    (the engine one fewer, or one if the queue was done in the node's first)."""

    steady: float
    engine: float
    cpu: CpuMeter
    threads: ThreadCpu
    stages: dict[str, float]
    turns: int
    #: Fewer than :data:`MIN_STEADY_TURNS` turns (a short queue, a fast GPU): the rate is
    #: the whole queue's over the node's turns, not a steady one.
    whole_queue: bool

    @property
    def ratio(self) -> float:
        """The node's steady rate over the engine's in the same spells: the target's
        figure."""
        return self.steady / self.engine


def _stopped(pid: int) -> bool:
    """Whether every thread of process ``pid`` is stopped (SIGSTOP has taken)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:  # it ended meanwhile
            continue
        if stat[stat.rindex(")") + 2] not in "Tt":
            return False
    return True


def engine_turn(engine: Any, batch: int, seconds: float) -> tuple[int, float]:
    """The bare engine called from each of its lanes at once (as :func:`_engine_calls`)
    until ``seconds`` have passed: (images classified, seconds from the first call's
    start to the last one's end). One lane's call alone fills every stream, so the
    lanes' last calls ending apart leave no stream idle (a lane's rate over its own time,
    summed, would count that tail twice)."""
    from concurrent.futures import ThreadPoolExecutor

    x = _engine_input(engine, batch)

    def lane() -> tuple[int, float, float]:
        calls, begun = 0, time.perf_counter()
        while time.perf_counter() < deadline:
            engine.predict(x)
            calls += 1
        return calls * batch, begun, time.perf_counter()

    with ThreadPoolExecutor(max_workers=engine.lanes) as lanes:
        deadline = time.perf_counter() + seconds
        done = [f.result() for f in [lanes.submit(lane) for _ in range(engine.lanes)]]
    return (sum(n for n, _, _ in done),
            max(end for _, _, end in done) - min(begun for _, begun, _ in done))


def node_time(stamps: list[float], turns: list[tuple[float, float]]) -> list[float]:
    """Each wall-clock moment in ``stamps`` as seconds of the node's own turns
    (``turns``: its (start, end), in order) before it; a moment between two turns (a
    file the PACS finished writing after the node was stopped) counts as its turn's end."""
    starts = np.array([start for start, _ in turns])
    lengths = np.array([end - start for start, end in turns])
    before = np.concatenate([[0.0], np.cumsum(lengths)])
    out = []
    for stamp in stamps:
        turn = max(int(np.searchsorted(starts, stamp, side="right")) - 1, 0)
        out.append(float(before[turn] + min(max(stamp - starts[turn], 0.0), lengths[turn])))
    return out


def interleaved_run(work: Path, name: str, pacs: TimingPACS, artifact: Path,
                    batch_size: int | None, files: list[tuple[str, Path]], engine: Any,
                    node_batch: int) -> InterleavedRun:
    """A queue of images with evidence images off, then the model; the node and the bare
    engine (same model, the node's batch size, in this process) take turns of
    :data:`TURN_SECONDS` until every result is stored, the node stopped (SIGSTOP) while
    the engine runs. Both are measured in the same spells of this VM, whose speed moves
    by up to a fifth within two minutes: an engine measured before and after a run can
    miss the spell the run had (bracketed runs of the same code within one hour gave
    0.77-0.92). The node's rate is :func:`steady_rate` over the time of its own turns."""
    node = Node(work, name, pacs, None, batch_size, evidence=False)
    pid = node.process.pid
    try:
        node.queue(files)
        engine_turn(engine, node_batch, 1.0)  # warm, as the node's model is when ready
        uids = [uid for uid, _ in files]
        look = pacs.looker(node, uids)
        # Each job has its results' UIDs from when it was received: read now, so that
        # looking while the node is stopped never reads its job store.
        first = look()
        assert first is None and len(look.made) == len(uids), len(look.made)
        offset = len(node.log())
        ready = node.serve(artifact, node_batch)
        cpu = CpuMeter(pid, pacs.proc.pid).start()
        threads = ThreadCpu(pid).start()
        turns: list[tuple[float, float]] = []
        images, seconds = 0, 0.0
        start = ready
        deadline = time.monotonic() + 1800
        while True:
            time.sleep(max(start + TURN_SECONDS - time.time(), 0.0))
            if node.process.poll() is not None:
                raise RuntimeError(f"the node exited ({node.process.returncode})")
            os.kill(pid, signal.SIGSTOP)
            stopped_by = time.monotonic() + 5
            while not _stopped(pid):
                if time.monotonic() > stopped_by:
                    raise RuntimeError("the node did not stop within 5 s")
                time.sleep(0.001)
            turns.append((start, time.time()))
            arrived = look()
            if arrived is None and time.monotonic() > deadline:
                raise TimeoutError(f"{look.done()}/{len(uids)} images' results stored")
            if arrived is None or not images:  # the engine has a turn at least
                classified, took = engine_turn(engine, node_batch, TURN_SECONDS)
                images, seconds = images + classified, seconds + took
                # OpenVINO's threads spin for tens of milliseconds after their last
                # call (docs/performance.md): not into the node's turn.
                time.sleep(SETTLE_SECONDS)
            os.kill(pid, signal.SIGCONT)
            if arrived is not None:
                break
            start = time.time()
        threads.stop()
        cpu.stop()
        time.sleep(0.5)
        stages = breakdown(node.data, node.log()[offset:], uids)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)  # never leave it stopped
        node.stop()
        shutil.rmtree(node.data, ignore_errors=True)  # its spool: 8 MB an image
    own = node_time(list(arrived.values()), turns)
    whole_queue = len(turns) < MIN_STEADY_TURNS
    # From the ready moment (the start of the node's first turn) to its last result.
    rate = len(own) / max(own) if whole_queue else steady_rate(own)
    return InterleavedRun(rate, images / seconds, cpu, threads, stages, len(turns),
                          whole_queue)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    try:
        run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # about 4 GB of images and spools


def run(work: Path) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 single images, bursts of 16")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--image-size", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="the node's batch_size (default: the node's own default)")
    parser.add_argument("--int8", action="store_true",
                        help="serve the int8 model made from a fitted 300 px network")
    args = parser.parse_args()
    singles, burst = (5, 16) if args.quick else (20, 100)
    artifact = args.model
    if args.int8 and artifact is not None:
        sys.exit("--int8 makes its own model; quantize yours with 'dicom-node model "
                 "quantize' and pass the result as --model")
    if args.int8 or (artifact is not None and card_of(artifact).precision == "int8"):
        burst *= 3
    if args.int8:
        import models  # bench/models.py

        made = models.int8_models(work / "int8-models")
        artifact = made.int8
        print(f"int8 model made in {made.fit_s + made.quantize_s:.0f} s", flush=True)
    elif artifact is None:
        from model import card, network

        artifact = work / "model"
        card.save_artifact(network.build("concatenated", 300, seed=0), artifact,
                           {"version": "bench", "architecture": "concatenated",
                            "input_size": 300, "trained": False})
    files = work / "images"
    warm = chest_files(files, args.image_size, range(1))
    single_files = chest_files(files, args.image_size, range(1, singles + 1))
    live_files = chest_files(files, args.image_size, range(1000, 1000 + burst))
    queued_files = chest_files(files, args.image_size, range(2000, 2000 + burst))
    plain_files = chest_files(files, args.image_size, range(3000, 3000 + burst))
    pacs = TimingPACS(work / "pacs")

    # Phase 1 and 2: a node with the model: single-image latency, then a live burst.
    node = Node(work, "live", pacs, artifact, args.batch_size)
    try:
        sender = Sender(node.port)
        sender.send(warm[0][1])
        pacs.wait_for(node, [warm[0][0]], 300)  # model loaded and traced
        _, node_batch = node.ready_at(60)  # as the node chose it (on a GPU, by its memory)
        latencies = []
        for uid, path in single_files:
            acked = sender.send(path)
            latencies.append(pacs.wait_for(node, [uid], 120)[uid] - acked)
            time.sleep(0.3)  # idle again
        print(f"latency, single image on an idle node ({singles}): p50 "
              f"{percentile(latencies, 50) * 1000:.0f} ms, p95 "
              f"{percentile(latencies, 95) * 1000:.0f} ms", flush=True)

        cpu_live = CpuMeter(node.process.pid, pacs.proc.pid).start()
        start = time.time()
        for _, path in live_files:
            sender.send(path)
        arrived = pacs.wait_for(node, [uid for uid, _ in live_files], 1800)
        live = burst / (max(arrived.values()) - start)
        cpu_live.stop()
        sender.close()
    finally:
        node.stop()
    print(f"live, burst of {burst} received while classified: {live:.2f} img/s ({cpu_live})",
          flush=True)

    # Phase 3: a queue of images, then the model: the pipeline's sustained throughput,
    # with the bare engine (same model, the node's batch size) measured in this process
    # right before and right after it: this shared VM's speed drifts by several per cent
    # over minutes, so the baseline brackets the run it is compared with.
    from model.engine import Engine

    engine = Engine(artifact, batch_size=max(16, node_batch))
    engine.warmup()
    try:
        queued = queued_run(work, "queued", pacs, artifact, args.batch_size, queued_files,
                            engine, node_batch)
        sustained, cpu_queued, stages = queued.steady, queued.cpu, queued.stages
        before, after = queued.before, queued.after
        # The target's figure: this VM's speed moves by up to a fifth within two
        # minutes, so the node and the engine take turns (interleaved_run); the median
        # of NO_EVIDENCE_RUNS runs, each on a node of its own and each printed, is the
        # figure, and the median run gives the details below.
        plain_runs = []
        for run_number in range(1 if args.quick else NO_EVIDENCE_RUNS):
            plain_runs.append(one := interleaved_run(
                work, f"queued-no-evidence-{run_number}", pacs, artifact, args.batch_size,
                plain_files, engine, node_batch))
            how = "the whole queue" if one.whole_queue else "steady"
            print(f"  evidence off, run {run_number + 1}: {how} {one.steady:.2f} img/s over "
                  f"the node's {one.turns} turns, engine {one.engine:.2f} img/s over its "
                  f"own: ratio {one.ratio:.3f}", flush=True)
    finally:
        pacs.stop()
    plain_runs.sort(key=lambda one: one.ratio)
    plain_ratios = [one.ratio for one in plain_runs]
    median = plain_runs[len(plain_runs) // 2]  # the median run (of an odd number)
    plain, cpu_plain, threads, plain_stages = (
        median.steady, median.cpu, median.threads, median.stages)
    plain_bare = median.engine
    parts = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in stages.items())
    print(f"sustained, queue of {burst}, evidence images on: {sustained:.2f} img/s steady "
          f"({queued.drain:.2f} over the whole queue; {cpu_queued}); per image: {parts}",
          flush=True)
    bare = (before + after) / 2
    # The evidence image's extra cost per image (maps, render, Secondary Capture, its
    # send) in forward passes: each run's time per image in units of the bare engine's
    # time per image measured around it (evidence on) or beside it (off), so drift of
    # the machine's speed cancels.
    extra = bare / sustained - plain_bare / plain
    plain_parts = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in plain_stages.items())
    print(f"sustained, queue of {burst}, evidence images off: {plain:.2f} img/s (engine "
          f"{plain_bare:.2f} img/s in its turns; CPU s: node {cpu_plain.node:.1f}, PACS "
          f"{cpu_plain.pacs:.1f}); per image: {plain_parts}; "
          f"evidence image extra cost {extra:.2f} forward passes per image (target < 1)",
          flush=True)
    # On a saturated CPU the pipeline can reach at most the engine's share of the CPU
    # time per image: (engine's CPU s per image) / (node's CPU s per image).
    engine_cpu = engine_cpu_per_image(engine, node_batch, 64)
    node_cpu = cpu_plain.node / burst
    print(f"  evidence off, CPU per image: node {node_cpu * 1000:.0f} ms, of which the "
          f"engine's about {engine_cpu * 1000:.0f} ms (its CPU time an image, measured bare): "
          f"on a saturated CPU the ratio cannot pass {min(1.0, engine_cpu / node_cpu):.2f}",
          flush=True)
    # Thread by thread: what the node spends outside the network, against what the target
    # leaves it. At 0.85 of the engine, with the CPU as busy as under the bare engine and
    # the network costing in the node what it costs bare, everything else may take at
    # most engine_cpu / 0.85 - engine_cpu an image.
    by_thread = {group: seconds / burst for group, seconds in threads.groups.items()}
    outside = sum(v for group, v in by_thread.items() if group != "network")
    budget = engine_cpu / 0.85 - engine_cpu
    print("  evidence off, the node's CPU an image by thread: "
          + ", ".join(f"{group} {v * 1000:.1f} ms" for group, v in by_thread.items())
          + f"; outside the network {outside * 1000:.1f} ms, where 0.85 leaves at most "
          f"{budget * 1000:.1f} ms", flush=True)
    # The least the pipeline can cost: reading the source and making the input. Even with
    # the SR, the job store and the send free, the ratio cannot pass this bound.
    floor = floor_cpu_per_image(plain_files, engine.input_size)
    floor_bound = min(1.0, engine_cpu / (engine_cpu + floor))
    print(f"  reading and preprocessing alone: {floor * 1000:.1f} ms CPU an image; with "
          f"everything else free the ratio could not pass {floor_bound:.2f}", flush=True)
    # Sources without a window are stretched over their values: that range must not cost
    # a pass over every pixel's bit pattern (docs/performance.md).
    unwindowed = floor_cpu_per_image(
        chest_files(work / "no-window", args.image_size, range(4000, 4016), window=False),
        engine.input_size)
    print(f"  the same for images without a window: {unwindowed * 1000:.1f} ms", flush=True)
    # Delivering the SRs in compiled code, the PACS on these cores as in the runs: with
    # the floor, what a node would spend outside the network here if its delivery cost
    # what DCMTK's does and the SR's making, its durable write and the job store nothing.
    srs = stored_srs(work / "pacs", burst)
    send_cpu, receive_cpu = dcmtk_delivery_cpu(srs, work / "dcmtk-pacs")
    least = floor + send_cpu + receive_cpu
    least_bound = min(1.0, engine_cpu / (engine_cpu + least))
    print(f"  sending the SRs in compiled code (DCMTK storescu, {len(srs)} in one "
          f"association): {send_cpu * 1000:.2f} ms CPU an SR, the PACS receiving them "
          f"{receive_cpu * 1000:.2f} ms; with reading and preprocessing {least * 1000:.1f} ms "
          f"an image: with all else free, and the network costing in the node what it "
          f"costs bare, the ratio could not pass {least_bound:.3f}",
          flush=True)
    print(f"  bare engine at the node's batch size ({node_batch}): {before:.2f} img/s "
          f"before, {after:.2f} after", flush=True)
    rates = {}
    for batch in (1, 2, 4, 8, 16):
        rates[batch] = engine_rate(engine, batch, 32 if args.quick else 64)
        print(f"  bare engine, batch {batch}: {rates[batch]:.2f} img/s", flush=True)
    best_batch = max(rates, key=rates.__getitem__)
    ratio, best_ratio = sustained / bare, sustained / rates[best_batch]
    print(f"bare engine at the node's batch size ({node_batch}): {bare:.2f} img/s (mean of "
          f"before and after); sustained / engine = {ratio:.2f} with evidence images on; "
          f"against the engine's best batch size ({best_batch}, {rates[best_batch]:.2f} "
          f"img/s, measured afterwards): {best_ratio:.2f}; live / engine = "
          f"{live / bare:.2f}; with evidence images off (the target >= 0.85): "
          f"{plain / plain_bare:.3f}, the median of {len(plain_ratios)} "
          f"({', '.join(f'{r:.3f}' for r in plain_ratios)}; node and engine taking "
          f"turns of {TURN_SECONDS:.0f} s); p50 target <= 1 s")
    print(f"model: {engine.card.name} {engine.card.display_version} ({engine.backend} on "
          f"{engine.device})")
    print(f"bench: latency_p50_s={percentile(latencies, 50):.3f} "
          f"latency_p95_s={percentile(latencies, 95):.3f} sustained_img_s={sustained:.3f} "
          f"engine_img_s={bare:.3f} engine_before_img_s={before:.3f} "
          f"engine_after_img_s={after:.3f} ratio={ratio:.3f} "
          f"engine_best_img_s={rates[best_batch]:.3f} "
          f"ratio_to_best={best_ratio:.3f} live_img_s={live:.3f} live_ratio={live / bare:.3f} "
          f"no_evidence_img_s={plain:.3f} no_evidence_ratio={plain / plain_bare:.3f} "
          f"no_evidence_runs={len(plain_ratios)} no_evidence_ratio_min={plain_ratios[0]:.3f} "
          f"no_evidence_ratio_max={plain_ratios[-1]:.3f} "
          f"no_evidence_engine_img_s={plain_bare:.3f} no_evidence_turns={median.turns} "
          f"drain_img_s={queued.drain:.3f} "
          f"evidence_extra_forward={extra:.3f} "
          f"int8={int(engine.backend == 'openvino-int8')} batch={node_batch} "
          f"node_cpu_s_per_img={cpu_queued.node / burst:.3f} "
          f"no_evidence_node_cpu_s_per_img={node_cpu:.3f} "
          f"no_evidence_cpu_bound={min(1.0, engine_cpu / node_cpu):.3f} "
          f"engine_cpu_ms_per_img={engine_cpu * 1000:.1f} floor_cpu_ms_per_img={floor * 1000:.1f} "
          f"floor_bound={floor_bound:.3f} no_window_floor_cpu_ms_per_img={unwindowed * 1000:.1f} "
          f"outside_network_cpu_ms={outside * 1000:.1f} outside_budget_ms={budget * 1000:.1f} "
          f"dcmtk_send_cpu_ms={send_cpu * 1000:.2f} pacs_receive_cpu_ms={receive_cpu * 1000:.2f} "
          f"least_cpu_ms_per_img={least * 1000:.1f} least_bound={least_bound:.3f} "
          + " ".join(f"{group.replace('-', '_')}_cpu_ms={v * 1000:.1f}"
                     for group, v in by_thread.items()) + " "
          + " ".join(f"{k}_ms={v * 1000:.1f}" for k, v in stages.items()))


if __name__ == "__main__":
    main()
