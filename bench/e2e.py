"""End to end on CPU: C-STORE response -> SR stored at the PACS, latency and throughput.

Runs ``dicom-node serve`` (fp32 model: untrained concatenated network at 300 px
unless --model is given) sending its SRs to a pynetdicom Storage SCP in this
process that timestamps every arrival. Measures:

* latency from our C-STORE response to the SR stored at the PACS, for single
  images on an idle node (p50, p95);
* sustained throughput of the pipeline (queue -> preprocess -> inference -> SR
  -> send) over a queue of images: a second node receives the burst before any
  model is installed, then the model is installed and the clock runs from the
  moment it is ready to the last SR stored at the PACS -- with the per-image
  breakdown (queue wait, preprocess, inference, SR, send) from the node's log
  and job store. This is the figure compared with the engine;
* the same burst received while it is being classified ("live"): on this
  2-core machine receiving 8 MB images takes CPU from the network, so this
  figure shows what a PACS pushing at full speed costs;
* the bare engine's best throughput over batch sizes 1..16 on the same model in
  the same run (so batching choices cannot flatter the ratio), and the ratio;
* CPU seconds of the node and of this process (sender and PACS) per phase.

The sender sends files by path without re-encoding them, as a PACS sends from
its archive. Ends with one ``bench:`` line.
Usage: python bench/e2e.py [--quick] [--model DIR] [--batch-size N]
"""

from __future__ import annotations

import argparse
import os
import re
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
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dicom_node.loopback import free_port, wait_for_port  # noqa: E402

DX = "1.2.840.10008.5.1.4.1.1.1.1"
_BATCH = re.compile(r"batch of (\d+): preprocess (\d+) ms, inference (\d+) ms, SR (\d+) ms")
_READY = re.compile(r"^(\S+ \S+) INFO dicom_node.worker: model \S+ ready", re.MULTILINE)
# Send files as stored (the bench is a PACS sending from its archive, not an encoder).
_config.STORE_SEND_CHUNKED_DATASET = True


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by the node and by this process between start() and stop()."""

    def __init__(self, node_pid: int) -> None:
        self.node_pid = node_pid
        self.node = self.bench = 0.0

    def start(self) -> CpuMeter:
        self._node0, self._bench0 = process_cpu(self.node_pid), time.process_time()
        return self

    def stop(self) -> CpuMeter:
        self.node = process_cpu(self.node_pid) - self._node0
        self.bench = time.process_time() - self._bench0
        return self
class TimingPACS:
    """A Storage SCP that records when the SR for each source image arrived."""

    def __init__(self) -> None:
        self.port = free_port()
        self.arrivals: dict[str, float] = {}
        self.arrived = threading.Condition()
        self._ae = AE(ae_title="PACS")
        self._ae.supported_contexts = AllStoragePresentationContexts
        self._ae.start_server(("127.0.0.1", self.port), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: Any) -> int:
        now = time.time()
        ds = event.dataset
        source = (ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
                  .ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        with self.arrived:
            self.arrivals[str(source)] = now
            self.arrived.notify_all()
        return 0

    def wait_for(self, uids: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.arrived:
            while not all(u in self.arrivals for u in uids):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{sum(u in self.arrivals for u in uids)}/{len(uids)} SRs")
                self.arrived.wait(left)

    def stop(self) -> None:
        self._ae.shutdown()


def chest(size: int, seed: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = DX, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality, ds.BodyPartExamined = "Bench", "B", "DX", "CHEST"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def chest_files(folder: Path, size: int, seeds: range) -> list[tuple[str, Path]]:
    """(SOP Instance UID, file) of one synthetic chest DX per seed, written to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for seed in seeds:
        ds = chest(size, seed)
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
        self.assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")
        if not self.assoc.is_established:
            raise RuntimeError("node refused the association")

    def send(self, path: Path) -> float:
        status = self.assoc.send_c_store(path)
        acked = time.time()
        if int(status.Status) != 0:
            raise RuntimeError(f"node answered 0x{int(status.Status):04X}")
        return acked

    def close(self) -> None:
        self.assoc.release()


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


