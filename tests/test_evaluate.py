"""Evaluation figures: the paper's tables, balanced accuracy, AUC, intervals, PPV at a
prevalence, operating points, the card's test evidence, report and plots."""

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


def test_hand_counted_confusion_and_auc_equal_scikit_learns() -> None:
    from sklearn.metrics import confusion_matrix, roc_auc_score

    rng = np.random.default_rng(4)
    for _ in range(20):
        truth, predicted = rng.integers(0, 3, 40), rng.integers(0, 3, 40)
        assert evaluate.confusion(truth, predicted).tolist() == \
            confusion_matrix(truth, predicted, labels=[0, 1, 2]).tolist()
        positives = truth == 1
        scores = np.round(rng.random(40), 1)  # ties
        assert evaluate.roc_auc(positives, scores) == pytest.approx(
            roc_auc_score(positives, scores), abs=1e-12)


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


def _noisy_predictions(n: int, signal: float, seed: int) -> tuple[list[int], np.ndarray]:
    """``n`` images of the three classes; ``signal`` 0 gives random outputs."""
    rng = np.random.default_rng(seed)
    truth = [int(t) for t in rng.permutation(np.arange(n) % 3)]
    probabilities = rng.dirichlet([1, 1, 1], n)
    probabilities[np.arange(n), truth] += signal
    return truth, probabilities / probabilities.sum(1, keepdims=True)


def test_balanced_accuracy_is_the_mean_of_class_sensitivities() -> None:
    from sklearn.metrics import balanced_accuracy_score

    # covid 1 of 2, normal 2 of 3, pneumonia 1 of 1 -> (1/2 + 2/3 + 1) / 3
    truth = [0, 0, 1, 1, 1, 2]
    probabilities = np.eye(3)[[0, 1, 1, 1, 0, 2]]
    result = evaluate.metrics(truth, probabilities, bootstrap=0)
    assert result["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert result["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(truth, probabilities.argmax(1)))
    # Without a class, chance is no longer 1/3: no balanced accuracy to compare with it.
    assert evaluate.metrics([0, 2], np.eye(3)[[0, 2]], bootstrap=0)["balanced_accuracy"] is None


def test_intervals_of_balanced_accuracy_and_auc() -> None:
    truth, probabilities = _noisy_predictions(90, signal=0.6, seed=3)
    result = evaluate.metrics(truth, probabilities, bootstrap=300)
    intervals = result["intervals_95"]
    low, high = intervals["balanced_accuracy"]
    assert low < result["balanced_accuracy"] < high and high - low < 0.4
    for key in ("covid", "normal", "pneumonia"):
        low, high = intervals[f"{key}.roc_auc"]
        assert low < result["per_class"][key]["roc_auc"] < high <= 1.0
    # A perfect classifier's AUC is 1 in every resample.
    perfect = evaluate.metrics(truth, np.eye(3)[truth], bootstrap=50)
    assert perfect["intervals_95"]["covid.roc_auc"] == [1.0, 1.0]


def _covid_validation() -> tuple[list[int], np.ndarray]:
    """10 COVID-19 images with p(covid) 0.1 ... 1.0, and 10 pneumonia ones with 0.05 ... 0.95."""
    covid = np.linspace(0.1, 1.0, 10)
    others = np.linspace(0.05, 0.95, 10)
    p_covid = np.concatenate([covid, others])
    probabilities = np.stack([p_covid, np.zeros(20), 1 - p_covid], axis=1)
    return [0] * 10 + [2] * 10, probabilities


def test_operating_point_is_the_highest_threshold_that_reaches_the_target() -> None:
    truth, probabilities = _covid_validation()
    chosen = evaluate.choose_operating_points(truth, probabilities, {"covid": 0.9})
    point = chosen["covid"]
    # 9 of 10 positives have p >= 0.2; at any higher threshold only 8 do.
    assert point["threshold"] == pytest.approx(0.2)
    assert point["validation_sensitivity"] == pytest.approx(0.9)
    # negatives at 0.05 and 0.15 fall below 0.2: 2 of 10 true negatives
    assert point["validation_specificity"] == pytest.approx(0.2)
    assert point["validation_images"] == 20 and point["validation_positives"] == 10
    assert evaluate.choose_operating_points(truth, probabilities, {"covid": 1.0}
                                            )["covid"]["threshold"] == pytest.approx(0.1)
    assert evaluate.choose_operating_points(truth, probabilities, {"covid": 0.35}
                                            )["covid"]["threshold"] == pytest.approx(0.7)


def test_no_operating_point_for_a_class_without_validation_positives() -> None:
    truth, probabilities = _covid_validation()
    chosen = evaluate.choose_operating_points(truth, probabilities,
                                              {"covid": 0.9, "normal": 0.9})
    assert set(chosen) == {"covid"}


