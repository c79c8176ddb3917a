"""End to end on CPU: C-STORE response -> SR stored at the PACS, latency and throughput.

Runs ``dicom-node serve`` (fp32 model: untrained concatenated network at 300 px
unless --model is given) sending its SRs to a pynetdicom Storage SCP in this
process that timestamps every arrival. Measures:

* latency from our C-STORE response to the SR stored at the PACS, for single
  images on an idle node (p50, p95);
* sustained throughput for a burst of images, with the per-image breakdown
  (queue wait, preprocess, inference, SR, send) from the node's log and job store;
* the bare engine's throughput on the same model in the same run, and the ratio.

Ends with one ``bench:`` line. Usage: python bench/e2e.py [--quick] [--model DIR]
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
from pynetdicom import AE, AllStoragePresentationContexts, evt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dicom_node.loopback import free_port, wait_for_port  # noqa: E402

DX = "1.2.840.10008.5.1.4.1.1.1.1"
_BATCH = re.compile(r"batch of (\d+): preprocess (\d+) ms, inference (\d+) ms, SR (\d+) ms")






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
    return ds


class Sender:
    """One association to the node; returns the time each C-STORE response came back."""

    def __init__(self, port: int) -> None:
        ae = AE(ae_title="STORESCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        ae.add_requested_context(DX, ExplicitVRLittleEndian)
        self.assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")
        if not self.assoc.is_established:
            raise RuntimeError("node refused the association")

    def send(self, ds: Dataset) -> float:
        status = self.assoc.send_c_store(ds)
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


def engine_throughput(artifact: Path, size: int, batch: int, repeat: int) -> float:
    from model.engine import Engine

    engine = Engine(artifact, batch_size=batch)
    engine.warmup()
    x = np.random.default_rng(0).random((batch, size, size, 3), dtype=np.float32)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        engine.predict(x)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 single images, burst of 16")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--image-size", type=int, default=2048)
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
    pacs = TimingPACS()
    port = free_port()
    log_path = work / "node.log"
    node = subprocess.Popen(
        [sys.executable, "-m", "dicom_node", "serve", "--port", str(port),
         "--data-dir", str(work / "var"), "--allow-calling-ae", "STORESCU",
         "--model", str(artifact), "--destination", f"PACS@127.0.0.1:{pacs.port}"],
        stdout=log_path.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT,
        env={**os.environ, "DICOM_NODE_MIN_FREE_DISK_MB": "0"},
    )
    try:
        wait_for_port(port)
        sender = Sender(port)
        warm = chest(args.image_size, 0)
        sender.send(warm)
        pacs.wait_for([str(warm.SOPInstanceUID)], 300)  # model loaded and traced

        latencies = []
        for i in range(singles):
            ds = chest(args.image_size, i + 1)
            acked = sender.send(ds)
            pacs.wait_for([str(ds.SOPInstanceUID)], 120)
            latencies.append(pacs.arrivals[str(ds.SOPInstanceUID)] - acked)
            time.sleep(0.3)  # idle again
        print(f"latency, single image on an idle node ({singles}): p50 "
              f"{percentile(latencies, 50) * 1000:.0f} ms, p95 "
              f"{percentile(latencies, 95) * 1000:.0f} ms", flush=True)

        images = [chest(args.image_size, 1000 + i) for i in range(burst)]
        offset = len(log_path.read_text(errors="replace"))
        start = time.time()
        for ds in images:
            sender.send(ds)
        uids = [str(ds.SOPInstanceUID) for ds in images]
        pacs.wait_for(uids, 1800)
        elapsed = max(pacs.arrivals[u] for u in uids) - start
        sustained = burst / elapsed
        sender.close()
        time.sleep(0.5)
        stages = breakdown(work / "var", log_path.read_text(errors="replace")[offset:], uids)
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=120)
        pacs.stop()
    parts = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in stages.items())
    print(f"sustained, burst of {burst}: {sustained:.2f} img/s; per image: {parts}", flush=True)
    bare = engine_throughput(artifact, input_size, 16, 2 if args.quick else 4)
    ratio = sustained / bare
    print(f"bare engine (batch 16): {bare:.2f} img/s; sustained / engine = {ratio:.2f} "
          f"(targets: p50 <= 1 s, sustained >= 0.85 of the engine)")
    print(f"bench: latency_p50_s={percentile(latencies, 50):.3f} "
          f"latency_p95_s={percentile(latencies, 95):.3f} sustained_img_s={sustained:.3f} "
          f"engine_img_s={bare:.3f} ratio={ratio:.3f} "
          + " ".join(f"{k}_ms={v * 1000:.1f}" for k, v in stages.items()))


if __name__ == "__main__":
    main()
