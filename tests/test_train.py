"""Training: a CPU smoke run through train -> evaluate -> install -> classify; kill and resume;
one-worker MultiWorkerMirroredStrategy."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_node.loopback import free_port
from model import card as card_module

from dicom_factory import dx_16bit, save
from helpers.environment import wait_until
from helpers.processes import NodeProcess
from peers import storescu

pytestmark = pytest.mark.slow


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 900
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_node", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def labelled_pngs(folder: Path, per_class: int = 12) -> Path:
    """A CSV list of small synthetic PNGs, one patient each."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for label in ("covid", "normal", "pneumonia"):
        for i in range(per_class):
            image = (rng.random((100, 90)) * 60 + {"covid": 180, "normal": 40,
                                                   "pneumonia": 110}[label]).astype(np.uint8)
            name = f"{label}{i}.png"
            Image.fromarray(image).save(folder / name)
            rows.append({"filename": name, "label": label, "patient_id": f"{label}{i}",
                         "source": "covid-src" if label == "covid" else "other-src"})
    path = folder / "labels.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filename", "label", "patient_id", "source"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_train_evaluate_install_classify(tmp_path: Path, shared_cxr: Path) -> None:
    run = tmp_path / "run"
    # xception keeps CI short (the concatenated network's training graph alone takes
    # about two minutes to trace on 2 cores); the code path is the same.
    trained = cli("train", "--data", str(shared_cxr), "--arch", "xception",
                  "--input-size", "96", "--folds", "3", "--phases", "2",
                  "--epochs-per-phase", "1", "--out", str(run))
    assert trained.returncode == 0, trained.stderr[-3000:]
    artifact = run / "fold1" / "model"
    card = json.loads((artifact / "model-card.json").read_text())
    assert card["trained"] is True and card["input_size"] == 96
    assert card["training_data"]["phases"] == 2
    assert "test_overall_accuracy" in card["metrics"]
    assert (run / "fold1" / "work" / "log-phase2.csv").is_file()
    assert (run / "splits" / "fold3" / "train2.csv").is_file()

    # What the card says the model earned: how it was trained, its test evidence, its
    # operating points -- and, on 150 dev images, no validation.
    record = card["training"]
    assert record["starting_weights"] == "random" and record["input_size"] == 96
    assert (record["phases"], record["epochs_per_phase"], record["epochs"]) == (2, 1, 2)
    assert record["checkpoint_chosen_on"] == "validation"
    assert record["training_images"] > 0 and record["validation_images"] > 0
    assert record["test_images"] == card["test"]["images"] > 0
    assert len(record["data_sources"]) >= 2
    test = card["test"]
    assert test["data_set"].startswith("fold 1 of 3 test set of ")
    assert test["evaluated_by"] == "evaluate" and test["checkpoint_chosen_on_test"] is False
    assert set(test["per_class"]) == {"covid", "normal", "pneumonia"}
    assert set(card["operating_points"]) == {"covid", "pneumonia"}
    assert card["operating_points"]["covid"]["target_sensitivity"] == 0.9
    assert "## Operating points" in (run / "fold1" / "evaluation" / "report.md").read_text()
    shown = json.loads(cli("model", "show", str(artifact)).stdout)
    assert shown["validated"] is False and "reaches chance" in shown["validation_reason"]

    whole = cli("evaluate", "--model", str(artifact), "--data",
                str(shared_cxr / "labels.csv"), "--out", str(tmp_path / "all"),
                "--prevalence", "covid=0.05")
    assert whole.returncode == 0, whole.stderr[-3000:]
    metrics = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert metrics["images"] == 150 and 0.0 <= metrics["overall_accuracy"] <= 1.0
    assert "ppv_at_0.05" in metrics["per_class"]["covid"]
    assert len(metrics["by_source"]) >= 3  # the dev set mixes sources: reported apart

    fold = run / "splits" / "fold1"
    overlapping = cli("evaluate", "--model", str(artifact), "--data",
                      str(shared_cxr / "labels.csv"), "--out", str(tmp_path / "bad"),
                      "--validation-data", str(fold / "validation.csv"), "--record")
    assert overlapping.returncode == 2  # the 150 include the validation images
    assert "share" in overlapping.stderr and "thresholds must be chosen" in overlapping.stderr

    evaluated = cli("evaluate", "--model", str(artifact), "--data", str(fold / "test.csv"),
                    "--out", str(tmp_path / "ev"), "--data-set", "cxr-dev fold 1 test",
                    "--validation-data", str(fold / "validation.csv"),
                    "--target-sensitivity", "covid=0.95", "--record")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "validated: no" in evaluated.stdout
    tested = json.loads((tmp_path / "ev" / "metrics.json").read_text())["images"]
    recorded = json.loads((artifact / "model-card.json").read_text())
    assert recorded["test"]["data_set"] == "cxr-dev fold 1 test"
    assert recorded["test"]["images"] == tested == record["test_images"]
    assert recorded["operating_points"]["covid"]["target_sensitivity"] == 0.95
    assert recorded["operating_points"]["pneumonia"]["target_sensitivity"] == 0.9

    data = tmp_path / "var"
    refused = cli("model", "install", str(artifact), "--data-dir", str(data))
    assert refused.returncode == 1 and "is not validated" in refused.stderr
    assert cli("model", "install", str(artifact), "--allow-unvalidated",
               "--data-dir", str(data)).returncode == 0
    dicom = save(dx_16bit(rows=256, columns=200), tmp_path / "chest.dcm")
    predicted = cli("predict", str(dicom), "--json", "--data-dir", str(data))
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    report = json.loads(predicted.stdout)
    assert report["trained"] is True
    assert report["validated"] is False and report["warning"] == card_module.UNVALIDATED_WARNING
    assert report["results"][0]["label"] in ("covid", "normal", "pneumonia")

    # ... and the running node classifies a received DICOM with the installed model.
    node = NodeProcess(data).start()
    try:
        assert storescu(node.port, [dicom]).all_success
        with node.job_store() as store:
            wait_until(lambda: store.counts() == {"done": 1}, what="the job done")
            (job,) = store.list()
        assert job.state.value == "done" and job.label in ("covid", "normal", "pneumonia")
        assert job.model_version == f"cxr-covid-pneumonia {card['version']}"
    finally:
        node.stop()


