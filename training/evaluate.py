"""Evaluation in the layout of the paper's Tables 3 and 4, and what a clinician needs besides.

For each class: TP, FP, FN, TN, sensitivity, specificity, precision and
accuracy (one-vs-rest), and the overall accuracy -- the paper's tables -- plus
per-class ROC AUC, bootstrap 95 % intervals, the PPV at a prevalence the user
gives (precision on a test set depends on its class mix: the paper's COVID-19
precision of 35 % came from 31 positives among 11,302 images), the confusion
matrix and ROC curves as PNG, ``metrics.json`` and a Markdown report. When
records come from several sources, results per source are reported too: a model
can learn the source instead of the disease.

Counting and ROC come from scikit-learn, the plots from matplotlib (both in the
``training`` extra; the node never imports this package).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.metrics import (  # type: ignore[import-untyped]  # no py.typed marker
    confusion_matrix,
    roc_auc_score,
    roc_curve,
)

from model.classes import CLASS_KEYS, CLASSES

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
            seed: int = 0) -> dict[str, Any]:
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
    """
    y = np.asarray(truth, dtype=np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    predicted = p.argmax(axis=1)
    matrix = confusion(y, predicted)
    result: dict[str, Any] = {
        "images": len(y),
        "overall_accuracy": float((predicted == y).mean()) if len(y) else None,
        "confusion_matrix": matrix.tolist(),
        "classes": list(CLASS_KEYS),
        "per_class": _per_class(matrix),
    }
    for i, key in enumerate(CLASS_KEYS):
        result["per_class"][key]["roc_auc"] = roc_auc(y == i, p[:, i])
        if prevalence and key in prevalence:
            stats = result["per_class"][key]
            result["per_class"][key][f"ppv_at_{prevalence[key]:g}"] = ppv_at(
                stats["sensitivity"], stats["specificity"], prevalence[key])
    result["intervals_95"] = _bootstrap(y, p, bootstrap, seed) if bootstrap else {}
    return result


def _bootstrap(y: NDArray[np.int_], p: NDArray[np.float64], rounds: int, seed: int
               ) -> dict[str, list[float | None]]:
    # Hand-written: scipy.stats.bootstrap needs every statistic defined in every
    # resample; here a resample without, say, a COVID-19 case just skips that
    # class's sensitivity, and one set of resamples serves every figure.
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {"overall_accuracy": []}
    for _ in range(rounds):
        pick = rng.integers(0, len(y), len(y))
        yy, pp = y[pick], p[pick]
        samples["overall_accuracy"].append(float((pp.argmax(1) == yy).mean()))
        stats = _per_class(confusion(yy, pp.argmax(1)))
        for key, values in stats.items():
            for name in ("sensitivity", "specificity", "precision"):
                value = values[name]
                if value is not None:
                    samples.setdefault(f"{key}.{name}", []).append(float(value))
    return {name: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
            for name, v in samples.items() if v}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def report_markdown(result: dict[str, Any], title: str, paper: bool = False,
                    by_source: dict[str, dict[str, Any]] | None = None) -> str:
    """The Markdown report: Table 3 (counts), Table 4 (percentages), AUC, intervals.

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
    lines = [f"# {title}", "", f"{result['images']} images; overall accuracy "
             f"{_pct(result['overall_accuracy'])} %.", "",
             "## Table 3 layout: counts per class (one vs rest)", "",
             "| class | TP | FP | FN | TN |", "|---|---|---|---|---|"]
    names = {c.key: c.display_name for c in CLASSES}
    for key in CLASS_KEYS:
        s = result["per_class"][key]
        lines.append(f"| {names[key]} | {s['tp']} | {s['fp']} | {s['fn']} | {s['tn']} |")
    lines += ["", "## Table 4 layout: percent", "",
              "| class | sensitivity | specificity | precision | accuracy | ROC AUC |",
              "|---|---|---|---|---|---|"]
    for key in CLASS_KEYS:
        s = result["per_class"][key]
        auc = "-" if s["roc_auc"] is None else f"{s['roc_auc']:.3f}"
        lines.append(f"| {names[key]} | {_pct(s['sensitivity'])} | {_pct(s['specificity'])} "
                     f"| {_pct(s['precision'])} | {_pct(s['accuracy'])} | {auc} |")
    if paper:
        lines += ["", "Paper, Table 4, concatenated network, average of 5 folds: "
                  + "; ".join(f"{names[k]} sensitivity {v['sensitivity']} %, specificity "
                              f"{v['specificity']} %" for k, v in
                              PAPER_TABLE4_CONCATENATED.items() if isinstance(v, dict))
                  + f"; overall accuracy {PAPER_TABLE4_CONCATENATED['overall_accuracy']} %."]
    if result.get("intervals_95"):
        lines += ["", "## Bootstrap 95 % intervals", ""]
        lines += [f"- {name}: {_pct(lo)}-{_pct(hi)} %" for name, (lo, hi) in
                  sorted(result["intervals_95"].items())]
    if by_source and len(by_source) > 1:
        lines += ["", "## Per source (a model can learn the source, not the disease)", "",
                  "| source | images | overall accuracy |", "|---|---|---|"]
        lines += [f"| {name} | {r['images']} | {_pct(r['overall_accuracy'])} |"
                  for name, r in sorted(by_source.items())]
    return "\n".join(lines) + "\n"


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


def evaluate_artifact(artifact: Path, records: Sequence[Any], out: Path, paper: bool = False,
                      prevalence: dict[str, float] | None = None, batch_size: int = 16
                      ) -> dict[str, Any]:
    """Predict ``records`` with the model in ``artifact`` and write the evaluation to ``out``.

    Parameters
    ----------
    artifact
        A model artifact (verified against its card's hash when loaded).
    records
        Labelled images.
    out
        The folder for metrics.json, report.md and the plots.
    paper
        Also show the paper's Table 4 row.
    prevalence
        Class -> fraction: also report the PPV at that prevalence.
    batch_size
        Images per forward pass.
    """
    from model import preprocess
    from model.engine import Engine

    engine = Engine(artifact, batch_size=batch_size)
    probabilities = []
    for start in range(0, len(records), 64):
        chunk = records[start:start + 64]
        images = np.stack([preprocess.load(r.path, engine.input_size,
                                           engine.card.interpolation)  # type: ignore[arg-type]
                           for r in chunk])
        probabilities.append(engine.predict(images))
    p = (np.concatenate(probabilities) if probabilities else np.zeros((0, 3))).astype(np.float64)
    truth = [CLASS_KEYS.index(r.label) for r in records]
    result = metrics(truth, p, prevalence)
    by_source: dict[str, dict[str, Any]] = {}
    sources = sorted({r.source for r in records})
    if len(sources) > 1:
        for source in sources:
            pick = [i for i, r in enumerate(records) if r.source == source]
            by_source[source] = metrics([truth[i] for i in pick], p[pick], bootstrap=0)
    title = f"Evaluation of {engine.card.name} {engine.card.display_version}"
    write(out, result, truth, p, title, paper, by_source)
    return result


def record_in_card(artifact: Path, result: dict[str, Any]) -> None:
    """Put the headline figures into the model card (the weights, and so the hash, stay)."""
    from model import card

    current = card.read_card(artifact)
    current.metrics = {**current.metrics, "test_overall_accuracy": result["overall_accuracy"],
                       "test_images": result["images"],
                       "test_per_class": {k: {m: v[m] for m in ("sensitivity", "specificity",
                                                                "precision", "roc_auc")}
                                          for k, v in result["per_class"].items()}}
    card.write_card(artifact, current)
