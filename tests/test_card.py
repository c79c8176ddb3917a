"""Model artifacts: card contents, hash verification, the validation rule and the install
gate, atomic install, Keras 2 HDF5 import."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model import card

pytestmark = pytest.mark.slow


def test_card_records_identity_and_untrained(small_artifact: Path) -> None:
    shown = card.verify(small_artifact)
    assert shown.architecture == "concatenated" and shown.input_size == 96
    assert shown.classes == ["covid", "normal", "pneumonia"]
    assert shown.trained is False and shown.display_version == "0.0.1-untrained"
    assert shown.sha256 == card.sha256_file(small_artifact / "model.keras")
    assert shown.device_uid.startswith("1.2.826.0.1.3680043.")
    assert "tensorflow" in shown.framework and "keras" in shown.framework


def test_show_prints_the_card_as_its_file_holds_it(tmp_path: Path) -> None:
    # Values set in Python (a Path, a tuple, NaN) come out as the card file writes them.
    made = card.ModelCard(version="2.0.0", architecture="xception", input_size=80,
                          sha256="ab" * 32, trained=True,
                          training_data={"list": Path("/data/labels.csv"), "phases": (1, 2)},
                          metrics={"roc_auc": float("nan"), "accuracy": np.float64(0.9)})
    shown = card.describe(made)
    assert shown["training_data"] == {"list": "/data/labels.csv", "phases": [1, 2]}
    assert shown["metrics"] == {"roc_auc": None, "accuracy": 0.9}
    assert list(shown) == list(card.ModelCard.model_fields)  # the file's fields, its order
    card.write_card(tmp_path, made)
    assert json.dumps(shown, indent=2) == json.dumps(
        json.loads((tmp_path / "model-card.json").read_text()), indent=2)


def test_tampered_weights_are_refused(small_artifact: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(small_artifact, copy)
    with (copy / "model.keras").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(card.ModelIntegrityError, match="sha256"):
        card.verify(copy)
    with pytest.raises(card.ModelIntegrityError):
        card.install(copy, tmp_path / "models")
    assert card.active(tmp_path / "models") is None


def test_card_cannot_point_outside_its_directory(small_artifact: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(small_artifact, copy)
    data = json.loads((copy / "model-card.json").read_text())
    data["weights_file"] = "../elsewhere.keras"
    (copy / "model-card.json").write_text(json.dumps(data))
    with pytest.raises(card.ModelIntegrityError, match="not local"):
        card.verify(copy)


def test_install_activates_atomically_and_twice_is_harmless(small_artifact: Path,
                                                           tmp_path: Path) -> None:
    models = tmp_path / "models"
    first = card.install(small_artifact, models, allow_unvalidated=True)
    assert card.active(models) == first.resolve()
    assert card.install(small_artifact, models, allow_unvalidated=True) == first
    assert (models / "active").is_symlink()
    assert [p.name for p in models.iterdir() if p.name.startswith(".")] == []


def test_keras2_hdf5_import_predicts_the_same(tmp_path: Path) -> None:
    import keras

    from model import network

    source = network.build("xception", 80, seed=2)
    h5 = tmp_path / "authors.h5"
    source.save(h5)  # the legacy HDF5 format of the authors' published files
    out = tmp_path / "imported"
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "model", "import", str(h5), "--out", str(out),
         "--arch", "xception"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    imported = card.verify(out)
    assert imported.trained and imported.input_size == 80
    x = np.random.default_rng(1).random((2, 80, 80, 3), dtype=np.float32)
    loaded = keras.models.load_model(out / "model.keras", compile=False)
    np.testing.assert_allclose(source(x, training=False), loaded(x, training=False), atol=1e-7)


def _card_with(test: card.TestEvidence | None) -> card.ModelCard:
    return card.ModelCard(version="1.0.0", architecture="xception", input_size=80,
                          sha256="ab" * 32, trained=True, test=test)


def _evidence(interval: list[float] | None = None, **fields: object) -> card.TestEvidence:
    given: dict[str, object] = {"data_set": "fold 1 of 5 test set of cxr", "images": 600,
                                "balanced_accuracy_95": interval or [0.60, 0.80], **fields}
    return card.TestEvidence.model_validate(given)


@pytest.mark.parametrize(("evidence", "reason"), [
    (None, "no test results"),
    (_evidence(data_set="  "), "no data set"),
    (_evidence(images=None), "no test size"),
    (_evidence(images=0), "no test size"),
    (_evidence(evaluated_by="import"), "not signed"),
    (_evidence(evaluated_by="import", signed_by=" "), "not signed"),
    (_evidence(balanced_accuracy_95=None), "no 95 % interval"),
    (_evidence([0.30, 0.45]), "reaches chance"),
    (_evidence([1 / 3, 0.45]), "reaches chance"),
    (_evidence([float("nan"), float("nan")]), "not an interval"),
    (_evidence([0.80, 0.60]), "not an interval"),
    (_evidence(checkpoint_chosen_on_test=True), "chosen on test images"),
])
def test_unvalidated_for_each_missing_piece_of_evidence(evidence: card.TestEvidence | None,
                                                         reason: str) -> None:
    status = card.validation_status(_card_with(evidence))
    assert status.validated is False
    assert reason in status.reason


def test_a_paper_protocol_model_is_never_validated_by_later_evidence() -> None:
    made = _card_with(_evidence([0.60, 0.80]))  # evaluate --record: looks independent
    made.training = card.TrainingRecord(starting_weights="imagenet", input_size=300,
                                        checkpoint_chosen_on="test")
    status = card.validation_status(made)
    assert status.validated is False and "chosen on test images" in status.reason


def test_validated_when_the_interval_lies_above_chance() -> None:
    status = card.validation_status(_card_with(_evidence([0.60, 0.80])))
    assert status.validated is True and "0.600-0.800" in status.reason
    signed = _evidence([0.34, 0.80], evaluated_by="import", signed_by="Dr. A. Reader")
    assert card.validation_status(_card_with(signed)).validated is True


def test_a_card_that_claims_validation_without_evidence_is_not_validated(tmp_path: Path
                                                                        ) -> None:
    made = _card_with(None)
    card.write_card(tmp_path, made)
    claims = json.loads((tmp_path / "model-card.json").read_text())
    claims.update(trained=True, validated=True, metrics={"test_overall_accuracy": 0.99})
    (tmp_path / "model-card.json").write_text(json.dumps(claims))
    status = card.validation_status(card.read_card(tmp_path))
    assert status == card.Validation(False, "the card carries no test results")


def test_evidence_without_a_size_still_loads(tmp_path: Path) -> None:
    # An imported metrics file may lack "images": the card keeps it, unvalidated.
    evidence = card.TestEvidence.model_validate({"data_set": "x", "signed_by": "A"})
    assert evidence.images is None


def test_install_refuses_an_unvalidated_model_unless_allowed(small_artifact: Path,
                                                             tmp_path: Path) -> None:
    models = tmp_path / "models"
    with pytest.raises(card.UnvalidatedModelError,
                       match=r"0\.0\.1-untrained is not validated: the card carries no test "
                             r"results; install it anyway with --allow-unvalidated"):
        card.install(small_artifact, models)
    assert card.active(models) is None
    installed = card.install(small_artifact, models, allow_unvalidated=True)
    assert card.active(models) == installed.resolve()


def test_install_takes_a_validated_model_without_the_flag(small_artifact: Path,
                                                          tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(small_artifact, copy)
    validated = card.read_card(copy)
    validated.test = _evidence([0.60, 0.80])
    card.write_card(copy, validated)
    assert card.active(tmp_path / "models") is None
    installed = card.install(copy, tmp_path / "models")
    assert card.active(tmp_path / "models") == installed.resolve()


def test_starting_weights_names() -> None:
    assert card.starting_weights("none") == "random"
    assert card.starting_weights("imagenet") == "imagenet"
    assert card.starting_weights("/data/weights/fold1.h5") == "file:fold1.h5"


def test_reinstalling_a_reevaluated_model_installs_its_new_card(small_artifact: Path,
                                                                 tmp_path: Path) -> None:
    """Re-evaluation changes the card, not the weights: the installed copy must be the
    card that install judged, never the earlier one already under models/."""
    copy = tmp_path / "copy"
    shutil.copytree(small_artifact, copy)
    validated = card.read_card(copy)
    validated.test = _evidence([0.60, 0.80])
    card.write_card(copy, validated)
    models = tmp_path / "models"
    first = card.install(copy, models)
    worse = card.read_card(copy)
    worse.test = _evidence([0.30, 0.45])  # re-evaluated: now reaches chance
    card.write_card(copy, worse)
    second = card.install(copy, models, allow_unvalidated=True)
    assert second != first and card.active(models) == second.resolve()
    assert not card.validation_status(card.read_card(second)).validated


def _int8_card(**parity: object) -> card.ModelCard:
    """A card of an int8 model of a validated fp32 source, with the given parity."""
    record = card.QuantizationRecord.model_validate({
        "toolkit": "nncf 3.4.0", "preset": "mixed", "source_version": "1.0.0",
        "source_sha256": "ab" * 32, "source_device_uid": "1.2.3",
        "calibration_images": 300, "validation_images": 200, "top1_agreement": 0.995,
        "max_probability_difference": 0.015, "mean_top_probability": 0.9, **parity})
    return _card_with(_evidence([0.60, 0.80])).model_copy(
        update={"precision": "int8", "quantization": record})


@pytest.mark.parametrize(("parity", "reason"), [
    ({"top1_agreement": 0.98}, "top-1 agreement 0.9800 < 0.99"),
    ({"max_probability_difference": 0.03}, "largest probability difference 0.0300 > 0.02"),
    ({"validation_images": 99}, "parity measured on 99 images (at least 100)"),
])
def test_an_int8_model_keeps_its_sources_evidence_only_within_parity(
        parity: dict[str, object], reason: str) -> None:
    assert card.validation_status(_int8_card()).validated is True
    status = card.validation_status(_int8_card(**parity))
    assert status.validated is False
    assert status.reason == f"int8 parity with its fp32 source is out of bounds: {reason}"
    unrecorded = _int8_card().model_copy(update={"quantization": None})
    assert card.validation_status(unrecorded).validated is False
