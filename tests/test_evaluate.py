"""Evaluation figures: the paper's tables, AUC, PPV at a prevalence, report and plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training import evaluate


def test_counts_and_rates_one_vs_rest() -> None:
    # true:      covid covid normal normal normal pneumonia
    # predicted: covid normal normal normal covid pneumonia
    truth = [0, 0, 1, 1, 1, 2]
    probabilities = np.eye(3)[[0, 1, 1, 1, 0, 2]] * 0.8 + 0.2 / 3
    result = evaluate.metrics(truth, probabilities, bootstrap=0)
    covid = result["per_class"]["covid"]
    assert (covid["tp"], covid["fp"], covid["fn"], covid["tn"]) == (1, 1, 1, 3)
    assert covid["sensitivity"] == 0.5 and covid["specificity"] == 0.75
    assert covid["precision"] == 0.5 and covid["accuracy"] == pytest.approx(4 / 6)
    assert result["overall_accuracy"] == pytest.approx(4 / 6)
    assert result["confusion_matrix"] == [[1, 1, 0], [1, 2, 0], [0, 0, 1]]


def test_a_class_nobody_has_keeps_its_row_and_column() -> None:
    # No normal image and no normal prediction: still a 3 x 3 matrix in class order.
    truth = [0, 0, 2, 2, 2]
    probabilities = np.eye(3)[[0, 2, 2, 2, 0]]
    result = evaluate.metrics(truth, probabilities, bootstrap=0)
    assert result["confusion_matrix"] == [[1, 0, 1], [0, 0, 0], [1, 0, 2]]
    assert result["per_class"]["normal"]["roc_auc"] is None
    assert result["per_class"]["normal"]["sensitivity"] is None
    assert "| Normal | - | " in evaluate.report_markdown(result, "t")
    assert evaluate.metrics([], np.zeros((0, 3)), bootstrap=0)["confusion_matrix"] == \
        [[0, 0, 0]] * 3


def test_auc_with_ties_and_degenerate_cases() -> None:
    truth = np.array([True, True, False, False])
    assert evaluate.roc_auc(truth, np.array([0.9, 0.8, 0.3, 0.1])) == 1.0
    assert evaluate.roc_auc(truth, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert evaluate.roc_auc(truth, np.array([0.1, 0.3, 0.8, 0.9])) == 0.0
    # Mann-Whitney by hand: pairs (positive > negative) + half the ties, over 2 x 3 pairs:
    # 0.8 beats 0.2, 0.5, ties 0.8 -> 2.5; 0.5 beats 0.2, ties 0.5 -> 1.5; (2.5 + 1.5) / 6.
    mixed = np.array([True, True, False, False, False])
    assert evaluate.roc_auc(mixed, np.array([0.8, 0.5, 0.8, 0.5, 0.2])) == pytest.approx(4 / 6)
    assert evaluate.roc_auc(np.array([True, True]), np.array([0.1, 0.2])) is None
    assert evaluate.roc_auc(np.array([False, False]), np.array([0.1, 0.2])) is None


def test_ppv_depends_on_prevalence() -> None:
    # The paper's COVID-19 figures: 80.53 % sensitivity, 99.56 % specificity, 31 of 11302.
    assert evaluate.ppv_at(0.8053, 0.9956, 31 / 11302) == pytest.approx(0.335, abs=0.01)
    assert evaluate.ppv_at(0.8053, 0.9956, 0.2) == pytest.approx(0.979, abs=0.005)


def test_written_report(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    truth = [int(t) for t in rng.integers(0, 3, 60)]
    probabilities = rng.dirichlet([1, 1, 1], 60)
    probabilities[np.arange(60), truth] += 1.0
    probabilities /= probabilities.sum(1, keepdims=True)
    result = evaluate.metrics(truth, probabilities, prevalence={"covid": 0.05}, bootstrap=200)
    assert "covid.sensitivity" in result["intervals_95"]
    low, high = result["intervals_95"]["overall_accuracy"]
    assert low <= result["overall_accuracy"] <= high
    by_source = {"a": evaluate.metrics(truth[:30], probabilities[:30], bootstrap=0),
                 "b": evaluate.metrics(truth[30:], probabilities[30:], bootstrap=0)}
    evaluate.write(tmp_path, result, truth, probabilities, "Test", paper=True,
                   by_source=by_source)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["overall_accuracy"] == result["overall_accuracy"]
    assert "ppv_at_0.05" in saved["per_class"]["covid"]
    report = (tmp_path / "report.md").read_text()
    assert "| COVID-19 |" in report and "Paper, Table 4" in report and "Per source" in report
    for png in ("confusion-matrix.png", "roc.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
