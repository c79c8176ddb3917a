"""Training: a CPU smoke run through train -> evaluate -> install -> classify; kill and resume;
one-worker MultiWorkerMirroredStrategy; ImageNet starting weights from the Keras cache (or
exit 2 before any data work); a mixed-precision run saved in float32; progress per epoch
and TensorBoard logs; the dry run."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_node.loopback import free_port
from model import card as card_module

from dicom_factory import dx_16bit, save
from helpers.environment import wait_until
from helpers.processes import NodeProcess, cli
from peers import storescu

pytestmark = pytest.mark.slow


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
    logs = tmp_path / "logs"
    trained = cli("train", "--data", str(shared_cxr), "--arch", "xception",
                  "--input-size", "96", "--folds", "3", "--phases", "2",
                  "--epochs-per-phase", "1", "--weights", "none", "--log", str(logs),
                  "--out", str(run))
    assert trained.returncode == 0, trained.stderr[-3000:]
    artifact = run / "fold1" / "model"
    card = json.loads((artifact / "model-card.json").read_text())
    assert card["trained"] is True and card["input_size"] == 96
    assert card["training_data"]["phases"] == 2
    assert "test_overall_accuracy" in card["metrics"]
    assert (run / "splits" / "fold3" / "train2.csv").is_file()
    # --log: the CSV logs and each phase's TensorBoard events; a line per epoch.
    assert (logs / "log-phase2.csv").is_file()
    scalars = tensorboard_scalars(logs / "validation")
    assert [step for step, _ in scalars["epoch_accuracy"]] == [1, 2]  # phase after phase
    assert [step for step, _ in tensorboard_scalars(logs / "train")["epoch_loss"]] == [1, 2]
    assert re.search(r"phase 2/2  epoch 1/1  [\d.]+ images/s  .*val_accuracy [\d.]+  "
                     r"about \d+ s left", trained.stderr), trained.stderr[-3000:]

    # What the card says the model earned: how it was trained, its test evidence, its
    # operating points -- and, on 150 dev images, no validation.
    record = card["training"]
    assert record["starting_weights"] == "random" and record["input_size"] == 96
    assert record["precision"] == "float32"  # no GPU here
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


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> (step, value) of the TensorBoard scalars in ``folder``'s event files."""
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    found: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                assert value.metadata.plugin_data.plugin_name == "scalars"
                found.setdefault(value.tag, []).append(
                    (event.step, float(tf.make_ndarray(value.tensor))))
    return found


def _train_args(labels: Path, out: Path, phases: int) -> list[str]:
    return ["train", "--data", str(labels), "--arch", "xception", "--input-size", "80",
            "--folds", "3", "--phases", str(phases), "--epochs-per-phase", "2",
            "--batch-size", "4", "--weights", "none", "--out", str(out)]


def _phases_done(progress: Path) -> int:
    return int(json.loads(progress.read_text())["phases_done"]) if progress.is_file() else 0


@pytest.mark.long
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


