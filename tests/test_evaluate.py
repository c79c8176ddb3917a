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
    assert "## Operating points" in report and "| COVID-19 | 90.00 | 0.5000† |" in report
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


# Suite time (21 s): `long`; evaluate --record runs in test_train's end-to-end test.
@pytest.mark.long
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
    patients = {(r.source, r.patient_id) for r in test}
    assert recorded.test.patients == result["patients"] == len(patients)
    assert recorded.test.interval_unit == "patient"
    assert f"bootstrap over {len(patients)} patients" in report and "†" in report
    assert all("note" in figures for figures in recorded.test.per_class.values())
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


def _patients_with_identical_images(right: int, wrong: int, images: int
                                    ) -> tuple[list[int], np.ndarray, list[str]]:
    """``right + wrong`` patients of ``images`` nearly identical images each: the model
    is right on every image of the first ``right`` patients, wrong on all of the rest."""
    rng = np.random.default_rng(7)
    truth, probabilities, groups = [], [], []
    for patient in range(right + wrong):
        label = patient % 3
        answer = label if patient < right else (label + 1) % 3
        for _ in range(images):
            truth.append(label)
            probabilities.append(np.eye(3)[answer] * 0.7 + 0.1 + rng.normal(0, 0.01, 3))
            groups.append(f"patient {patient}")
    return truth, np.array(probabilities), groups


def test_patient_intervals_are_wider_than_image_intervals_of_the_same_images() -> None:
    # 20 patients x 25 copies of one image: 500 images, but only 20 independent answers.
    truth, probabilities, groups = _patients_with_identical_images(15, 5, 25)
    by_image = evaluate.metrics(truth, probabilities)
    by_patient = evaluate.metrics(truth, probabilities, groups=groups)
    assert by_image["overall_accuracy"] == by_patient["overall_accuracy"] == 0.75
    assert (by_image["interval_unit"], by_patient["interval_unit"]) == ("image", "patient")
    assert by_patient["patients"] == 20 and by_image["patients"] is None
    image_low, image_high = by_image["intervals_95"]["overall_accuracy"]
    low, high = by_patient["intervals_95"]["overall_accuracy"]
    # A binomial over 20 patients at 0.75: 1.96 x sqrt(0.75 x 0.25 / 20) = +-0.19.
    assert low < 0.75 < high and 0.28 < high - low < 0.48
    assert high - low > 2 * (image_high - image_low)  # 500 "independent" images: +-0.04
    for name in ("balanced_accuracy", "covid.sensitivity", "normal.specificity",
                 "pneumonia.precision", "covid.roc_auc"):
        image_width = np.diff(by_image["intervals_95"][name])[0]
        assert np.diff(by_patient["intervals_95"][name])[0] > 2 * image_width, name
    # The operating points' test figures are drawn by patient too.
    chosen = {"covid": {"threshold": 0.5}}
    widths = [np.diff(evaluate.operating_points_on_test(
        chosen, truth, probabilities, groups=g)["covid"]["test_sensitivity_95"])[0]
        for g in (None, groups)]
    assert widths[1] > 2 * widths[0]


def test_image_intervals_are_as_wide_as_a_binomial() -> None:
    # 400 independent images, half of them right: 1.96 x sqrt(0.5 x 0.5 / 400) = +-0.049.
    truth = [i % 3 for i in range(400)]
    probabilities = np.eye(3)[[t if i % 2 else (t + 1) % 3 for i, t in enumerate(truth)]]
    low, high = evaluate.metrics(truth, probabilities)["intervals_95"]["overall_accuracy"]
    assert 0.085 < high - low < 0.11


def test_one_image_per_patient_resamples_as_images_do() -> None:
    truth, probabilities = _noisy_predictions(90, signal=0.6, seed=3)
    groups = [("site", f"p{90 - i}") for i in range(90)]  # keys in no sorted order
    by_image = evaluate.metrics(truth, probabilities, bootstrap=300, seed=4)
    by_patient = evaluate.metrics(truth, probabilities, bootstrap=300, seed=4, groups=groups)
    assert by_patient["intervals_95"] == by_image["intervals_95"]
    assert by_patient["patients"] == 90
    chosen = {"covid": {"threshold": 0.4}, "normal": {"threshold": 0.5}}
    assert evaluate.operating_points_on_test(chosen, truth, probabilities, 300, 4, groups) == \
        evaluate.operating_points_on_test(chosen, truth, probabilities, 300, 4)


