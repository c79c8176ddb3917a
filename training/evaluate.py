"""Evaluation in the layout of the paper's Tables 3 and 4, and what a clinician needs besides.

For each class: TP, FP, FN, TN, sensitivity, specificity, precision and
accuracy (one-vs-rest), and the overall accuracy -- the paper's tables -- plus
balanced accuracy, per-class ROC AUC, bootstrap 95 % intervals (over patients, the
unit of independence, where the records name them: a patient's images are drawn
together), the PPV at a prevalence the user gives (precision on a test set depends on
its class mix: the paper's COVID-19 precision of 35 % came from 31 positives among
11,302 images), the confusion matrix and ROC curves as PNG, ``metrics.json`` and a
Markdown report. When records come from several sources, results per source are reported
too: a model can learn the source instead of the disease. When the checkpoint was
chosen on the test images (protocol ``paper``), every figure of the report is marked.

Operating points: per class, the threshold chosen on *validation* data for a
target sensitivity (:func:`choose_operating_points`), then measured on the test
set (:func:`operating_points_on_test`). :func:`record_in_card` writes the test
evidence and the operating points into the model card, where
:func:`model.card.validation_status` judges them.

Counting and ROC come from scikit-learn, the plots from matplotlib (both in the
``training`` extra; the node never imports this package). Only the bootstrap
counts by hand, all rounds at once (scikit-learn's per-call input checks would
cost seconds over a thousand rounds); the tests hold every round equal to
:func:`metrics` on the resampled images.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Collection, Hashable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from sklearn.exceptions import UndefinedMetricWarning  # type: ignore[import-untyped]
from sklearn.metrics import (  # type: ignore[import-untyped]  # no py.typed marker
    confusion_matrix,
    roc_auc_score,
    roc_curve,
)

from model import card as model_card
from model.classes import CLASS_KEYS, CLASSES

if TYPE_CHECKING:
    from model.engine import Engine

#: Target sensitivity of each class that gets an operating point (normal gets none: a
#: threshold on "normal" would flag nothing a radiologist acts on).
DEFAULT_TARGET_SENSITIVITY: dict[str, float] = {"covid": 0.90, "pneumonia": 0.90}

#: The paper's Table 4 average row for the concatenated network (percent).
PAPER_TABLE4_CONCATENATED = {
    "covid": {"sensitivity": 80.53, "specificity": 99.56, "accuracy": 99.50},
    "pneumonia": {"sensitivity": 87.35, "specificity": 94.32, "accuracy": 91.60},
    "normal": {"sensitivity": 94.06, "specificity": 88.09, "accuracy": 91.71},
    "overall_accuracy": 91.40,
}


def confusion(truth: NDArray[np.int_], predicted: NDArray[np.int_]) -> NDArray[np.int_]:
    """Rows: true class, columns: predicted class, in :data:`CLASS_KEYS` order."""
    if len(truth) == 0:  # scikit-learn refuses empty input; an empty test set counts nothing
        return np.zeros((len(CLASS_KEYS), len(CLASS_KEYS)), dtype=np.int64)
    matrix: NDArray[np.int_] = confusion_matrix(truth, predicted,
                                                labels=list(range(len(CLASS_KEYS))))
    return matrix


def roc_auc(truth: NDArray[np.bool_], score: NDArray[np.float64]) -> float | None:
    """Area under the ROC curve (ties count half); None when ``truth`` holds one class only."""
    truth = np.asarray(truth, dtype=bool)
    if truth.all() or not truth.any():  # scikit-learn raises; the report shows "-"
        return None
    return float(roc_auc_score(truth, score))


def _per_class(matrix: NDArray[np.int_]) -> dict[str, dict[str, float | int | None]]:
    total = int(matrix.sum())
    out: dict[str, dict[str, float | int | None]] = {}
    for i, key in enumerate(CLASS_KEYS):
        tp = int(matrix[i, i])
        fn = int(matrix[i].sum()) - tp
        fp = int(matrix[:, i].sum()) - tp
        tn = total - tp - fn - fp
        out[key] = {
            "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "sensitivity": tp / (tp + fn) if tp + fn else None,
            "specificity": tn / (tn + fp) if tn + fp else None,
            "precision": tp / (tp + fp) if tp + fp else None,
            "accuracy": (tp + tn) / total if total else None,
        }
    return out


def _balanced_accuracy(per_class: Mapping[str, Mapping[str, Any]]) -> float | None:
    """Mean of the per-class sensitivities (scikit-learn's ``balanced_accuracy_score``).

    None unless every class has images: over fewer classes, chance is no longer 1/3,
    and :func:`model.card.validation_status` compares with 1/3.
    """
    values = [stats["sensitivity"] for stats in per_class.values()]
    if any(value is None for value in values):
        return None
    return float(np.mean(values))


def ppv_at(sensitivity: float | None, specificity: float | None, prevalence: float
           ) -> float | None:
    """Positive predictive value at ``prevalence`` (Bayes).

    Hand-written: scikit-learn's precision is the PPV at the test set's own class mix;
    no library rescales it to another prevalence.
    """
    if sensitivity is None or specificity is None:
        return None
    hits = sensitivity * prevalence
    false_alarms = (1 - specificity) * (1 - prevalence)
    return hits / (hits + false_alarms) if hits + false_alarms else None


def metrics(truth: Sequence[int], probabilities: NDArray[np.float64],
            prevalence: dict[str, float] | None = None, bootstrap: int = 1000,
            seed: int = 0, groups: Sequence[Hashable] | None = None) -> dict[str, Any]:
    """Every figure for one set of predictions: the paper's tables, AUC, intervals.

    Parameters
    ----------
    truth
        The true class index of each image.
    probabilities
        N x 3 network outputs, in the order of :data:`model.classes.CLASS_KEYS`.
    prevalence
        Class -> fraction: also report the PPV at that prevalence.
    bootstrap, seed
        Bootstrap rounds of the 95 % intervals, and their seed.
    groups
        The patient of each image (any hashable key, e.g. ``(source, patient_id)``): the
        bootstrap then draws patients, each with all of their images, since a patient's
        images are not independent of each other. None: it draws images, and says so.
    """
    y = np.asarray(truth, dtype=np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    predicted = p.argmax(axis=1)
    matrix = confusion(y, predicted)
    per_class = _per_class(matrix)
    units = _units(groups, len(y))
    result: dict[str, Any] = {
        "images": len(y),
        "patients": None if groups is None else int(units.max(initial=-1)) + 1,
        "overall_accuracy": float((predicted == y).mean()) if len(y) else None,
        "balanced_accuracy": _balanced_accuracy(per_class),
        "confusion_matrix": matrix.tolist(),
        "classes": list(CLASS_KEYS),
        "per_class": per_class,
    }
    for i, key in enumerate(CLASS_KEYS):
        result["per_class"][key]["roc_auc"] = roc_auc(y == i, p[:, i])
        if prevalence and key in prevalence:
            stats = result["per_class"][key]
            result["per_class"][key][f"ppv_at_{prevalence[key]:g}"] = ppv_at(
                stats["sensitivity"], stats["specificity"], prevalence[key])
    rounds = bootstrap if len(y) else 0
    result.update(interval_unit="image" if groups is None else "patient",
                  bootstrap_rounds=rounds)
    result.update(intervals_95_basis=interval_basis(result) if rounds else None,
                  intervals_95=_bootstrap(y, p, units, rounds, seed) if rounds else {})
    return result


def interval_basis(result: Mapping[str, Any]) -> str:
    """What the 95 % intervals of :func:`metrics` resampled, in a sentence."""
    rounds = result["bootstrap_rounds"]
    if result["interval_unit"] == "image":
        return (f"95 % intervals: bootstrap over {result['images']} images ({rounds} rounds); "
                "the test set names no patients, so images of one patient count as "
                "independent and the intervals may be too narrow.")
    text = (f"95 % intervals: bootstrap over {result['patients']} patients ({rounds} rounds), "
            f"each drawn with all of their images ({result['images']} images in all).")
    if result["patients"] == result["images"]:
        text += (" Every patient has exactly one image (a list without patient ids gives "
                 "each image its own): where patients have several images, these intervals "
                 "are too narrow.")
    return text


def _units(groups: Sequence[Hashable] | None, images: int) -> NDArray[np.int_]:
    """The unit each image is resampled with: its patient (numbered in order of first
    appearance, so that one image per patient resamples as images do), or itself."""
    if groups is None:
        return np.arange(images)
    if len(groups) != images:
        raise ValueError(f"groups: {len(groups)} patient keys for {images} images")
    number: dict[Hashable, int] = {}
    return np.fromiter((number.setdefault(key, len(number)) for key in groups),
                       dtype=np.int64, count=images)


#: Cells (rounds x images) of one block of bootstrap rounds: bounds the memory a large
#: test set takes (2**21 float64 cells are 16 MiB an array).
_BLOCK_CELLS = 2**21


def _resample_counts(units: NDArray[np.int_], rounds: int, seed: int
                     ) -> Iterator[NDArray[np.float64]]:
    """Blocks of bootstrap rounds: rows of how often each unit is drawn in a round.

    A round draws as many units as there are, with replacement (the cluster bootstrap
    when a unit is a patient); every figure of a round is then a weighted count, so
    one matrix product serves all the images of a unit.
    """
    rng = np.random.default_rng(seed)
    n = int(units.max(initial=-1)) + 1
    block = max(1, _BLOCK_CELLS // max(n, len(units), 1))
    for start in range(0, rounds, block):
        size = min(block, rounds - start)
        draws = rng.integers(0, n, (size, n)) + np.arange(size)[:, None] * n
        yield np.bincount(draws.ravel(), minlength=size * n).reshape(size, n).astype(float)


def _per_unit(units: NDArray[np.int_], values: NDArray[Any]) -> NDArray[np.float64]:
    """Units x columns: the sum of ``values`` (images x columns) over each unit's images."""
    n = int(units.max(initial=-1)) + 1
    sums: NDArray[np.float64] = np.zeros((n, values.shape[1]))
    np.add.at(sums, units, values)
    return sums


def _bootstrap(y: NDArray[np.int_], p: NDArray[np.float64], units: NDArray[np.int_],
               rounds: int, seed: int) -> dict[str, list[float]]:
    # Hand-written: scipy.stats.bootstrap needs every statistic defined in every
    # resample, and draws observations, not clusters; here a resample without, say, a
    # COVID-19 case just skips that class's sensitivity (NaN below), and one set of
    # resamples serves every figure.
    k = len(CLASS_KEYS)
    cells = np.eye(k * k)[y * k + p.argmax(1)]  # images x 9: each image's confusion cell
    confusion_of_unit = _per_unit(units, cells)
    aucs = [_WeightedAuc(y == i, p[:, i], units) for i in range(k)]
    samples: dict[str, list[NDArray[np.float64]]] = {}
    for counts in _resample_counts(units, rounds, seed):
        matrices = (counts @ confusion_of_unit).reshape(-1, k, k)
        figures = _rates(matrices)
        figures |= {f"{key}.roc_auc": auc.of(counts) for key, auc in zip(CLASS_KEYS, aucs,
                                                                          strict=True)}
        for name, values in figures.items():
            samples.setdefault(name, []).append(values)
    intervals = {name: _percentiles(np.concatenate(blocks)) for name, blocks in samples.items()}
    return {name: interval for name, interval in intervals.items() if interval is not None}


def _percentiles(values: NDArray[np.float64]) -> list[float] | None:
    """The 2.5th and 97.5th percentiles of the rounds in which the figure is defined
    (None when it is defined in none)."""
    defined = values[~np.isnan(values)]
    if not len(defined):
        return None
    return [float(np.percentile(defined, 2.5)), float(np.percentile(defined, 97.5))]


def _ratio(numerator: NDArray[np.float64], denominator: NDArray[np.float64]
           ) -> NDArray[np.float64]:
    """numerator / denominator, NaN where the denominator is 0 (the figure is undefined)."""
    out: NDArray[np.float64] = np.full(numerator.shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _rates(matrices: NDArray[np.float64]) -> dict[str, NDArray[np.float64]]:
    """Rounds x 3 x 3 confusion matrices -> each figure of :func:`_per_class` and the
    accuracies, one value a round (NaN where undefined, as None there)."""
    total = matrices.sum(axis=(1, 2))
    tp = np.diagonal(matrices, axis1=1, axis2=2)
    actual, flagged = matrices.sum(axis=2), matrices.sum(axis=1)
    tn = total[:, None] - actual - flagged + tp
    sensitivity = _ratio(tp, actual)
    specificity = _ratio(tn, total[:, None] - actual)
    precision = _ratio(tp, flagged)
    out = {"overall_accuracy": _ratio(tp.sum(axis=1), total),
           # NaN in a class's sensitivity (no image of it) makes the mean NaN, as wanted
           "balanced_accuracy": sensitivity.mean(axis=1)}
    for i, key in enumerate(CLASS_KEYS):
        out |= {f"{key}.sensitivity": sensitivity[:, i], f"{key}.specificity": specificity[:, i],
                f"{key}.precision": precision[:, i]}
    return out


class _WeightedAuc:
    """One class's ROC AUC in bootstrap rounds, each image weighted by how often its unit
    was drawn: :func:`roc_auc`'s Mann-Whitney count with weights, over the scores sorted
    once."""

    def __init__(self, truth: NDArray[np.bool_], score: NDArray[np.float64],
                 units: NDArray[np.int_]) -> None:
        order = np.argsort(score, kind="stable")
        ordered = score[order]
        self.units = units[order]
        self.positive = truth[order].astype(float)
        # the first image of each run of equal scores: ties are counted half
        self.levels = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])

    def of(self, counts: NDArray[np.float64]) -> NDArray[np.float64]:
        if not len(self.units):
            return np.full(len(counts), np.nan)
        weights = counts[:, self.units]
        positives = np.add.reduceat(weights * self.positive, self.levels, axis=1)
        negatives = np.add.reduceat(weights, self.levels, axis=1) - positives
        below = np.cumsum(negatives, axis=1) - negatives
        wins = (positives * (below + negatives / 2)).sum(axis=1)
        return _ratio(wins, positives.sum(axis=1) * negatives.sum(axis=1))