def _train_args(labels: Path, out: Path, phases: int) -> list[str]:
    return ["train", "--data", str(labels), "--arch", "xception", "--input-size", "80",
            "--folds", "3", "--phases", str(phases), "--epochs-per-phase", "2",
            "--batch-size", "4", "--out", str(out)]


def _phases_done(progress: Path) -> int:
    return int(json.loads(progress.read_text())["phases_done"]) if progress.is_file() else 0


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes (POSIX)")
def test_killed_training_resumes_where_it_stopped(tmp_path: Path) -> None:
    labels = labelled_pngs(tmp_path / "data")
    out = tmp_path / "run"
    work = out / "fold1" / "work"
    progress = work / "progress.json"
    # A gate, not a race: phase 2 starts by opening its CSV log (log-phase<n>.csv, the
    # CSVLogger of training/train.py); as a named pipe nobody else opens, that open
    # blocks. So the run records phase 1 in progress.json and then cannot go on, however
    # fast or slow the machine: the kill always lands between phase 1 and phase 2.
    work.mkdir(parents=True)
    gate = work / "log-phase2.csv"
    os.mkfifo(gate)
    log = tmp_path / "first-run.log"  # a file, not a pipe: a full pipe would stall the run
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", *_train_args(labels, out, 3)],
            stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            wait_until(lambda: proc.poll() is not None or _phases_done(progress) >= 1,
                       timeout=600, what="phase 1 recorded in progress.json")
            assert proc.poll() is None, \
                f"training ended before the gate: {log.read_text()[-3000:]}"
        finally:
            proc.kill()
            proc.wait(timeout=30)
    assert _phases_done(progress) == 1
    assert not (work / "backup-phase2").exists()  # phase 2 never began
    phase1_log = (work / "log-phase1.csv").read_text()
    gate.unlink()

    resumed = cli(*_train_args(labels, out, 3))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after phase 1" in resumed.stderr
    assert _phases_done(progress) == 3
    assert (work / "log-phase1.csv").read_text() == phase1_log
    assert (out / "fold1" / "model" / "model-card.json").is_file()


def test_multi_worker_strategy_with_one_worker(tmp_path: Path) -> None:
    labels = labelled_pngs(tmp_path / "data", per_class=8)
    tf_config = {"cluster": {"worker": [f"localhost:{free_port()}"]},
                 "task": {"type": "worker", "index": 0}}
    result = cli(*_train_args(labels, tmp_path / "run", 1),
                 env={"TF_CONFIG": json.dumps(tf_config)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "fold1" / "model" / "model.keras").is_file()
