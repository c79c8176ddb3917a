"""Training the paper's way (Table 2): phase by phase, Nadam 1e-4, best checkpoint kept.

For each phase the network is fitted ``epochs_per_phase`` epochs (100 in the
paper) with Nadam (learning rate 1e-4) and categorical cross-entropy, batch 20
for the concatenated network and 30 for the single ones. The checkpoint with the
best validation accuracy over all phases is kept. A run is resumable after a
kill: completed phases are recorded in ``progress.json`` (with the best value so
far), and within a phase Keras' ``BackupAndRestore`` resumes at the last epoch.
Each phase writes a CSV log. On a GPU the run uses mixed precision; with several
GPUs ``MirroredStrategy``; with ``TF_CONFIG`` set ``MultiWorkerMirroredStrategy``.
The result is a model artifact with its card, ready for ``dicom-node model install``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import keras
import tensorflow as tf

from model import card as model_card
from model import network
from model.engine import gpu_available
from training import data
from training.sources import Record

LOGGER = logging.getLogger(__name__)

PAPER_BATCH = {"concatenated": 20, "xception": 30, "resnet50v2": 30}


@dataclass
class TrainConfig:
    """Everything that defines a training run (written to the card)."""

    architecture: str = "concatenated"
    input_size: int = 300
    epochs_per_phase: int = 100
    batch_size: int | None = None
    learning_rate: float = 1e-4
    weights: str = "none"
    seed: int = 0
    version: str = "1.0.0"
    augment: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.batch_size or PAPER_BATCH.get(self.architecture, 20)


def choose_strategy() -> tf.distribute.Strategy:
    """MultiWorkerMirrored with TF_CONFIG, Mirrored with several GPUs, else the default."""
    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _summary(records: Sequence[Record]) -> dict[str, Any]:
    return {"images": len(records), "per_class": dict(Counter(r.label for r in records)),
            "per_source": dict(Counter(r.source for r in records)),
            "patients": len({(r.source, r.patient_id) for r in records})}


def _read_progress(path: Path) -> dict[str, Any]:
    if path.is_file():
        progress: dict[str, Any] = json.loads(path.read_text())
        return progress
    return {"phases_done": 0, "best": None}


def _write_progress(path: Path, progress: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(progress))
    os.replace(tmp, path)


def train(
    phases: Sequence[Sequence[Record]],
    validation: Sequence[Record],
    config: TrainConfig,
    out: Path,
) -> model_card.ModelCard:
    """Train over ``phases``, keep the best checkpoint, write ``out/model`` (an artifact).

    Resumes from ``out/work`` when a run was interrupted.

    Parameters
    ----------
    phases
        The phase-balanced training sets, trained one after the other.
    validation
        Chooses the best checkpoint.
    config
        Architecture, input size, epochs per phase, batch size, weights, seed, version.
    out
        The run's folder.

    Raises
    ------
    ValueError
        No phase or no validation set.
    """
    if not phases or not validation:
        raise ValueError("training needs at least one phase and a validation set")
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    progress_path = work / "progress.json"
    progress = _read_progress(progress_path)
    if gpu_available():
        keras.mixed_precision.set_global_policy("mixed_float16")
        LOGGER.info("GPU: training with mixed precision (float16 compute, float32 weights)")
    strategy = choose_strategy()
    with strategy.scope():
        model = network.build(config.architecture, config.input_size,  # type: ignore[arg-type]
                              weights=config.weights, seed=config.seed)
        model.compile(optimizer=keras.optimizers.Nadam(config.learning_rate),
                      loss="categorical_crossentropy", metrics=["accuracy"])
    last = work / "last.weights.h5"
    if progress["phases_done"] and last.is_file():
        model.load_weights(last)
        LOGGER.info("resuming after phase %d", progress["phases_done"])
    best_path = work / "best.keras"
    checkpoint = keras.callbacks.ModelCheckpoint(
        best_path, monitor="val_accuracy", mode="max", save_best_only=True,
        initial_value_threshold=progress["best"])
    val_data = data.dataset(validation, config.input_size, config.batch, cache="")
    for index in range(progress["phases_done"], len(phases)):
        number = index + 1
        LOGGER.info("phase %d of %d: %d images", number, len(phases), len(phases[index]))
        train_data = data.dataset(phases[index], config.input_size, config.batch,
                                  augment=config.augment, shuffle=True,
                                  seed=config.seed + number, cache="")
        model.fit(train_data, validation_data=val_data, epochs=config.epochs_per_phase,
                  # a progress bar on a terminal, one line per epoch in a log file
                  verbose=1 if sys.stdout.isatty() else 2, shuffle=False, callbacks=[
                      checkpoint,
                      keras.callbacks.CSVLogger(str(work / f"log-phase{number}.csv"),
                                                append=True),
                      keras.callbacks.BackupAndRestore(str(work / f"backup-phase{number}")),
                  ])
        model.save_weights(work / "last.tmp.weights.h5")
        os.replace(work / "last.tmp.weights.h5", last)
        best = checkpoint.best
        progress = {"phases_done": number,
                    "best": None if best in (None, float("inf"), float("-inf")) else float(best)}
        _write_progress(progress_path, progress)
    final = keras.models.load_model(best_path, compile=False) if best_path.is_file() else model
    artifact = out / "model"
    if artifact.exists():
        import shutil

        shutil.rmtree(artifact)
    all_training = [r for phase in phases for r in phase]
    return model_card.save_artifact(final, artifact, {
        "version": config.version,
        "architecture": config.architecture,
        "input_size": config.input_size,
        "trained": True,
        "training_data": {"training": _summary(all_training), "validation": _summary(validation),
                          "phases": len(phases), "config": asdict(config)},
        "metrics": {"best_validation_accuracy": progress["best"]},
        "training": training_record(phases, validation, config, best_path.is_file()),
        "notes": "Trained with dicom-node's training package (paper's phase-balanced scheme).",
    })


def training_record(phases: Sequence[Sequence[Record]], validation: Sequence[Record],
                    config: TrainConfig, checkpoint_kept: bool) -> model_card.TrainingRecord:
    """What the card says the model was trained from and how.

    Parameters
    ----------
    phases, validation
        The training phases and the validation set, as :func:`train` got them.
    config
        The run's configuration; ``extra["protocol"] == "paper"`` means the validation
        set is part of the test set, so the checkpoint was chosen on test images.
    checkpoint_kept
        A best checkpoint was saved (else the last epoch's weights were kept).
    """
    chosen_on: Literal["validation", "test", "last epoch"] = (
        "last epoch" if not checkpoint_kept
        else "test" if config.extra.get("protocol") == "paper" else "validation")
    everything = [r for phase in phases for r in phase] + list(validation)
    return model_card.TrainingRecord(
        starting_weights=model_card.starting_weights(config.weights), input_size=config.input_size,
        epochs=len(phases) * config.epochs_per_phase, phases=len(phases),
        epochs_per_phase=config.epochs_per_phase,
        # distinct images: phases share their common pneumonia images
        training_images=len({r.path for phase in phases for r in phase}),
        validation_images=len(validation),
        data_sources=sorted({r.source for r in everything}),
        checkpoint_chosen_on=chosen_on)