def choose_operating_points(truth_val: Sequence[int], probs_val: NDArray[np.float64],
                            targets: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """Per class with a target sensitivity: the threshold chosen on validation data.

    The *highest* threshold whose validation sensitivity (one vs rest, positive when
    ``p >= threshold``) reaches the target, so that the specificity is as high as that
    sensitivity allows. A class without positives in the validation data gets none
    (it is left out of the result).

    Returns
    -------
    dict
        class -> threshold, target_sensitivity, validation_images,
        validation_positives, validation_sensitivity, validation_specificity (None
        without negatives).
    """
    y = np.asarray(truth_val, dtype=np.int64)
    p = np.asarray(probs_val, dtype=np.float64)
    chosen: dict[str, dict[str, Any]] = {}
    for key, target in targets.items():
        if not 0.0 < target <= 1.0:
            raise ValueError(f"target sensitivity of {key}: {target} is not in (0, 1]")
        positives = y == CLASS_KEYS.index(key)
        if not positives.any():
            continue
        with warnings.catch_warnings():  # no negatives: fpr is undefined, said below as None
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            # drop_intermediate would drop points on straight stretches of the curve, and
            # with them, maybe, the highest threshold that reaches the target.
            fpr, tpr, thresholds = roc_curve(positives, p[:, CLASS_KEYS.index(key)],
                                             drop_intermediate=False)
        at = int(np.argmax(tpr >= target))  # thresholds fall as tpr rises: the first is highest
        chosen[key] = {
            "threshold": min(float(thresholds[at]), 1.0),
            "target_sensitivity": float(target),
            "validation_images": len(y),
            "validation_positives": int(positives.sum()),
            "validation_sensitivity": float(tpr[at]),
            "validation_specificity": float(1 - fpr[at]) if (~positives).any() else None,
        }
    return chosen


def operating_points_on_test(chosen: Mapping[str, Mapping[str, Any]], truth: Sequence[int],
                             probabilities: NDArray[np.float64], rounds: int = 1000,
                             seed: int = 0, groups: Sequence[Hashable] | None = None
                             ) -> dict[str, dict[str, Any]]:
    """What the thresholds of :func:`choose_operating_points` give on the test set.

    Parameters
    ----------
    chosen
        class -> at least ``threshold`` (what :func:`choose_operating_points` returned).
    truth, probabilities
        The test set's classes and network outputs.
    rounds, seed
        Bootstrap rounds of the 95 % intervals, and their seed.
    groups
        The patient of each image: the bootstrap draws patients (as :func:`metrics`).

    Returns
    -------
    dict
        ``chosen`` with test_sensitivity, test_specificity and their ``*_95`` intervals
        (None where the test set has no positives, or no negatives, of the class).
    """
    y = np.asarray(truth, dtype=np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    units = _units(groups, len(y))
    blocks = list(_resample_counts(units, rounds, seed)) if len(y) else []
    out: dict[str, dict[str, Any]] = {}
    for key, point in chosen.items():
        i = CLASS_KEYS.index(key)
        positives = y == i
        flagged = p[:, i] >= point["threshold"]
        out[key] = {**point}
        for name, cases, hits in (("sensitivity", positives, positives & flagged),
                                  ("specificity", ~positives, ~positives & ~flagged)):
            out[key][f"test_{name}"] = float(hits.sum() / cases.sum()) if cases.any() else None
            out[key][f"test_{name}_95"] = _rate_interval(cases, hits, units, blocks)
    return out


def _rate_interval(cases: NDArray[np.bool_], hits: NDArray[np.bool_], units: NDArray[np.int_],
                   blocks: Sequence[NDArray[np.float64]]) -> list[float] | None:
    # Percentile bootstrap of hits / cases; resamples without a case are skipped, as in
    # _bootstrap.
    if not blocks or not cases.any():
        return None
    of_unit = _per_unit(units, np.stack([cases, hits], axis=1).astype(float))
    counted = np.concatenate([counts @ of_unit for counts in blocks])
    return _percentiles(_ratio(counted[:, 1], counted[:, 0]))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


#: What the report says beside the figures of a model whose checkpoint the test set chose.
CHECKPOINT_ON_TEST_NOTE = ("**The checkpoint was chosen on these test images (protocol "
                           "paper): every figure below is optimistic, and none of it is "
                           "evidence of how the model does on new images.**")
#: The mark after every figure of such a model, and the footnote under each table.
CHECKPOINT_MARK = "†"
CHECKPOINT_FOOTNOTE = (f"{CHECKPOINT_MARK} checkpoint chosen on these test images "
                       "(protocol paper): optimistic.")


def report_markdown(result: dict[str, Any], title: str, paper: bool = False,
                    by_source: dict[str, dict[str, Any]] | None = None) -> str:
    """The Markdown report: Table 3 (counts), Table 4 (percentages), AUC, intervals.

    When the checkpoint was chosen on the test images, every figure carries
    :data:`CHECKPOINT_MARK` and every table its footnote.

    Parameters
    ----------
    result
        What :func:`metrics` returned.
    title
        The report's heading.
    paper
        Also show the paper's Table 4 row.
    by_source
        Metrics per data source, shown after the whole set's.
    """
    mark = CHECKPOINT_MARK if result.get("checkpoint_chosen_on_test") else ""
    # a blank line first: a line right after a table would be read as one of its rows
    footnote = ["", CHECKPOINT_FOOTNOTE] if mark else []
    lines = [f"# {title}", ""]
    if result.get("data_set"):
        lines += [f"Test set: {result['data_set']} (sources: "
                  f"{', '.join(result.get('sources') or ['-'])}).", ""]
    if mark:
        lines += [CHECKPOINT_ON_TEST_NOTE, ""]
    intervals = result.get("intervals_95", {})
    patients = "" if result.get("patients") is None else f" of {result['patients']} patients"
    lines += [f"{result['images']} images{patients}; overall accuracy "
              f"{_pct(result['overall_accuracy'])} %{mark}; balanced accuracy "
              f"{_pct(result.get('balanced_accuracy'))} %{mark}"
              + _interval_text(intervals.get("balanced_accuracy"), mark) + ".", ""]
    if result.get("intervals_95_basis"):
        lines += [result["intervals_95_basis"], ""]
    names = {c.key: c.display_name for c in CLASSES}
    lines += ["## Table 3 layout: counts per class (one vs rest)", ""]
    lines += _table(["class", "TP", "FP", "FN", "TN"],
                    [[names[key]] + [str(result["per_class"][key][n])
                                     for n in ("tp", "fp", "fn", "tn")]
                     for key in CLASS_KEYS], mark)
    lines += [*footnote, "", "## Table 4 layout: percent", ""]
    lines += _table(["class", "sensitivity", "specificity", "precision", "accuracy",
                     "ROC AUC"],
                    [[names[key]] + [_pct(s[n]) for n in ("sensitivity", "specificity",
                                                          "precision", "accuracy")]
                     + ["-" if s["roc_auc"] is None else f"{s['roc_auc']:.3f}"]
                     for key in CLASS_KEYS for s in [result["per_class"][key]]], mark)
    lines += footnote
    if paper:
        lines += ["", "Paper, Table 4, concatenated network, average of 5 folds: "
                  + "; ".join(f"{names[k]} sensitivity {v['sensitivity']} %, specificity "
                              f"{v['specificity']} %" for k, v in
                              PAPER_TABLE4_CONCATENATED.items() if isinstance(v, dict))
                  + f"; overall accuracy {PAPER_TABLE4_CONCATENATED['overall_accuracy']} % "
                  "(the authors chose the checkpoint on their test images too)."]
    if intervals:
        lines += ["", "## Bootstrap 95 % intervals", ""]
        if result.get("intervals_95_basis"):
            lines += [result["intervals_95_basis"], ""]
        lines += [f"- {name}: {lo:.3f}-{hi:.3f}{mark}" if name.endswith(".roc_auc") else
                  f"- {name}: {_pct(lo)}-{_pct(hi)} %{mark}" for name, (lo, hi) in
                  sorted(intervals.items())]
        lines += footnote
    if "operating_points" in result:
        lines += ["", *_operating_points_markdown(result, mark)]
    if by_source and len(by_source) > 1:
        lines += ["", "## Per source (a model can learn the source, not the disease)", ""]
        lines += _table(["source", "images", "patients", "overall accuracy"],
                        [[name, str(r["images"]),
                          "-" if r.get("patients") is None else str(r["patients"]),
                          _pct(r["overall_accuracy"])] for name, r in sorted(by_source.items())],
                        mark, plain={"images", "patients"})
        lines += footnote
    return "\n".join(lines) + "\n"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], mark: str,
           plain: Collection[str] = ()) -> list[str]:
    """A Markdown table whose figures (every cell with a digit but the first column's and
    the ``plain`` columns': sizes, targets) carry ``mark`` where they do not already."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [cell if column == 0 or header[column] in plain or mark in cell
                 or not any(c.isdigit() for c in cell) else cell + mark
                 for column, cell in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _interval_text(interval: Sequence[float] | None, mark: str = "") -> str:
    return "" if not interval else f" (95 %: {_pct(interval[0])}-{_pct(interval[1])} %{mark})"


def _operating_points_markdown(result: dict[str, Any], mark: str = "") -> list[str]:
    names = {c.key: c.display_name for c in CLASSES}
    lines = ["## Operating points", "",
             "Thresholds chosen on the validation data (a class is flagged when its "
             "probability is at least the threshold), measured on this test set.", ""]
    if result.get("checkpoint_chosen_on_test"):
        lines += ["The validation data are part of these test images (protocol paper).", ""]
    points: dict[str, dict[str, Any]] = result["operating_points"]
    if points:
        # .get: operating points imported with a model may give only some of these
        lines += _table(["class", "target sensitivity", "threshold", "validation sensitivity",
                         "validation specificity", "test sensitivity", "test specificity"],
                        [[names[key], _pct(pt.get("target_sensitivity")),
                          f"{pt['threshold']:.4f}", _pct(pt.get("validation_sensitivity")),
                          _pct(pt.get("validation_specificity")),
                          *(_marked(pt.get(f"test_{name}"), mark)
                            + _interval_text(pt.get(f"test_{name}_95"), mark)
                            for name in ("sensitivity", "specificity"))]
                         for key, pt in points.items()], mark, plain={"target sensitivity"})
        lines += ["", CHECKPOINT_FOOTNOTE] if mark else []
    missing: dict[str, str] = result.get("operating_points_missing", {})
    lines += [f"- {names[key]}: no operating point: {why}." for key, why in missing.items()]
    if not points and not missing:
        lines += ["No class has a target sensitivity: no operating point."]
    return lines


def _marked(value: float | None, mark: str) -> str:
    """A percentage with ``mark`` after it (none after "-")."""
    return _pct(value) + (mark if value is not None else "")


def plots(result: dict[str, Any], truth: Sequence[int], probabilities: NDArray[np.float64],
          out: Path) -> list[Path]:
    """confusion-matrix.png and roc.png.

    Parameters
    ----------
    result
        What :func:`metrics` returned.
    truth, probabilities
        The predictions it was computed from.
    out
        The folder to write to.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c.display_name for c in CLASSES]
    matrix = np.asarray(result["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > matrix.max() / 2 else "black")
    ax.set_xticks(range(3), names)
    ax.set_yticks(range(3), names)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    fig.tight_layout()
    confusion_png = out / "confusion-matrix.png"
    fig.savefig(confusion_png, dpi=120)
    plt.close(fig)

    y = np.asarray(truth)
    p = np.asarray(probabilities)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for i, name in enumerate(names):
        positives = y == i
        if positives.all() or not positives.any():
            continue
        fpr, tpr, _ = roc_curve(positives, p[:, i])
        auc = result["per_class"][CLASS_KEYS[i]]["roc_auc"]
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC, one vs rest")
    ax.legend(loc="lower right")
    fig.tight_layout()
    roc_png = out / "roc.png"
    fig.savefig(roc_png, dpi=120)
    plt.close(fig)
    return [confusion_png, roc_png]


def write(out: Path, result: dict[str, Any], truth: Sequence[int],
          probabilities: NDArray[np.float64], title: str, paper: bool = False,
          by_source: dict[str, dict[str, Any]] | None = None) -> None:
    """metrics.json, report.md and the two plots in ``out``.

    Parameters
    ----------
    out
        The folder to write to.
    result, truth, probabilities
        What :func:`metrics` returned, and the predictions it was computed from.
    title, paper, by_source
        As for :func:`report_markdown`.
    """
    out.mkdir(parents=True, exist_ok=True)
    payload = {**result, "by_source": by_source or {}}
    (out / "metrics.json").write_text(json.dumps(payload, indent=2))
    (out / "report.md").write_text(report_markdown(result, title, paper, by_source))
    plots(result, truth, probabilities, out)


def data_set_name(data: Path) -> str:
    """A data set's default name: a folder's name, or ``folder/file`` for a CSV list."""
    data = data.resolve()
    return data.name if data.is_dir() else f"{data.parent.name}/{data.name}"


def predict_records(engine: Engine, records: Sequence[Any]) -> NDArray[np.float64]:
    """N x 3 probabilities of ``records`` (each with a ``path``), 64 images at a time."""
    from model import preprocess

    probabilities = []
    for start in range(0, len(records), 64):
        chunk = records[start:start + 64]
        images = np.stack([preprocess.load(r.path, engine.input_size,
                                           engine.card.interpolation)  # type: ignore[arg-type]
                           for r in chunk])
        probabilities.append(engine.predict(images))
    return (np.concatenate(probabilities) if probabilities else np.zeros((0, 3))
            ).astype(np.float64)


def check_apart(validation: Sequence[Any], test: Sequence[Any]) -> None:
    """ValueError when the validation images that choose the thresholds share an image
    or a patient with the test set that measures them."""
    images = {Path(r.path).resolve() for r in validation} & {Path(r.path).resolve()
                                                             for r in test}
    patients = ({r.patient for r in validation if r.patient_id}
                & {r.patient for r in test if r.patient_id})
    if images or patients:
        raise ValueError(f"the validation data share {len(images)} image(s) and "
                         f"{len(patients)} patient(s) with the test data: thresholds must be "
                         "chosen on other images than those that measure them")


def patient_of(record: Any) -> tuple[str, str]:
    """The patient of a record, the unit the bootstrap draws: ``(source, patient_id)``
    (two collections may both have a patient "1"); an image without a patient id is its
    own patient."""
    return record.patient if record.patient_id else (record.source, f"image:{record.path}")


def evaluate_artifact(artifact: Path, records: Sequence[Any], out: Path, paper: bool = False,
                      prevalence: dict[str, float] | None = None, batch_size: int = 16, *,
                      data_set: str = "", validation: Sequence[Any] = (),
                      targets: Mapping[str, float] | None = None,
                      checkpoint_chosen_on_test: bool = False) -> dict[str, Any]:
    """Predict ``records`` with the model in ``artifact`` and write the evaluation to ``out``.

    Parameters
    ----------
    artifact
        A model artifact (verified against its card's hash when loaded).
    records
        Labelled images: the test set.
    out
        The folder for metrics.json, report.md and the plots.
    paper
        Also show the paper's Table 4 row.
    prevalence
        Class -> fraction: also report the PPV at that prevalence.
    batch_size
        Images per forward pass.
    data_set
        What the test set is, as the card's evidence will name it.
    validation
        Labelled images that choose the operating points (never the test set's, unless
        ``checkpoint_chosen_on_test``). Without them, the card's own operating points,
        if any, are measured on the test set.
    targets
        Class -> target sensitivity of its operating point; default
        :data:`DEFAULT_TARGET_SENSITIVITY`.
    checkpoint_chosen_on_test
        The checkpoint was chosen on these test images (protocol ``paper``): said in
        the report, and recorded in the evidence.
    """
    from model.engine import Engine

    if validation and not checkpoint_chosen_on_test:
        check_apart(validation, records)
    engine = Engine(artifact, batch_size=batch_size)
    p = predict_records(engine, records)
    truth = [CLASS_KEYS.index(r.label) for r in records]
    groups = [patient_of(r) for r in records]
    result = metrics(truth, p, prevalence, groups=groups)
    result.update(data_set=data_set, sources=sorted({r.source for r in records}),
                  checkpoint_chosen_on_test=checkpoint_chosen_on_test)
    if validation:
        _choose_and_measure(result, engine, validation, targets, truth, p, groups)
    elif engine.card.operating_points:
        chosen = {key: point.model_dump(include={"threshold", "target_sensitivity",
                                                 "validation_images", "validation_sensitivity",
                                                 "validation_specificity"})
                  for key, point in engine.card.operating_points.items()}
        result["operating_points"] = operating_points_on_test(chosen, truth, p,
                                                              groups=groups)
    by_source: dict[str, dict[str, Any]] = {}
    if len(result["sources"]) > 1:
        for source in result["sources"]:
            pick = [i for i, r in enumerate(records) if r.source == source]
            by_source[source] = metrics([truth[i] for i in pick], p[pick], bootstrap=0,
                                        groups=[groups[i] for i in pick])
    title = f"Evaluation of {engine.card.name} {engine.card.display_version}"
    write(out, result, truth, p, title, paper, by_source)
    return result


def _choose_and_measure(result: dict[str, Any], engine: Engine, validation: Sequence[Any],
                        targets: Mapping[str, float] | None, truth: Sequence[int],
                        probabilities: NDArray[np.float64], groups: Sequence[Hashable]
                        ) -> None:
    """Operating points chosen on ``validation``, measured on the test set (intervals over
    its patients, ``groups``), into ``result``."""
    targets = DEFAULT_TARGET_SENSITIVITY if targets is None else targets
    truth_val = [CLASS_KEYS.index(r.label) for r in validation]
    chosen = choose_operating_points(truth_val, predict_records(engine, validation), targets)
    result["validation_images"] = len(validation)
    result["operating_points"] = operating_points_on_test(chosen, truth, probabilities,
                                                          groups=groups)
    result["operating_points_missing"] = {
        key: f"no {key} image in the {len(validation)} validation images"
        for key in targets if key not in chosen}


def evidence_of(result: dict[str, Any], data_set: str, checkpoint_chosen_on_test: bool = False
                ) -> model_card.TestEvidence:
    """The card's test evidence from what :func:`metrics` returned (sources from
    ``result['sources']`` where :func:`evaluate_artifact` put them).

    With ``checkpoint_chosen_on_test`` each class's figures carry a ``note`` that says
    so, beside the evidence's own flag: per-class figures get copied alone.
    """
    intervals = result.get("intervals_95", {})
    note = {"note": CHECKPOINT_FOOTNOTE.removeprefix(CHECKPOINT_MARK).strip()
            } if checkpoint_chosen_on_test else {}
    per_class = {
        key: {name: stats.get(name) for name in ("sensitivity", "specificity", "roc_auc")}
        | {f"{name}_95": intervals.get(f"{key}.{name}")
           for name in ("sensitivity", "specificity", "roc_auc")} | note
        for key, stats in result["per_class"].items()}
    return model_card.TestEvidence(
        data_set=data_set, images=result["images"], patients=result.get("patients"),
        interval_unit=result.get("interval_unit") if intervals else None,
        sources=list(result.get("sources", [])),
        balanced_accuracy=result.get("balanced_accuracy"),
        balanced_accuracy_95=intervals.get("balanced_accuracy"),
        overall_accuracy=result["overall_accuracy"], per_class=per_class,
        evaluated_by="evaluate", checkpoint_chosen_on_test=checkpoint_chosen_on_test)


def operating_points_of(result: dict[str, Any]) -> dict[str, model_card.OperatingPoint]:
    """The card's operating points from what :func:`evaluate_artifact` returned."""
    fields = model_card.OperatingPoint.model_fields
    return {key: model_card.OperatingPoint(**{k: v for k, v in point.items() if k in fields})
            for key, point in result.get("operating_points", {}).items()}


def record_in_card(artifact: Path, result: dict[str, Any]) -> model_card.ModelCard:
    """Write an evaluation into the model card (the weights, and so the hash, stay).

    ``result`` is what :func:`evaluate_artifact` returned: its data set, sources and
    checkpoint flag become the card's :class:`~model.card.TestEvidence`, its operating
    points (when it measured any) the card's. The headline figures also go into the
    free-form ``metrics``, as before.
    """
    current = model_card.read_card(artifact)
    chosen_on_test = bool(result.get("checkpoint_chosen_on_test", False))
    current.test = evidence_of(result, result.get("data_set", ""), chosen_on_test)
    current.metrics = {**current.metrics, "test_overall_accuracy": result["overall_accuracy"],
                       "test_images": result["images"], "test_patients": result.get("patients"),
                       "test_checkpoint_chosen_on_test": chosen_on_test,
                       "test_per_class": {k: {m: v[m] for m in ("sensitivity", "specificity",
                                                                "precision", "roc_auc")}
                                          | ({"note": current.test.per_class[k]["note"]}
                                             if chosen_on_test else {})
                                          for k, v in result["per_class"].items()}}
    if "operating_points" in result:
        current.operating_points = operating_points_of(result)
    model_card.write_card(artifact, current)
    return current
