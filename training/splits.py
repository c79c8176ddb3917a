"""Patient-level folds and the paper's phase-balanced training phases (section 2.2).

The paper trained each fold in ``phases`` (8) phases; every phase holds all the
fold's training COVID-19 images, the pneumonia images of the first source (the
covid-chestxray-dataset, "common" to every phase), ``unique_pneumonia`` (200)
and ``unique_normal`` (250) images seen in no other phase -- 633 images.

Folds are made at the patient level (no patient in both training and test).
The validation set used to pick checkpoints is drawn from patients outside the
test set (``protocol = "clean"``, the default); ``protocol = "paper"`` instead
reproduces the authors' choice, a subset of the test images (all test COVID-19,
300 normal, 300 pneumonia), for comparison only. Splits are written as CSV
files (``filename,class``, the authors' format, plus patient and source) so a
run can be repeated exactly.
"""

from __future__ import annotations

import csv
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from sklearn.model_selection import (  # type: ignore[import-untyped]  # no py.typed marker
    StratifiedGroupKFold,
)

from training.sources import Record

Protocol = Literal["clean", "paper"]
#: The automatic quota gives the phases this share of a class's training pool; the rest is
#: what ``clean`` validation draws from (:func:`_clean_validation` takes the phases' leftovers).
PHASE_SHARE = 0.8
#: The paper's per-phase quotas of images that only one phase sees (section 3.2).
PAPER_UNIQUE_PNEUMONIA = 200
PAPER_UNIQUE_NORMAL = 250
PAPER_LABELS = {"covid": "COVID-19", "normal": "normal", "pneumonia": "pneumonia"}


@dataclass
class Fold:
    """One fold: its training phases, its checkpoint-selection set and its test set."""

    phases: list[list[Record]]
    validation: list[Record]
    test: list[Record]



def patient_folds(records: Sequence[Record], folds: int, seed: int) -> list[list[Record]]:
    """Split ``records`` into ``folds`` test sets, never splitting a patient.

    scikit-learn's ``StratifiedGroupKFold`` (shuffled with ``seed``): the groups
    are patients, so no patient is in two folds, and the images' labels are
    spread as evenly as whole patients allow, so every fold has each class when
    there are at least ``folds`` patients of it. Records keep their input order
    within a fold.
    """
    if folds < 2:
        raise ValueError("folds must be at least 2")
    keys = [r.patient for r in records]
    number = {key: i for i, key in enumerate(sorted(set(keys)))}
    if len(number) < folds:
        raise ValueError(f"{folds} folds need at least {folds} patients; there are "
                         f"{len(number)}")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    labels = [r.label for r in records]
    groups = [number[key] for key in keys]
    return [[records[i] for i in test]
            for _, test in splitter.split(np.zeros((len(records), 1)), labels, groups)]


def common_pneumonia_source(records: Sequence[Record]) -> str | None:
    """The source whose pneumonia images every phase repeats (the paper's "common"
    images): the source of the first COVID-19 record."""
    return next((r.source for r in records if r.label == "covid"), None)


