"""Training the paper's way (Table 2): phase by phase, Nadam 1e-4, best checkpoint kept.

For each phase the network is fitted ``epochs_per_phase`` epochs (100 in the
paper) with Nadam (learning rate 1e-4) and categorical cross-entropy, batch 20
for the concatenated network and 30 for the single ones. The checkpoint with the
best validation accuracy over all phases is kept. A run is resumable after a
kill: completed phases are recorded in ``progress.json`` (with the best value so
far), and within a phase Keras' ``BackupAndRestore`` resumes at the last epoch.
Each phase writes a CSV log (and TensorBoard events with a log folder); every epoch
prints its phase, images per second and the time the run has left. The run starts
from ImageNet backbones, as the paper did, unless told otherwise. On a GPU it
computes in mixed precision; the saved model is float32 all the same (the card
records what training used). With several GPUs ``MirroredStrategy``; with
``TF_CONFIG`` set ``MultiWorkerMirroredStrategy``. The result is a model
artifact with its card, ready for ``dicom-node model install``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import keras
import numpy as np
import tensorflow as tf
from rich.console import Console
from tensorflow.core.framework import summary_pb2

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
    #: ``imagenet`` (the paper's start: backbones from the Keras cache), ``none`` or a file.
    weights: str = "imagenet"
    seed: int = 0
    version: str = "1.0.0"
    augment: bool = True
    #: Keras dtype policy of training; None: ``mixed_float16`` on a GPU, else ``float32``.
    precision: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.batch_size or PAPER_BATCH.get(self.architecture, 20)

    @property
    def policy(self) -> str:
        """The dtype policy training computes in."""
        if self.precision is not None:
            return self.precision
        return "mixed_float16" if gpu_available() else "float32"


_SHOWN = ("loss", "accuracy", "val_loss", "val_accuracy")


class Progress(keras.callbacks.Callback):  # type: ignore[misc]
    """One line per epoch: phase p/P, epoch e/E, images per second, metrics, time left.

    Time left is the mean time of the epochs this process has run (validation
    included) times the epochs still to run, in this phase and the phases after it.
    Images per second count the training images of an epoch over its training
    steps (validation excluded).

    Parameters
    ----------
    phases
        Phases of the run.
    epochs
        Epochs per phase.
    images
        Training images of each phase.
    clock
        Seconds, monotonic (a fake one in tests).
    console
        Where lines go (default: standard error).
    """

    def __init__(self, phases: int, epochs: int, images: Sequence[int],
                 clock: Callable[[], float] = time.monotonic,
                 console: Console | None = None) -> None:
        super().__init__()
        self.phases, self.epochs, self.images = phases, epochs, list(images)
        self.clock = clock
        self.console = console or Console(stderr=True, highlight=False)
        self.phase = 1
        self.images_per_second = 0.0
        self.seconds_left = 0.0
        self._seconds = 0.0
        self._timed = 0
        self._epoch_start = 0.0
        self._last_step: float | None = None

    def begin_phase(self, number: int) -> None:
        """Count the epochs that follow as phase ``number``'s (1-based)."""
        self.phase = number

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch_start = self.clock()
        self._last_step = None

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._last_step = self.clock()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        now = self.clock()
        training = (self._last_step or now) - self._epoch_start
        self.images_per_second = self.images[self.phase - 1] / training if training > 0 else 0.0
        self._seconds += now - self._epoch_start
        self._timed += 1
        epochs_left = self.epochs - (epoch + 1) + (self.phases - self.phase) * self.epochs
        self.seconds_left = self._seconds / self._timed * epochs_left
        self.console.print(self.line(epoch, logs or {}), soft_wrap=True)

    def line(self, epoch: int, logs: dict[str, Any]) -> str:
        """The epoch's line, from the figures :meth:`on_epoch_end` computed."""
        metrics = "  ".join(f"{name} {float(logs[name]):.4f}" for name in _SHOWN if name in logs)
        return (f"phase {self.phase}/{self.phases}  epoch {epoch + 1}/{self.epochs}  "
                f"{self.images_per_second:.1f} images/s  {metrics}  "
                f"about {duration(self.seconds_left)} left")


