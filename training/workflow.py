"""One fold, the paper's way: splits -> phase-balanced training -> test evaluation -> card.

``dicom-node train`` is this module behind its options: choose the fold (from
labelled data, or the authors' own split files), train it
(:func:`training.train.train`), evaluate the best checkpoint on the fold's test
set (:mod:`training.evaluate`) and record the result in the model card -- or, for
``--dry-run``, only say what it would train (:func:`describe`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model import card as model_card
from model.classes import CLASS_KEYS
from training import evaluate as evaluation
from training import sources, splits
from training.train import TrainConfig, train


@dataclass(frozen=True)
class FoldPlan:
    """How the data is cut: which fold of how many, phases, protocol, quotas (None:
    the paper's quota, or what a small data set can give every phase)."""

    folds: int = 5
    fold: int = 1
    phases: int = 8
    protocol: str = "clean"
    seed: int = 0
    unique_pneumonia: int | None = None
    unique_normal: int | None = None


@dataclass(frozen=True)
class ChosenFold:
    """The fold to train, with what defined it (written to the card)."""

    fold: splits.Fold
    plan: FoldPlan
    protocol: str
    unique_pneumonia: int
    unique_normal: int
    #: Where the fold was cut from, as the test evidence names it.
    data_name: str = ""

    @property
    def test_set_name(self) -> str:
        """The declared name of the fold's test set (the card's ``test.data_set``)."""
        return (f"fold {self.plan.fold} of {self.plan.folds} test set of "
                f"{self.data_name or 'unnamed data'}")


@dataclass(frozen=True)
class FoldRun:
    """A trained and evaluated fold."""

    artifact: Path
    card: model_card.ModelCard
    evaluation: dict[str, Any]


def data_fold(data: Path, plan: FoldPlan, out: Path, write: bool = True) -> ChosenFold:
    """Patient-level folds of phase-balanced phases from labelled data; every fold is
    written to ``out/splits``, ``plan.fold`` is chosen.

    Parameters
    ----------
    data
        A CSV list or a folder per class.
    plan
        Folds, fold, phases, protocol, seed and quotas.
    out
        The run's folder.
    write
        False: write nothing (a dry run).
    """
    records = sources.read(data)
    per_p = plan.unique_pneumonia or splits.phase_quota(
        records, "pneumonia", plan.folds, plan.phases, splits.PAPER_UNIQUE_PNEUMONIA)
    per_n = plan.unique_normal or splits.phase_quota(
        records, "normal", plan.folds, plan.phases, splits.PAPER_UNIQUE_NORMAL)
    made = splits.make_folds(records, plan.folds, plan.phases, per_p, per_n,
                             protocol=plan.protocol, seed=plan.seed)  # type: ignore[arg-type]
    if write:
        splits.write_folds(out / "splits", made)
    return ChosenFold(made[plan.fold - 1], plan, plan.protocol, per_p, per_n,
                      evaluation.data_set_name(data))


def paper_fold(split_files: Path, images: Path, plan: FoldPlan, out: Path,
               write: bool = True) -> ChosenFold:
    """The fold the authors published, always under the ``paper`` protocol.

    Parameters
    ----------
    split_files
        Their ``All.csv`` and ``fold<k>/train<p>.csv`` files.
    images
        The folder holding all their images.
    plan
        Which fold, how many phases, the seed.
    out
        The run's folder; the fold is written to ``out/splits``.
    write
        False: write nothing (a dry run).

    Raises
    ------
    ValueError, OSError
        The files do not describe such a fold, or cannot be read.
    """
    chosen = splits.import_paper_fold(split_files, plan.fold, images, plan.phases,
                                      seed=plan.seed)
    if write:
        splits.write_folds(out / "splits", [chosen])
    return ChosenFold(chosen, plan, "paper", 0, 0,
                      f"the authors' splits in {split_files.resolve().name}")


def train_config(chosen: ChosenFold, **options: Any) -> TrainConfig:
    """The training configuration of ``chosen``, with ``options`` (architecture, input
    size, epochs per phase, batch size, weights, version) and the fold recorded."""
    plan = chosen.plan
    return TrainConfig(seed=plan.seed, extra={
        "fold": plan.fold, "folds": plan.folds, "protocol": chosen.protocol,
        "unique_pneumonia": chosen.unique_pneumonia, "unique_normal": chosen.unique_normal,
        "test_images": len(chosen.fold.test),
    }, **options)


def train_and_evaluate(chosen: ChosenFold, config: TrainConfig, out: Path,
                       log: Path | None = None) -> FoldRun:
    """Train ``chosen`` into ``out/model``, evaluate it on the fold's test set into
    ``out/evaluation`` -- operating points chosen on the fold's validation set for
    :data:`~training.evaluate.DEFAULT_TARGET_SENSITIVITY` -- and record the evidence in
    the model card (which says so when the checkpoint was chosen on test images).

    Parameters
    ----------
    chosen
        The fold.
    config
        The training configuration (:func:`train_config`).
    out
        The fold's run folder.
    log
        A folder for the CSV logs and TensorBoard events; None: CSV logs in ``out/work``.
    """
    train(chosen.fold.phases, chosen.fold.validation, config, out, log)
    artifact = out / "model"
    paper = chosen.protocol == "paper"
    result = evaluation.evaluate_artifact(
        artifact, chosen.fold.test, out / "evaluation", paper=paper,
        data_set=chosen.test_set_name, validation=chosen.fold.validation,
        checkpoint_chosen_on_test=paper)
    return FoldRun(artifact, evaluation.record_in_card(artifact, result), result)


def _counts(records: Sequence[sources.Record]) -> str:
    found = Counter(r.label for r in records)
    return (f"{len(records)} images ("
            + ", ".join(f"{key} {found[key]}" for key in CLASS_KEYS) + ")")


def describe(chosen: ChosenFold, config: TrainConfig) -> list[str]:
    """What a run of ``chosen`` under ``config`` would train on, line by line: the fold,
    each phase's class counts and steps, the validation and test sets."""
    plan, fold = chosen.plan, chosen.fold
    lines = [f"fold {plan.fold} of {plan.folds} ({chosen.protocol} protocol, "
             f"{chosen.data_name or 'unnamed data'}): {len(fold.phases)} phases x "
             f"{config.epochs_per_phase} epochs, {config.architecture} at "
             f"{config.input_size} px, batch {config.batch}, weights {config.weights}, "
             f"precision {config.policy}"]
    lines += [f"phase {k}: {_counts(phase)}, {math.ceil(len(phase) / config.batch)} steps "
              "per epoch" for k, phase in enumerate(fold.phases, start=1)]
    lines.append(f"validation: {_counts(fold.validation)}")
    lines.append(f"test: {_counts(fold.test)}")
    return lines