def phase_quota(records: Sequence[Record], label: str, folds: int, phases: int,
                paper: int) -> int:
    """The per-phase quota of unique ``label`` images: the paper's, or what the data allow.

    Parameters
    ----------
    records : sequence of Record
        Every record the folds will be made of.
    label : str
        ``"pneumonia"`` or ``"normal"``. Pneumonia images of the first COVID-19
        record's source are not counted: every phase repeats them (the paper's
        "common" images).
    folds : int
        Number of folds; one of them is the test set, so a fold trains on
        ``(folds - 1) / folds`` of the images.
    phases : int
        Number of training phases, each taking its own unique images.
    paper : int
        The paper's quota (200 pneumonia, 250 normal): the most this returns.

    Returns
    -------
    int
        ``paper``, or for a smaller data set the images each phase can have when
        the phases share :data:`PHASE_SHARE` of a fold's training pool; at least 1.
    """
    common = common_pneumonia_source(records)
    count = sum(1 for r in records if r.label == label
                and not (label == "pneumonia" and r.source == common))
    return max(1, min(paper, int(count * (folds - 1) / folds * PHASE_SHARE) // phases))


def phase_balanced(
    train: Sequence[Record],
    phases: int = 8,
    unique_pneumonia: int = PAPER_UNIQUE_PNEUMONIA,
    unique_normal: int = PAPER_UNIQUE_NORMAL,
    common_source: str | None = None,
    seed: int = 0,
) -> tuple[list[list[Record]], list[Record]]:
    """The paper's phases from a fold's training pool; returns (phases, unused records).

    Parameters
    ----------
    train
        The fold's training pool.
    phases
        How many phases (the paper: 8).
    unique_pneumonia, unique_normal
        Images of each class that only one phase sees, per phase (whole patients).
    common_source
        The source whose pneumonia images every phase repeats (default:
        :func:`common_pneumonia_source`).
    seed
        Seed of the shuffles.

    Raises
    ------
    ValueError
        The pool has too few pneumonia or normal images for the quotas.
    """
    covid = [r for r in train if r.label == "covid"]
    repeated = common_pneumonia_source(train) if common_source is None else common_source
    common_images = [r for r in train if r.label == "pneumonia" and r.source == repeated]
    rng = random.Random(seed)  # noqa: S311 - reproducible shuffling, not security
    pneumonia = _patients([r for r in train
                           if r.label == "pneumonia" and r.source != repeated], rng)
    normal = _patients([r for r in train if r.label == "normal"], rng)
    available_p = sum(len(g) for g in pneumonia)
    available_n = sum(len(g) for g in normal)
    if available_p < phases * unique_pneumonia or available_n < phases * unique_normal:
        raise ValueError(
            f"{phases} phases need {phases * unique_pneumonia} pneumonia and "
            f"{phases * unique_normal} normal images beyond the common ones; the training "
            f"pool has {available_p} and {available_n}")
    out = []
    for _ in range(phases):
        taken_p, pneumonia = _take(pneumonia, unique_pneumonia)
        taken_n, normal = _take(normal, unique_normal)
        out.append(covid + common_images + taken_p + taken_n)
    unused = [r for group in pneumonia + normal for r in group]
    return out, unused


def _patients(records: list[Record], rng: random.Random) -> list[list[Record]]:
    """Records grouped by patient, groups in a seeded random order."""
    groups: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for record in records:
        groups[record.patient].append(record)
    order = sorted(groups)
    rng.shuffle(order)
    return [groups[key] for key in order]


def _take(groups: list[list[Record]], quota: int) -> tuple[list[Record], list[list[Record]]]:
    """Whole patients, first fit, until exactly ``quota`` images (or none fit any more).

    By hand, as :func:`_clean_validation`: scikit-learn's splitters cut by a share
    or a count of groups, none by a number of images made of whole patients.

    A patient's images always stay together, so no patient is split between a
    phase and the test set.
    """
    taken: list[Record] = []
    left: list[list[Record]] = []
    for group in groups:
        if len(taken) + len(group) <= quota:
            taken.extend(group)
        else:
            left.append(group)
    return taken, left


def make_folds(
    records: Sequence[Record],
    folds: int = 5,
    phases: int = 8,
    unique_pneumonia: int = PAPER_UNIQUE_PNEUMONIA,
    unique_normal: int = PAPER_UNIQUE_NORMAL,
    validation_per_class: int = 100,
    validation_covid_fraction: float = 0.15,
    protocol: Protocol = "clean",
    seed: int = 0,
) -> list[Fold]:
    """Every fold of the paper's scheme over ``records``.

    A fold's test set is its patients' images plus the training pool's images
    that no phase and no validation uses (the authors tested on everything they
    did not train on). ``clean`` validation never touches a test patient: about
    ``validation_covid_fraction`` of the pool's COVID-19 patients are held out
    of training (every phase uses all the rest), plus up to
    ``validation_per_class`` normal and pneumonia images from patients the
    phases leave over. ``paper`` validation is a subset of the test set.

    Parameters
    ----------
    records
        Every labelled image, with its patient.
    folds, phases
        How many patient-level folds, and phases per fold.
    unique_pneumonia, unique_normal
        Per-phase quotas of images only one phase sees (see :func:`phase_quota`).
    validation_per_class, validation_covid_fraction
        The ``clean`` validation set's size.
    protocol
        ``clean`` or ``paper``.
    seed
        Seed of the folds and shuffles.

    Raises
    ------
    ValueError
        Fewer than two folds or fewer patients than folds, or a training pool too
        small for the phases' quotas.
    """
    test_sets = patient_folds(records, folds, seed)
    result = []
    for k, test in enumerate(test_sets):
        test_patients = {r.patient for r in test}
        pool = [r for r in records if r.patient not in test_patients]
        held_covid: list[Record] = []
        if protocol == "clean":
            held_covid, pool = _hold_out_covid(pool, validation_covid_fraction, seed + k)
        fold_phases, unused = phase_balanced(pool, phases, unique_pneumonia, unique_normal,
                                             seed=seed + k)
        if protocol == "paper":
            validation, rest = _paper_validation(test, seed + k), unused
        else:
            validation, rest = _clean_validation(unused, validation_per_class, seed + k)
            validation = held_covid + validation
        result.append(Fold(fold_phases, validation, test + rest))
    return result


def _hold_out_covid(pool: list[Record], fraction: float, seed: int
                    ) -> tuple[list[Record], list[Record]]:
    # By hand: a shuffle and a slice of one class's patients; GroupShuffleSplit on the
    # COVID-19 records would add only its own rounding (up) of the held-out count.
    patients = sorted({r.patient for r in pool if r.label == "covid"})
    random.Random(seed).shuffle(patients)  # noqa: S311
    held = set(patients[:round(len(patients) * fraction)])
    return ([r for r in pool if r.patient in held],
            [r for r in pool if r.patient not in held])


def _clean_validation(unused: list[Record], per_class: int, seed: int
                      ) -> tuple[list[Record], list[Record]]:
    rng = random.Random(seed)  # noqa: S311
    by_patient: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for record in unused:
        by_patient[record.patient].append(record)
    patients = sorted(by_patient)
    rng.shuffle(patients)
    taken: Counter[str] = Counter()
    validation: list[Record] = []
    rest: list[Record] = []
    for patient in patients:
        images = by_patient[patient]
        label = images[0].label
        if taken[label] < per_class:
            validation.extend(images)
            taken[label] += len(images)
        else:
            rest.extend(images)
    return validation, rest


def _paper_validation(test: list[Record], seed: int) -> list[Record]:
    rng = random.Random(seed)  # noqa: S311
    shuffled = list(test)
    rng.shuffle(shuffled)
    quota = {"covid": len(test), "normal": 300, "pneumonia": 300}
    taken: Counter[str] = Counter()
    chosen = []
    for record in shuffled:
        if taken[record.label] < quota[record.label]:
            chosen.append(record)
            taken[record.label] += 1
    return chosen


# --- files ---

def write_records(path: Path, records: Sequence[Record]) -> None:
    """``filename,class,patient_id,source`` (the authors' two columns first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "class", "patient_id", "source"])
        for r in records:
            writer.writerow([str(r.path), PAPER_LABELS[r.label], r.patient_id, r.source])


def write_folds(out: Path, folds: Sequence[Fold]) -> None:
    """``out/fold<k>/train<p>.csv``, ``validation.csv``, ``test.csv`` (k, p from 1)."""
    for k, fold in enumerate(folds, start=1):
        for p, phase in enumerate(fold.phases, start=1):
            write_records(out / f"fold{k}" / f"train{p}.csv", phase)
        write_records(out / f"fold{k}" / "validation.csv", fold.validation)
        write_records(out / f"fold{k}" / "test.csv", fold.test)


@dataclass(frozen=True)
class PhaseComposition:
    """What one of the authors' phase files holds."""

    covid: int
    common_pneumonia: int
    unique_pneumonia: int
    normal: int


def check_paper_fold(fold_dir: Path, phases: int = 8) -> list[PhaseComposition]:
    """Read the authors' ``train1..8.csv`` of one fold and check the paper's composition.

    Every phase must repeat the same COVID-19 set and the same common pneumonia
    set; its other pneumonia and its normal images must appear in no other phase.
    Raises ValueError naming the file that breaks the rule.
    """
    rows = []
    for p in range(1, phases + 1):
        with (fold_dir / f"train{p}.csv").open(newline="") as f:
            rows.append([(r["filename"], r["class"]) for r in csv.DictReader(f)])
    covid = [frozenset(n for n, c in phase if c == "COVID-19") for phase in rows]
    pneumonia = [{n for n, c in phase if c == "pneumonia"} for phase in rows]
    normal = [{n for n, c in phase if c == "normal"} for phase in rows]
    if len(set(covid)) != 1:
        raise ValueError(f"{fold_dir.name}: phases do not share one COVID-19 set")
    common = set.intersection(*pneumonia)
    seen_p: set[str] = set()
    seen_n: set[str] = set()
    result = []
    for p, (pn, nm) in enumerate(zip(pneumonia, normal, strict=True), start=1):
        unique = pn - common
        if unique & seen_p or nm & seen_n:
            raise ValueError(f"{fold_dir.name}/train{p}.csv repeats an image of another phase")
        seen_p |= unique
        seen_n |= nm
        result.append(PhaseComposition(len(covid[0]), len(common), len(unique), len(nm)))
    return result


def import_paper_fold(splits_dir: Path, fold: int, images: Path, phases: int = 8,
                      protocol: Protocol = "paper", seed: int = 0) -> Fold:
    """A fold built from the authors' own files (``All.csv``, ``fold<k>/train<p>.csv``).

    Image paths are ``images/<filename>`` (the authors kept all images in one
    folder). The test set is every image of ``All.csv`` in no phase, as in their
    notebook; ``paper`` validation is their ``s_test`` recipe (all test COVID-19,
    300 normal, 300 pneumonia). The authors' files carry no patient ids, so a
    ``clean`` validation set cannot be drawn from them; it is refused.

    Parameters
    ----------
    splits_dir
        The folder with ``All.csv`` and ``fold<k>/``.
    fold
        Which fold (1-based).
    images
        The folder holding all their images.
    phases
        Phases per fold (theirs: 8).
    protocol, seed
        Must be ``paper``; the seed of the validation draw.

    Raises
    ------
    ValueError
        ``protocol`` is not ``paper``, or the fold's files do not have the paper's
        phase composition.
    """
    if protocol != "paper":
        raise ValueError("the authors' files have no patient ids: only protocol 'paper' "
                         "can be reproduced from them")
    check_paper_fold(splits_dir / f"fold{fold}", phases)

    def load(path: Path) -> list[Record]:
        with path.open(newline="") as f:
            return [Record(images / row["filename"], _label(row["class"]),
                           Path(row["filename"]).stem, "paper")
                    for row in csv.DictReader(f)]

    fold_phases = [load(splits_dir / f"fold{fold}" / f"train{p}.csv")
                   for p in range(1, phases + 1)]
    trained = {r.path for phase in fold_phases for r in phase}
    test = [r for r in load(splits_dir / "All.csv") if r.path not in trained]
    return Fold(fold_phases, _paper_validation(test, seed), test)


def _label(text: str) -> str:
    from model.classes import CLASS_KEYS, index_of

    return CLASS_KEYS[index_of(text)]