class TensorBoardLog(keras.callbacks.Callback):  # type: ignore[misc]
    """Each epoch's loss and accuracy as TensorBoard scalars (``epoch_loss``, ...) in
    ``directory/train`` and ``directory/validation``, stepped by the epoch of the whole
    run, so the phases follow one another on one curve.

    Written with TensorFlow's own summary writer: Keras' ``TensorBoard`` callback needs
    the ``tensorboard`` package, which the node does not install (view the folder with
    ``tensorboard --logdir`` wherever it is installed).
    """

    _SCALARS = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))

    def __init__(self, directory: Path, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs
        self.phase = 1
        self.writers = {split: tf.summary.create_file_writer(str(directory / split))
                        for split in ("train", "validation")}

    def begin_phase(self, number: int) -> None:
        """Step the epochs that follow as phase ``number``'s (1-based)."""
        self.phase = number

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        step = (self.phase - 1) * self.epochs + epoch + 1
        for name, value in (logs or {}).items():
            split = "validation" if name.startswith("val_") else "train"
            with self.writers[split].as_default():
                tf.summary.write(f"epoch_{name.removeprefix('val_')}",
                                 tf.constant(float(value), tf.float32), step=step,
                                 metadata=self._SCALARS)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        for writer in self.writers.values():
            writer.flush()


def duration(seconds: float) -> str:
    """``seconds`` for a person: ``2 h 05 min``, ``12 min``, ``40 s``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


@dataclass(frozen=True)
class Estimate:
    """How long a run would take on this machine, from a few timed steps."""

    train_step: float
    validation_step: float
    train_steps: int
    validation_steps: int
    seconds: float
    steps_timed: int


def estimate(phase_images: Sequence[int], validation_images: int, config: TrainConfig,
             steps: int = 2) -> Estimate:
    """Time ``steps`` training and validation steps of the real network at the run's input
    size, batch and precision (after one untimed step that builds the graph), and scale
    them to every phase's epochs. Random weights: the speed does not depend on them.

    Parameters
    ----------
    phase_images
        Training images of each phase.
    validation_images
        Images of the validation set, run after every epoch.
    config
        The run's network, input size, batch, epochs per phase and precision.
    steps
        Steps timed of each kind.
    """
    with network.dtype_policy(config.policy):
        model = network.build(config.architecture, config.input_size,  # type: ignore[arg-type]
                              seed=config.seed)
        model.compile(optimizer=keras.optimizers.Nadam(config.learning_rate),
                      loss="categorical_crossentropy", metrics=["accuracy"])
    x = np.zeros((config.batch, config.input_size, config.input_size, 3), np.float32)
    y = np.eye(3, dtype=np.float32)[np.arange(config.batch) % 3]

    def timed(step: Callable[..., Any]) -> float:
        step(x, y)
        start = time.perf_counter()
        for _ in range(steps):
            step(x, y)
        return (time.perf_counter() - start) / steps

    train_step, validation_step = timed(model.train_on_batch), timed(model.test_on_batch)
    train_steps = sum(math.ceil(n / config.batch) for n in phase_images) * config.epochs_per_phase
    validation_steps = (math.ceil(validation_images / config.batch) * len(phase_images)
                        * config.epochs_per_phase)
    return Estimate(train_step, validation_step, train_steps, validation_steps,
                    train_steps * train_step + validation_steps * validation_step, steps)


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
            "patients": len({r.patient for r in records})}


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
    log: Path | None = None,
) -> model_card.ModelCard:
    """Train over ``phases``, keep the best checkpoint, write ``out/model`` (an artifact).

    Resumes from ``out/work`` when a run was interrupted. The artifact is float32
    whatever policy training computed in (:func:`model.network.as_float32`).

    Parameters
    ----------
    phases
        The phase-balanced training sets, trained one after the other.
    validation
        Chooses the best checkpoint.
    config
        Architecture, input size, epochs per phase, batch size, weights, precision,
        seed, version.
    out
        The run's folder.
    log
        A folder for the CSV logs and TensorBoard events (:class:`TensorBoardLog`);
        None: the CSV logs go to ``out/work``, no TensorBoard.

    Raises
    ------
    ValueError
        No phase or no validation set.
    FileNotFoundError
        ImageNet weights missing from the Keras cache, or a missing weights file.
    """
    if not phases or not validation:
        raise ValueError("training needs at least one phase and a validation set")
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    logs = log or work
    logs.mkdir(parents=True, exist_ok=True)
    progress_path = work / "progress.json"
    progress = _read_progress(progress_path)
    policy = config.policy
    if policy != "float32":
        LOGGER.info("training with the %s policy; the saved model will be float32", policy)
    best_path = work / "best.keras"
    with network.dtype_policy(policy):
        strategy = choose_strategy()
        with strategy.scope():
            model = network.build(config.architecture,  # type: ignore[arg-type]
                                  config.input_size, weights=config.weights, seed=config.seed)
            model.compile(optimizer=keras.optimizers.Nadam(config.learning_rate),
                          loss="categorical_crossentropy", metrics=["accuracy"])
        last = work / "last.weights.h5"
        if progress["phases_done"] and last.is_file():
            model.load_weights(last)
            LOGGER.info("resuming after phase %d", progress["phases_done"])
        checkpoint = keras.callbacks.ModelCheckpoint(
            best_path, monitor="val_accuracy", mode="max", save_best_only=True,
            initial_value_threshold=progress["best"])
        shown = Progress(len(phases), config.epochs_per_phase, [len(p) for p in phases])
        board = TensorBoardLog(log, config.epochs_per_phase) if log is not None else None
        val_data = data.dataset(validation, config.input_size, config.batch, cache="")
        for index in range(progress["phases_done"], len(phases)):
            number = index + 1
            LOGGER.info("phase %d of %d: %d images", number, len(phases), len(phases[index]))
            shown.begin_phase(number)
            train_data = data.dataset(phases[index], config.input_size, config.batch,
                                      augment=config.augment, shuffle=True,
                                      seed=config.seed + number, cache="")
            callbacks = [
                checkpoint, shown,
                keras.callbacks.CSVLogger(str(logs / f"log-phase{number}.csv"), append=True),
                keras.callbacks.BackupAndRestore(str(work / f"backup-phase{number}")),
            ]
            if board is not None:
                board.begin_phase(number)
                callbacks.append(board)
            # Keras' step bar on a terminal; the Progress line per epoch either way
            model.fit(train_data, validation_data=val_data, epochs=config.epochs_per_phase,
                      verbose=1 if sys.stdout.isatty() else 0, shuffle=False,
                      callbacks=callbacks)
            model.save_weights(work / "last.tmp.weights.h5")
            os.replace(work / "last.tmp.weights.h5", last)
            best = checkpoint.best
            progress = {"phases_done": number,
                        "best": None if best in (None, float("inf"), float("-inf"))
                        else float(best)}
            _write_progress(progress_path, progress)
        final = keras.models.load_model(best_path, compile=False) if best_path.is_file() else model
    artifact = out / "model"
    if artifact.exists():
        import shutil

        shutil.rmtree(artifact)
    all_training = [r for phase in phases for r in phase]
    return model_card.save_artifact(network.as_float32(final), artifact, {
        "version": config.version,
        "architecture": config.architecture,
        "input_size": config.input_size,
        "trained": True,
        "training_data": {"training": _summary(all_training), "validation": _summary(validation),
                          "phases": len(phases), "config": asdict(config)},
        "metrics": {"best_validation_accuracy": progress["best"]},
        "training": training_record(phases, validation, config, best_path.is_file(), policy),
        "notes": "Trained with dicom-node's training package (paper's phase-balanced scheme).",
    })


def training_record(phases: Sequence[Sequence[Record]], validation: Sequence[Record],
                    config: TrainConfig, checkpoint_kept: bool, precision: str = "float32",
                    ) -> model_card.TrainingRecord:
    """What the card says the model was trained from and how.

    Parameters
    ----------
    phases, validation
        The training phases and the validation set, as :func:`train` got them.
    config
        The run's configuration; ``extra["protocol"] == "paper"`` means the validation
        set is part of the test set, so the checkpoint was chosen on test images;
        ``extra["test_images"]`` is the size of the fold's test set, where known.
    checkpoint_kept
        A best checkpoint was saved (else the last epoch's weights were kept).
    precision
        The dtype policy training computed in.
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
        validation_images=len(validation), test_images=config.extra.get("test_images"),
        data_sources=sorted({r.source for r in everything}),
        checkpoint_chosen_on=chosen_on, precision=precision)
