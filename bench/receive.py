"""Receive throughput: our node against DCMTK's storescp, same images, same run.

Sends N synthetic 2048x2500 16-bit DX images (~10 MB each) over loopback on one
association with DCMTK storescu (TCP_NODELAY=1, as Debian's DCMTK needs) to:

* DCMTK ``storescp`` at its default max PDU (16 KiB) -- the issue's reference;
* DCMTK ``storescp`` with a 128 KiB max PDU -- the same PDU our node offers;
* our node (``dicom-node serve``): full decode, intake rules, sha256, fsync of
  file and directory, job row committed with synchronous=FULL, per image.

DCMTK writes into the page cache without fsync, so the comparison is
conservative for us. Prints a table and ends with one ``bench:`` line.
Usage: python bench/receive.py [--quick] [--count N] [--repeat R]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.loopback import free_port, wait_for_port

DX = "1.2.840.10008.5.1.4.1.1.1.1"
CALLING = "STORESCU"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}






def make_images(folder: Path, count: int, rows: int = 2500, columns: int = 2048) -> list[Path]:
    """``count`` DX For Presentation files sharing one 12-bit image, each its own UIDs."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4096, size=(rows, columns), dtype=np.uint16).tobytes()
    study = generate_uid()
    paths = []
    for i in range(count):
        ds = Dataset()
        ds.SOPClassUID = DX
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID = "Bench^Synthetic", "BENCH"
        ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.InstanceNumber = i + 1
        ds.PixelData = pixels
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"img{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send(port: int, called: str, files: list[Path]) -> float:
    """storescu on one association; return wall seconds; raise unless every store succeeded."""
    start = time.perf_counter()
    proc = subprocess.run(
        ["storescu", "-v", "-aet", CALLING, "-aec", called, "127.0.0.1", str(port),
         *map(str, files)],
        capture_output=True, text=True, env=DCMTK_ENV, timeout=1800,
    )
    elapsed = time.perf_counter() - start
    ok = (proc.stdout + proc.stderr).count("Received Store Response (Success)")
    if proc.returncode != 0 or ok != len(files):
        raise RuntimeError(f"storescu: {ok}/{len(files)} stored\n{proc.stderr[-2000:]}")
    return elapsed


def run_dcmtk(files: list[Path], work: Path, pdu: int | None) -> float:
    out = work / "dcmtk-out"
    out.mkdir()
    port = free_port()
    args = ["storescp", "-aet", "STORESCP", "-od", str(out)]
    if pdu:
        args += ["--max-pdu", str(pdu)]
    server = subprocess.Popen([*args, str(port)], env=DCMTK_ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        return send(port, "STORESCP", files)
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(out)


def run_node(files: list[Path], work: Path) -> float:
    data = work / "node-var"
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "dicom_node", "serve", "--port", str(port),
         "--data-dir", str(data), "--allow-calling-ae", CALLING],
        env={**os.environ, "DICOM_NODE_LOG_LEVEL": "WARNING", "DICOM_NODE_MIN_FREE_DISK_MB": "0"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        elapsed = send(port, "DICOM_NODE", files)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    with sqlite3.connect(data / "dicom-node.db") as db:
        queued = db.execute("SELECT count(*) FROM jobs WHERE state = 'queued'").fetchone()[0]
    shutil.rmtree(data)
    if queued != len(files):
        raise RuntimeError(f"node queued {queued} of {len(files)} images")
    return elapsed


def measure(name: str, runner: Callable[[], float], repeat: int, size_mb: float, count: int
            ) -> tuple[float, float]:
    seconds = [runner() for _ in range(repeat)]
    median = statistics.median(seconds)
    img_s, mb_s = count / median, size_mb / median
    spread = f"{min(seconds):.2f}-{max(seconds):.2f}"
    print(f"{name:<34} {img_s:8.1f} img/s {mb_s:8.1f} MB/s   ({repeat} run(s), {spread} s)",
          flush=True)
    return img_s, mb_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 images, 1 run (~1 minute)")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    count, repeat = (40, 1) if args.quick else (args.count, args.repeat)
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: install Debian's dcmtk (make bench does)")

    work = Path(tempfile.mkdtemp(prefix="bench-receive-", dir=args.workdir))
    try:
        source = work / "src"
        source.mkdir()
        files = make_images(source, count)
        size_mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"{count} images, {size_mb / count:.2f} MB each, one association, loopback, "
              f"{os.cpu_count()} CPUs", flush=True)
        _, dcmtk = measure("DCMTK storescp (16 KiB PDU)", lambda: run_dcmtk(files, work, None),
                           repeat, size_mb, count)
        _, dcmtk_128k = measure("DCMTK storescp (128 KiB PDU)",
                                lambda: run_dcmtk(files, work, 131072), repeat, size_mb, count)
        node_img, node = measure("dicom-node (decode+fsync+commit)",
                                 lambda: run_node(files, work), repeat, size_mb, count)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio, ratio_128k = node / dcmtk, node / dcmtk_128k
    print(f"node / DCMTK default: {ratio:.2f}   node / DCMTK 128 KiB PDU: {ratio_128k:.2f}   "
          "(target >= 0.50 of DCMTK default)")
    print(f"bench: node_img_s={node_img:.2f} node_mb_s={node:.1f} dcmtk_mb_s={dcmtk:.1f} "
          f"dcmtk_128k_mb_s={dcmtk_128k:.1f} ratio={ratio:.3f} ratio_128k={ratio_128k:.3f} "
          f"images={count}")


if __name__ == "__main__":
    main()