@pytest.mark.long
def test_multi_worker_strategy_with_one_worker(tmp_path: Path) -> None:
    labels = labelled_pngs(tmp_path / "data", per_class=8)
    tf_config = {"cluster": {"worker": [f"localhost:{free_port()}"]},
                 "task": {"type": "worker", "index": 0}}
    result = cli(*_train_args(labels, tmp_path / "run", 1),
                 env={"TF_CONFIG": json.dumps(tf_config)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "fold1" / "model" / "model.keras").is_file()


IMAGENET_FILES = ("xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
                  "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5")


def test_imagenet_is_the_default_and_missing_files_stop_before_the_data(
        tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("not,a,list\n")  # never read: the weights are checked first
    out = tmp_path / "run"
    result = cli("train", "--data", str(labels), "--out", str(out),
                 env={"KERAS_HOME": str(tmp_path / "keras")})
    assert result.returncode == 2, result.stderr[-3000:]
    for name in IMAGENET_FILES:
        assert name in result.stderr
    assert str(tmp_path / "keras" / "models") in result.stderr
    assert "--weights none" in result.stderr
    assert not out.exists()


# Suite time (50 s: the estimate builds and times the network): `long`; the plan's
# numbers come from the same splits the end-to-end training test uses.
@pytest.mark.long
def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path: Path, shared_cxr: Path) -> None:
    out = tmp_path / "run"
    result = cli("train", "--data", str(shared_cxr), "--arch", "xception", "--input-size", "80",
                 "--folds", "3", "--phases", "2", "--epochs-per-phase", "3",
                 "--weights", "none", "--dry-run", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    assert text.startswith("fold 1 of 3 (clean protocol, ")
    counted = {name: re.search(rf"^{name}: (\d+) images \(covid (\d+), normal (\d+), "
                               rf"pneumonia (\d+)\)", text, re.MULTILINE)
               for name in ("phase 1", "phase 2", "validation", "test")}
    for name, found in counted.items():
        assert found, (name, text)
        total, *per_class = map(int, found.groups())
        assert total == sum(per_class) and min(per_class) > 0, (name, text)
    test_images = int(counted["test"].group(1))  # type: ignore[union-attr]
    assert 40 <= test_images <= 60  # a third of the 150 images, whole patients
    assert re.search(r"^phase 1: .* (\d+) steps per epoch$", text, re.MULTILINE)
    assert re.search(r"^estimate on this machine: [\d.]+ s per training step, .* about "
                     r"\d+ (s|min)( in all)? .*an estimate", text, re.MULTILINE), text
    assert "nothing trained, nothing written" in text
    assert not out.exists()


class FakeClock:
    def __init__(self, *times: float) -> None:
        self.times: Iterator[float] = iter(times)

    def __call__(self) -> float:
        return next(self.times)


def test_progress_reports_images_per_second_and_time_left() -> None:
    from rich.console import Console

    from training.train import Progress

    printed = io.StringIO()
    # 2 phases of 3 epochs; 100 images in phase 1, 50 in phase 2; two steps per epoch
    progress = Progress(2, 3, [100, 50], clock=FakeClock(0, 1, 4, 5,  # epoch 1
                                                         5, 6, 7, 9,  # epoch 2
                                                         20, 21, 22, 23),
                        console=Console(file=printed, width=40))
    progress.begin_phase(1)
    progress.on_epoch_begin(0)
    progress.on_train_batch_end(0)
    progress.on_train_batch_end(1)
    progress.on_epoch_end(0, {"val_accuracy": 0.25, "accuracy": 0.5, "loss": 0.9, "lr": 1.0})
    # 100 images in 4 s of steps; a 5 s epoch, 2 more in phase 1 and 3 in phase 2
    assert progress.images_per_second == 25.0 and progress.seconds_left == 25.0
    progress.on_epoch_begin(1)
    progress.on_train_batch_end(0)
    progress.on_train_batch_end(1)
    progress.on_epoch_end(1, {})
    assert progress.images_per_second == 50.0 and progress.seconds_left == 4.5 * 4
    progress.begin_phase(2)
    progress.on_epoch_begin(2)  # resumed at its last epoch
    progress.on_train_batch_end(0)
    progress.on_train_batch_end(1)
    progress.on_epoch_end(2, {})
    assert progress.images_per_second == 25.0 and progress.seconds_left == 0.0
    lines = printed.getvalue().splitlines()
    assert lines[0] == ("phase 1/2  epoch 1/3  25.0 images/s  loss 0.9000  accuracy 0.5000  "
                        "val_accuracy 0.2500  about 25 s left")  # one line, however narrow
    assert lines[2].startswith("phase 2/2  epoch 3/3  25.0 images/s")


def test_tensorboard_scalars_follow_the_epochs_of_the_whole_run(tmp_path: Path) -> None:
    from training.train import TensorBoardLog

    board = TensorBoardLog(tmp_path, epochs=3)
    board.begin_phase(2)
    board.on_epoch_end(0, {"loss": 0.75, "accuracy": 0.5, "val_accuracy": 0.25})
    board.on_train_end()
    assert tensorboard_scalars(tmp_path / "train") == {"epoch_loss": [(4, 0.75)],
                                                      "epoch_accuracy": [(4, 0.5)]}
    assert tensorboard_scalars(tmp_path / "validation") == {"epoch_accuracy": [(4, 0.25)]}


def test_duration_for_a_person() -> None:
    from training.train import duration

    assert [duration(s) for s in (40, 90, 3599, 3600 * 26 + 300)] == [
        "40 s", "2 min", "1 h 00 min", "26 h 05 min"]


@pytest.mark.long
def test_mixed_precision_run_from_imagenet_serves_float32(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, global_policy: None) -> None:
    """A stand-in ImageNet file in the Keras cache starts the run; trained under
    mixed_float16, the saved model is float32 with its training-time outputs; the log
    folder gets the CSV log and TensorBoard events."""
    import keras

    from model import network
    from training import sources
    from training.train import TrainConfig, train

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    (tmp_path / "keras" / "models").mkdir(parents=True)
    keras.applications.Xception(include_top=False, weights=None, input_shape=(71, 71, 3)).save(
        tmp_path / "keras" / "models" / IMAGENET_FILES[0])
    records = list(sources.read(labelled_pngs(tmp_path / "data", per_class=4)))
    config = TrainConfig(architecture="xception", input_size=71, epochs_per_phase=1,
                         batch_size=4, weights="imagenet", precision="mixed_float16",
                         augment=False)
    card = train([records[::2]], records[1::2], config, tmp_path / "run", log=tmp_path / "logs")
    assert (tmp_path / "logs" / "log-phase1.csv").is_file()
    assert set(tensorboard_scalars(tmp_path / "logs" / "train")) >= {"epoch_loss",
                                                                    "epoch_accuracy"}
    assert card.training is not None
    assert card.training.starting_weights == "imagenet"
    assert card.training.precision == "mixed_float16"
    assert keras.config.dtype_policy().name == "float32"  # the run's policy did not leak

    served = keras.models.load_model(tmp_path / "run" / "model" / "model.keras", compile=False)
    trained = keras.models.load_model(tmp_path / "run" / "work" / "best.keras", compile=False)
    assert {layer.dtype_policy.name for layer in network._all_layers(served)} == {"float32"}
    assert "mixed_float16" in {layer.dtype_policy.name for layer in trained.layers}
    x = np.random.default_rng(0).random((4, 71, 71, 3), dtype=np.float32)
    np.testing.assert_allclose(np.asarray(served(x, training=False)),
                               np.asarray(trained(x, training=False), np.float32), atol=1e-2)