def engine_throughput(artifact: Path, size: int, images: int) -> tuple[float, int]:
    """The bare engine's best images/s over batch sizes 1..16 (median of about
    ``images`` images' worth of calls each), and that batch size."""
    from model.engine import Engine

    engine = Engine(artifact, batch_size=16)
    engine.warmup()
    best = (0.0, 0)
    for batch in (1, 2, 4, 8, 16):
        x = np.random.default_rng(0).random((batch, size, size, 3), dtype=np.float32)
        engine.predict(x)
        times = []
        for _ in range(max(2, images // batch)):
            start = time.perf_counter()
            engine.predict(x)
            times.append(time.perf_counter() - start)
        rate = batch / statistics.median(times)
        print(f"  bare engine, batch {batch}: {rate:.2f} img/s", flush=True)
        best = max(best, (rate, batch))
    return best


class Node:
    """``dicom-node serve`` in a child process, its SRs going to ``pacs``."""

    def __init__(self, work: Path, name: str, pacs: TimingPACS, model: Path | None,
                 batch_size: int | None) -> None:
        self.data = work / name
        self.port = free_port()
        self.log_path = work / f"{name}.log"
        command = [sys.executable, "-m", "dicom_node", "serve", "--port", str(self.port),
                   "--data-dir", str(self.data), "--allow-calling-ae", "STORESCU",
                   "--destination", f"PACS@127.0.0.1:{pacs.port}"]
        if model is not None:
            command += ["--model", str(model)]
        env = {**os.environ, "DICOM_NODE_MIN_FREE_DISK_MB": "0"}
        if batch_size is not None:
            env["DICOM_NODE_BATCH_SIZE"] = str(batch_size)
        self.process = subprocess.Popen(command, stdout=self.log_path.open("wb"),
                                        stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        wait_for_port(self.port)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def install(self, artifact: Path) -> None:
        subprocess.run([sys.executable, "-m", "dicom_node", "model", "install", str(artifact),
                        "--data-dir", str(self.data)], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)

    def ready_at(self, timeout: float) -> float:
        """When the worker had the model loaded and warm (from the node's log)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = _READY.search(self.log())
            if found:
                return datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            time.sleep(0.2)
        raise TimeoutError("the model never became ready")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 single images, bursts of 16")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--image-size", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="the node's batch_size (default: the node's own default)")
    args = parser.parse_args()
    singles, burst = (5, 16) if args.quick else (20, 100)
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    artifact = args.model
    if artifact is None:
        from model import card, network

        artifact = work / "model"
        card.save_artifact(network.build("concatenated", 300, seed=0), artifact,
                           {"version": "bench", "architecture": "concatenated",
                            "input_size": 300, "trained": False})
    from model.card import read_card

    input_size = read_card(artifact).input_size
    files = work / "images"
    warm = chest_files(files, args.image_size, range(1))
    single_files = chest_files(files, args.image_size, range(1, singles + 1))
    live_files = chest_files(files, args.image_size, range(1000, 1000 + burst))
    queued_files = chest_files(files, args.image_size, range(2000, 2000 + burst))
    pacs = TimingPACS()

    # Phase 1 and 2: a node with the model: single-image latency, then a live burst.
    node = Node(work, "live", pacs, artifact, args.batch_size)
    try:
        sender = Sender(node.port)
        sender.send(warm[0][1])
        pacs.wait_for([warm[0][0]], 300)  # model loaded and traced
        latencies = []
        for uid, path in single_files:
            acked = sender.send(path)
            pacs.wait_for([uid], 120)
            latencies.append(pacs.arrivals[uid] - acked)
            time.sleep(0.3)  # idle again
        print(f"latency, single image on an idle node ({singles}): p50 "
              f"{percentile(latencies, 50) * 1000:.0f} ms, p95 "
              f"{percentile(latencies, 95) * 1000:.0f} ms", flush=True)

        cpu_live = CpuMeter(node.process.pid).start()
        start = time.time()
        for _, path in live_files:
            sender.send(path)
        live_uids = [uid for uid, _ in live_files]
        pacs.wait_for(live_uids, 1800)
        live = burst / (max(pacs.arrivals[u] for u in live_uids) - start)
        cpu_live.stop()
        sender.close()
    finally:
        node.stop()
    print(f"live, burst of {burst} received while classified: {live:.2f} img/s "
          f"(CPU s: node {cpu_live.node:.1f}, sender+PACS {cpu_live.bench:.1f})", flush=True)

    # Phase 3: a queue of images, then the model: the pipeline's sustained throughput.
    node = Node(work, "queued", pacs, None, args.batch_size)
    try:
        sender = Sender(node.port)
        for _, path in queued_files:
            sender.send(path)
        sender.close()
        offset = len(node.log())
        node.install(artifact)
        ready = node.ready_at(600)
        cpu_queued = CpuMeter(node.process.pid).start()
        uids = [uid for uid, _ in queued_files]
        pacs.wait_for(uids, 1800)
        sustained = burst / (max(pacs.arrivals[u] for u in uids) - ready)
        cpu_queued.stop()
        time.sleep(0.5)
        stages = breakdown(node.data, node.log()[offset:], uids)
    finally:
        node.stop()
        pacs.stop()
    parts = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in stages.items())
    print(f"sustained, queue of {burst}: {sustained:.2f} img/s (CPU s: node "
          f"{cpu_queued.node:.1f}, PACS {cpu_queued.bench:.1f}); per image: {parts}",
          flush=True)
    bare, best_batch = engine_throughput(artifact, input_size, 32 if args.quick else 64)
    ratio = sustained / bare
    print(f"bare engine, best (batch {best_batch}): {bare:.2f} img/s; sustained / engine = "
          f"{ratio:.2f}, live / engine = {live / bare:.2f} "
          f"(targets: p50 <= 1 s, sustained >= 0.85 of the engine)")
    print(f"bench: latency_p50_s={percentile(latencies, 50):.3f} "
          f"latency_p95_s={percentile(latencies, 95):.3f} sustained_img_s={sustained:.3f} "
          f"engine_img_s={bare:.3f} ratio={ratio:.3f} live_img_s={live:.3f} "
          f"live_ratio={live / bare:.3f} node_cpu_s_per_img={cpu_queued.node / burst:.3f} "
          + " ".join(f"{k}_ms={v * 1000:.1f}" for k, v in stages.items()))


if __name__ == "__main__":
    main()
