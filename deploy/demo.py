"""One-command demo: a PACS, the node with a model, sample chest DICOMs, the results.

Starts a receiving PACS (Debian's Orthanc when installed, else a pynetdicom
Storage SCP), starts ``dicom-node serve`` with the model you pass (or an
untrained demo model it creates), sends the sample DICOMs (../shared/data/dicom
when present, else synthetic chest images), waits for the SRs to reach the PACS
and prints, per image, the class, the three probabilities and where the SR and the
evidence image went, and writes each evidence image as a PNG to --out (default
var/demo) to look at. Everything else runs on 127.0.0.1 in a temporary directory.
Usage: python deploy/demo.py [--model DIR] [--out DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "data" / "dicom"
sys.path.insert(0, str(ROOT))
NODE_AE, PACS_AE, SENDER_AE = "DICOM_NODE", "DEMO_PACS", "DEMO_SCU"
#: The demo's study results close this many seconds after the last image (node: 30).
STUDY_QUIET_SECONDS = 3

from dicom_node.loopback import free_port, wait_for_port  # noqa: E402


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_node", *args], capture_output=True,
                          text=True, timeout=900, cwd=ROOT)


class PACS:
    """Orthanc on free ports (remote access off) or, without it, a pynetdicom SCP."""

    def __init__(self, work: Path) -> None:
        self.port = free_port()
        self.kind = "Orthanc" if shutil.which("Orthanc") else "pynetdicom Storage SCP"
        self._proc: subprocess.Popen[bytes] | None = None
        self._ae: Any = None
        if shutil.which("Orthanc"):
            self.http_port = free_port()
            config = {"Name": "dicom-node-demo", "StorageDirectory": str(work / "orthanc"),
                      "IndexDirectory": str(work / "orthanc"), "Plugins": [],
                      "HttpPort": self.http_port, "RemoteAccessAllowed": False,
                      "AuthenticationEnabled": False, "DicomAet": PACS_AE,
                      "DicomPort": self.port, "DicomAlwaysAllowStore": True}
            (work / "orthanc.json").write_text(json.dumps(config))
            self._proc = subprocess.Popen(["Orthanc", str(work / "orthanc.json")],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for_port(self.port)
            wait_for_port(self.http_port)
        else:
            from pynetdicom import AE, AllStoragePresentationContexts, evt

            self.folder = work / "pacs"
            self.folder.mkdir()
            self._ae = AE(ae_title=PACS_AE)
            self._ae.supported_contexts = AllStoragePresentationContexts
            self._ae.start_server(("127.0.0.1", self.port), block=False,
                                  evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        ds.save_as(self.folder / f"sr{len(list(self.folder.iterdir())):04d}.dcm",
                   enforce_file_format=True)
        return 0

    def where(self) -> str:
        if self._proc is not None:
            return f"Orthanc {PACS_AE}@127.0.0.1:{self.port} (REST http://127.0.0.1:{self.http_port})"
        return f"{self.kind} {PACS_AE}@127.0.0.1:{self.port} (files in {self.folder})"

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=30)
        if self._ae is not None:
            self._ae.shutdown()


def samples(work: Path) -> list[Path]:
    if SAMPLES.is_dir():
        return sorted(SAMPLES.glob("*.dcm"))
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    made = []
    for i in range(3):
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        ds.SOPInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID, ds.Modality = "Demo^Synthetic", f"DEMO{i}", "DX"
        ds.BodyPartExamined, ds.Rows, ds.Columns = "CHEST", 512, 512
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.random.default_rng(i).integers(0, 4096, (512, 512),
                                                         dtype=np.uint16).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = work / f"synthetic{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        made.append(path)
    return made


def results(data: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(data / "dicom-node.db") as db:
        db.row_factory = sqlite3.Row
        jobs = [dict(r) for r in db.execute("SELECT * FROM jobs ORDER BY id")]
        for job in jobs:
            job["deliveries"] = [dict(r) for r in db.execute(
                "SELECT destination, item, state, attempts FROM deliveries WHERE job_id = ?",
                (job["id"],))]
    return jobs


def evidence_png(work: Path, job: dict[str, Any], out: Path) -> Path:
    """The job's evidence image (the Secondary Capture the node made) as a PNG in ``out``."""
    from pydicom import dcmread

    from dicom_node.evidence import png

    out.mkdir(parents=True, exist_ok=True)
    image = dcmread(work / "var" / "spool" / job["evidence_file"])
    path = out / f"evidence-job-{job['id']}.png"
    path.write_bytes(png(image.pixel_array))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a model artifact (default: untrained demo)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "demo",
                        help="where the evidence images are written as PNG (var/demo)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dicom-node-demo-"))
    model = args.model
    if model is None:
        model = work / "demo-model"
        print("creating an UNTRAINED demo model (concatenated Xception + ResNet50V2, 300 px)...",
              flush=True)
        made = cli("model", "create", "--arch", "concatenated", "--out", str(model))
        if made.returncode != 0:
            sys.exit(made.stderr)
    from model.card import read_card, validation_status

    shown_card = read_card(model)
    trained, validated = shown_card.trained, validation_status(shown_card).validated
    pacs = PACS(work)
    node_port = free_port()
    node = subprocess.Popen(
        [sys.executable, "-m", "dicom_node", "serve", "--port", str(node_port),
         "--data-dir", str(work / "var"), "--allow-calling-ae", SENDER_AE,
         "--model", str(model), "--destination", f"{PACS_AE}@127.0.0.1:{pacs.port}",
         # A demo model is not validated: the node serves it, and every result says so.
         "--allow-unvalidated-models"],
        cwd=ROOT, stdout=(work / "node.log").open("wb"), stderr=subprocess.STDOUT,
        env={**os.environ, "DICOM_NODE_RETRY_BASE_SECONDS": "1",
             "DICOM_NODE_STUDY_QUIET_SECONDS": str(STUDY_QUIET_SECONDS)},
    )
    try:
        wait_for_port(node_port)
        files = samples(work)
        print(f"PACS: {pacs.where()}\nnode: {NODE_AE}@127.0.0.1:{node_port}\n"
              f"sending {len(files)} DICOM file(s)...", flush=True)
        sent = cli("send", "127.0.0.1", str(node_port), *map(str, files),
                   "--called-ae", NODE_AE, "--calling-ae", SENDER_AE)
        print(sent.stdout.strip())
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            jobs = [j for j in results(work / "var") if j["state"] != "ignored"]
            if jobs and all(j["state"] in ("done", "failed") and all(
                    d["state"] != "pending" for d in j["deliveries"]) for j in jobs):
                break
            time.sleep(0.5)
        print()
        if not validated:
            print("*** UNVALIDATED MODEL - NOT FOR CLINICAL USE: the node served it because "
                  "the demo allows it; every SR says so. ***")
        if not trained:
            print("*** The model is UNTRAINED: these classes and probabilities mean nothing. ***")
        for job in results(work / "var"):
            if job["state"] != "done":
                reason = job["last_error"] or job["intake_reason"]
                print(f"job {job['id']}: {job['state']} {reason}")
                continue
            probs = json.loads(job["probabilities"])
            where = ", ".join(f"{d['item']} -> {d['destination']} ({d['state']})"
                              for d in job["deliveries"])
            print(f"job {job['id']}: {job['label']:<9} " +
                  " ".join(f"{k}={v:.3f}" for k, v in probs.items()) + f"  {where}")
            if job["evidence_file"]:
                print(f"        evidence image: {evidence_png(work, job, args.out)}")
        time.sleep(STUDY_QUIET_SECONDS + 2)  # the study results close after the quiet period
        shown = cli("studies", "list", "--data-dir", str(work / "var"))
        print("\nstudy results:\n" + shown.stdout.rstrip())
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=120)
        pacs.stop()
        if args.keep:
            print(f"\nkept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
