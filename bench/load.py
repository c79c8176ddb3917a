"""Load: 8 DCMTK storescu processes at once against the node and against DCMTK, same
images, same run.

Each of 8 senders (DCMTK ``storescu``, TCP_NODELAY=1, one association each) sends its
own 100 synthetic 12-bit chest DX images of 1 to 10 MB (sizes spread evenly, each
image its own UIDs), all 8 started together, to:

* DCMTK ``storescp --fork`` (a child process per association, 128 KiB PDU: the PDU the
  node offers) -- the reference: no fsync, no decode, no database;
* the node (``dicom-node serve``, no model: the receive path alone, ``max_associations``
  10): full decode, intake, sha256, fsync of file and directory, job row committed.

Prints images/s and MB/s of each, their ratio, the node's peak resident memory, and
"acknowledged N, stored N, queued N" (storescu's success responses, the node's spool
files, its queued jobs), which must be equal. ``--quick``: 8 x 12 images. Needs
about 2 x the images' size in temporary disk (--quick: 1.2 GB; else 9 GB).
Ends with one ``bench:`` line.
Usage: python bench/load.py [--quick] [--senders N] [--images N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dicom_node.loopback import free_port, wait_for_port  # noqa: E402

DX = "1.2.840.10008.5.1.4.1.1.1.1"
CALLING = "STORESCU"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def make_images(folder: Path, senders: int, per_sender: int) -> list[list[Path]]:
    """Per sender, ``per_sender`` DX files of 1 to 10 MB (square 12-bit images)."""
    rng = np.random.default_rng(0)
    sizes_mb = np.linspace(1, 10, per_sender)
    pool = rng.integers(0, 4096, size=10 * 2**20 // 2 + 4096, dtype=np.uint16)
    out = []
    for s in range(senders):
        mine = []
        for i, mb in enumerate(sizes_mb):
            side = int(np.sqrt(mb * 2**20 / 2)) // 2 * 2
            ds = Dataset()
            ds.SOPClassUID, ds.SOPInstanceUID = DX, generate_uid()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            ds.PatientName, ds.PatientID = "Load^Synthetic", f"LOAD{s}"
            ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
            ds.PresentationIntentType, ds.ViewPosition = "FOR PRESENTATION", "PA"
            ds.Rows = ds.Columns = side
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.WindowCenter, ds.WindowWidth = 2048, 4096
            start = int(rng.integers(0, 4096))
            ds.PixelData = pool[start:start + side * side].tobytes()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = DX
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            path = folder / f"s{s}-{i:03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            mine.append(path)
        out.append(mine)
    return out


def send_all(port: int, called: str, batches: list[list[Path]]) -> tuple[float, int]:
    """One storescu per batch, all started together; (wall seconds, success responses)."""
    start = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-v", "-aet", CALLING, "-aec", called,
                               "127.0.0.1", str(port), *map(str, files)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=DCMTK_ENV) for files in batches]
    outputs = [p.communicate(timeout=3600)[0] for p in procs]
    elapsed = time.perf_counter() - start
    return elapsed, sum(o.count("Received Store Response (Success)") for o in outputs)


def run_dcmtk(batches: list[list[Path]], work: Path) -> tuple[float, int]:
    out = work / "dcmtk-out"
    out.mkdir()
    port = free_port()
    server = subprocess.Popen(["storescp", "--fork", "--max-pdu", "131072", "-aet", "STORESCP",
                               "-od", str(out), str(port)], env=DCMTK_ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        elapsed, acknowledged = send_all(port, "STORESCP", batches)
    finally:
        server.terminate()
        server.wait(timeout=30)
        subprocess.run(["pkill", "-f", f"storescp --fork --max-pdu 131072 -aet STORESCP -od {out}"],
                       check=False)
    stored = len(list(out.iterdir()))
    shutil.rmtree(out)
    if stored != acknowledged:
        raise RuntimeError(f"DCMTK acknowledged {acknowledged}, stored {stored}")
    return elapsed, acknowledged


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_node(batches: list[list[Path]], work: Path) -> tuple[float, int, int, int, float]:
    data = work / "node-var"
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "dicom_node", "serve", "--port", str(port),
         "--data-dir", str(data), "--allow-calling-ae", CALLING],
        env={**os.environ, "DICOM_NODE_LOG_LEVEL": "WARNING", "DICOM_NODE_MIN_FREE_DISK_MB": "0",
             "DICOM_NODE_MAX_ASSOCIATIONS": str(len(batches) + 2)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        wait_for_port(port)
        elapsed, acknowledged = send_all(port, "DICOM_NODE", batches)
        peak = peak_rss_mb(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    with sqlite3.connect(data / "dicom-node.db") as db:
        queued = db.execute("SELECT count(*) FROM jobs WHERE state = 'queued'").fetchone()[0]
    spool = data / "spool"
    stored = sum(1 for shard in spool.iterdir() if len(shard.name) == 2 and shard.is_dir()
                 for f in shard.iterdir() if f.suffix == ".dcm")
    shutil.rmtree(data)
    return elapsed, acknowledged, stored, queued, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 x 12 images")
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--images", type=int, default=None, help="images per sender")
    args = parser.parse_args()
    per_sender = args.images or (12 if args.quick else 100)
    with tempfile.TemporaryDirectory(prefix="dicom-node-load-") as tmp:
        work = Path(tmp)
        (work / "images").mkdir()
        batches = make_images(work / "images", args.senders, per_sender)
        count = args.senders * per_sender
        size_mb = sum(f.stat().st_size for files in batches for f in files) / 2**20
        print(f"{args.senders} senders x {per_sender} images, {size_mb:.0f} MB in all",
              flush=True)
        dcmtk_s, dcmtk_ok = run_dcmtk(batches, work)
        print(f"DCMTK storescp --fork    {count / dcmtk_s:7.1f} img/s {size_mb / dcmtk_s:7.1f} MB/s"
              f"  ({dcmtk_ok} stored)", flush=True)
        node_s, acknowledged, stored, queued, peak = run_node(batches, work)
        print(f"dicom-node               {count / node_s:7.1f} img/s {size_mb / node_s:7.1f} MB/s"
              f"  peak RSS {peak:.0f} MB", flush=True)
        print(f"acknowledged {acknowledged}, stored {stored}, queued {queued} (of {count} sent)"
              f"{'' if acknowledged == stored == queued == count else '  -- NOT EQUAL'}")
        ratio = dcmtk_s / node_s
        print(f"node / DCMTK --fork: {ratio:.2f}")
        print(f"bench: node_img_s={count / node_s:.2f} node_mb_s={size_mb / node_s:.1f} "
              f"dcmtk_img_s={count / dcmtk_s:.2f} dcmtk_mb_s={size_mb / dcmtk_s:.1f} "
              f"ratio={ratio:.3f} peak_rss_mb={peak:.0f} acknowledged={acknowledged} "
              f"stored={stored} queued={queued} sent={count} "
              f"equal={int(acknowledged == stored == queued == count)}")


if __name__ == "__main__":
    main()