def test_bootstrap_figures_equal_those_of_the_resampled_images() -> None:
    # Each round is computed from weighted counts; here against the images drawn.
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 3, 120)
    probabilities = np.round(rng.dirichlet([1, 1, 1], 120), 1)  # ties for the AUC
    units = evaluate._units([int(g) for g in rng.integers(0, 30, 120)], 120)
    aucs = [evaluate._WeightedAuc(truth == i, probabilities[:, i], units) for i in range(3)]
    counts = next(evaluate._resample_counts(units, 20, 0))
    patients = units.max() + 1  # as many drawn as there are, with replacement
    assert (counts.sum(axis=1) == patients).all() and counts.max() > 1
    cells = np.eye(9)[truth * 3 + probabilities.argmax(1)]
    figures = evaluate._rates((counts @ evaluate._per_unit(units, cells)).reshape(-1, 3, 3))
    for r, drawn in enumerate(counts):
        pick = np.repeat(np.arange(120), drawn[units].astype(int))
        y, p = truth[pick], probabilities[pick]
        expected = evaluate.metrics(y, p, bootstrap=0)
        assert figures["overall_accuracy"][r] == pytest.approx(expected["overall_accuracy"])
        for i, key in enumerate(("covid", "normal", "pneumonia")):
            for name in ("sensitivity", "specificity", "precision"):
                assert figures[f"{key}.{name}"][r] == pytest.approx(
                    expected["per_class"][key][name], nan_ok=True)
            assert aucs[i].of(counts[r:r + 1])[0] == pytest.approx(
                expected["per_class"][key]["roc_auc"], abs=1e-12)


def test_groups_must_name_each_image() -> None:
    with pytest.raises(ValueError, match="2 patient keys for 3 images"):
        evaluate.metrics([0, 1, 2], np.eye(3), groups=["a", "b"])


def _tables(report: str) -> list[tuple[list[str], list[list[str]]]]:
    """Each Markdown table of ``report``: its header and its body rows, as cells."""
    tables: list[tuple[list[str], list[list[str]]]] = []
    rows: list[list[str]] = []
    for line in [*report.splitlines(), ""]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            tables.append((rows[0], rows[2:]))
            rows = []
    return tables


def test_report_says_what_the_intervals_resampled() -> None:
    truth, probabilities, groups = _patients_with_identical_images(15, 5, 4)
    report = evaluate.report_markdown(
        evaluate.metrics(truth, probabilities, bootstrap=100, groups=groups), "t")
    assert "80 images of 20 patients" in report
    assert "bootstrap over 20 patients (100 rounds)" in report
    assert "exactly one image" not in report and "†" not in report
    single = evaluate.report_markdown(evaluate.metrics(
        truth, probabilities, bootstrap=100, groups=list(range(80))), "t")
    assert "bootstrap over 80 patients" in single and "exactly one image" in single
    by_image = evaluate.report_markdown(evaluate.metrics(truth, probabilities, bootstrap=100),
                                        "t")
    assert "bootstrap over 80 images (100 rounds)" in by_image and "too narrow" in by_image


def test_every_figure_of_a_checkpoint_chosen_on_test_is_marked() -> None:
    truth, probabilities, groups = _patients_with_identical_images(15, 5, 4)
    result = evaluate.metrics(truth, probabilities, bootstrap=100, groups=groups)
    result.update(checkpoint_chosen_on_test=True, operating_points=evaluate.
                  operating_points_on_test({"covid": {"threshold": 0.5, "target_sensitivity":
                                                      0.9, "validation_sensitivity": 0.9}},
                                           truth, probabilities, 100, groups=groups))
    by_source = {name: evaluate.metrics(truth[part], probabilities[part], bootstrap=0,
                                        groups=groups[part])
                 for name, part in (("a", slice(0, 40)), ("b", slice(40, 80)))}
    report = evaluate.report_markdown(result, "t", by_source=by_source)
    tables = _tables(report)
    assert len(tables) == 4  # Table 3, Table 4, operating points, per source
    plain = {"images", "patients", "target sensitivity"}  # sizes and targets, not results
    for header, rows in tables:
        for row in rows:
            figures = [cell for name, cell in zip(header[1:], row[1:], strict=True)
                       if name not in plain and any(c.isdigit() for c in cell)]
            assert figures and all("†" in cell for cell in figures), row
    # under each table, after a blank line (a line right after a table is one of its rows)
    assert report.count("\n\n" + evaluate.CHECKPOINT_FOOTNOTE) >= len(tables)
    interval_lines = [line for line in report.splitlines() if line.startswith("- ")]
    assert interval_lines and all(line.endswith("†") for line in interval_lines)
    assert "%†; balanced accuracy" in report  # the headline too
    # ... and the card's per-class figures say it beside them.
    result["sources"] = ["site"]
    evidence = evaluate.evidence_of(result, "x", checkpoint_chosen_on_test=True)
    assert all("optimistic" in figures["note"] for figures in evidence.per_class.values())
    assert (evidence.patients, evidence.interval_unit) == (20, "patient")
    assert "note" not in evaluate.evidence_of(result, "x").per_class["covid"]