def test_operating_point_on_the_test_set(tmp_path: Path) -> None:
    # Threshold 0.5; test: 4 COVID-19 (3 above), 6 others (1 above).
    chosen = {"covid": {"threshold": 0.5, "target_sensitivity": 0.9, "validation_images": 20}}
    p_covid = np.array([0.9, 0.6, 0.5, 0.2, 0.7, 0.1, 0.1, 0.3, 0.4, 0.49])
    probabilities = np.stack([p_covid, 1 - p_covid, np.zeros(10)], axis=1)
    truth = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    measured = evaluate.operating_points_on_test(chosen, truth, probabilities, rounds=400)
    point = measured["covid"]
    assert point["test_sensitivity"] == pytest.approx(0.75)
    assert point["test_specificity"] == pytest.approx(5 / 6)
    low, high = point["test_sensitivity_95"]
    assert 0.0 <= low < 0.75 < high <= 1.0
    low, high = point["test_specificity_95"]
    assert 0.0 <= low < 5 / 6 <= high <= 1.0
    card_point = evaluate.operating_points_of({"operating_points": measured})["covid"]
    assert card_point.threshold == 0.5 and card_point.test_sensitivity == pytest.approx(0.75)

    result = evaluate.metrics(truth, probabilities, bootstrap=0)
    result.update(operating_points=measured,
                  operating_points_missing={"pneumonia": "no pneumonia image in the 20 "
                                            "validation images"},
                  checkpoint_chosen_on_test=True)
    report = evaluate.report_markdown(result, "t")
    assert "## Operating points" in report and "| COVID-19 | 90.00 | 0.5000 |" in report
    assert "Pneumonia: no operating point: no pneumonia image" in report
    assert evaluate.CHECKPOINT_ON_TEST_NOTE in report


def test_random_outputs_are_not_validated() -> None:
    from model import card

    truth, probabilities = _noisy_predictions(60, signal=0.0, seed=5)
    result = evaluate.metrics(truth, probabilities, bootstrap=1000)
    result["sources"] = ["noise"]
    evidence = evaluate.evidence_of(result, "60 random outputs")
    assert evidence.images == 60 and evidence.sources == ["noise"]
    assert evidence.per_class["covid"]["roc_auc_95"] == result["intervals_95"]["covid.roc_auc"]
    made = card.ModelCard(version="1", architecture="xception", input_size=80,
                          sha256="ab" * 32, trained=True, test=evidence)
    status = card.validation_status(made)
    assert status.validated is False and "reaches chance" in status.reason
    # ... while a model with signal on as many images is.
    truth, probabilities = _noisy_predictions(60, signal=1.5, seed=5)
    good = evaluate.evidence_of(evaluate.metrics(truth, probabilities), "60 good outputs")
    assert card.validation_status(made.model_copy(update={"test": good})).validated is True


@pytest.mark.slow
def test_evaluate_writes_the_report_and_only_record_writes_the_card(
        small_artifact: Path, shared_cxr: Path, tmp_path: Path) -> None:
    import shutil

    from model import card
    from training import sources

    artifact = tmp_path / "model"
    shutil.copytree(small_artifact, artifact)
    before = (artifact / "model-card.json").read_text()
    records = sources.read(shared_cxr)
    by_class = {key: [r for r in records if r.label == key]
                for key in ("covid", "normal", "pneumonia")}
    test = [r for rows in by_class.values() for r in rows[:4]]
    validation = by_class["covid"][4:7] + by_class["normal"][4:7]  # no pneumonia
    result = evaluate.evaluate_artifact(artifact, test, tmp_path / "ev", data_set="dev 12",
                                        validation=validation, checkpoint_chosen_on_test=True)
    assert (artifact / "model-card.json").read_text() == before  # a report, no card change
    assert set(result["operating_points"]) == {"covid"}
    assert "pneumonia" in result["operating_points_missing"]
    report = (tmp_path / "ev" / "report.md").read_text()
    assert evaluate.CHECKPOINT_ON_TEST_NOTE in report and "Test set: dev 12" in report
    assert "Pneumonia: no operating point: no pneumonia image in the 6 validation" in report

    recorded = evaluate.record_in_card(artifact, result)
    assert recorded == card.read_card(artifact)
    assert recorded.test is not None and recorded.test.data_set == "dev 12"
    assert recorded.test.images == 12 and recorded.test.checkpoint_chosen_on_test is True
    assert recorded.test.sources == sorted({r.source for r in test})
    assert recorded.operating_points["covid"].validation_images == 6
    assert recorded.metrics["test_images"] == 12  # the free-form figures, as before
    assert card.verify(artifact).sha256 == card.sha256_file(artifact / "model.keras")
    assert card.validation_status(recorded).validated is False

    # Without validation data, the card's own thresholds are measured on the new test set.
    again = evaluate.evaluate_artifact(artifact, test[:6], tmp_path / "ev2", data_set="dev 6")
    assert again["operating_points"]["covid"]["threshold"] == \
        recorded.operating_points["covid"].threshold


def test_thresholds_are_never_chosen_on_the_test_images(tmp_path: Path) -> None:
    from training.sources import Record

    def record(name: str, patient: str) -> Record:
        return Record(tmp_path / name, "covid", patient, "site")

    test = [record("a.png", "p1"), record("b.png", "p2")]
    evaluate.check_apart([record("c.png", "p3")], test)  # apart: fine
    with pytest.raises(ValueError, match="share 1 image"):
        evaluate.check_apart([record("a.png", "p9")], test)
    with pytest.raises(ValueError, match="1 patient"):
        evaluate.check_apart([record("d.png", "p2")], test)
