"""dicom-node model create / import / install / show and predict, as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicom_factory import dx_16bit, save
from helpers.processes import cli

pytestmark = pytest.mark.slow


# Suite time (54 s): `long`; install, show and predict from the command line run in
# test_train's end-to-end test, and install (refused, then done) in test_audit.
@pytest.mark.long
def test_create_install_show_predict(tmp_path: Path, shared_cxr: Path) -> None:
    artifact = tmp_path / "demo"
    created = cli("model", "create", "--arch", "concatenated", "--input-size", "96",
                  "--out", str(artifact))
    assert created.returncode == 0, created.stderr
    assert "untrained" in created.stdout
    data = tmp_path / "var"
    assert cli("model", "show", "--data-dir", str(data)).returncode == 1
    refused = cli("model", "install", str(artifact), "--data-dir", str(data))
    assert refused.returncode == 1
    assert "is not validated: the card carries no test results" in refused.stderr
    assert "--allow-unvalidated" in refused.stderr
    assert cli("model", "show", "--data-dir", str(data)).returncode == 1  # nothing installed
    installed = cli("model", "install", str(artifact), "--allow-unvalidated",
                    "--data-dir", str(data))
    assert installed.returncode == 0, installed.stderr
    assert "validated: no (the card carries no test results)" in installed.stdout
    assert "UNVALIDATED MODEL - NOT FOR CLINICAL USE" in installed.stderr
    shown = json.loads(cli("model", "show", "--data-dir", str(data)).stdout)
    assert shown["trained"] is False and shown["input_size"] == 96
    assert shown["validated"] is False
    assert shown["validation_reason"] == "the card carries no test results"
    assert shown["training"]["starting_weights"] == "random"

    pngs = sorted(shared_cxr.glob("*.png"))[:4]
    dicom = save(dx_16bit(rows=300, columns=240), tmp_path / "dx.dcm")
    result = cli("predict", *map(str, pngs), str(dicom), "--json", "--data-dir", str(data))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["trained"] is False
    assert report["validated"] is False
    assert report["validation"] == "the card carries no test results"
    assert report["warning"] == "UNVALIDATED MODEL - NOT FOR CLINICAL USE"
    assert len(report["results"]) == 5
    for row in report["results"]:
        probabilities = row["probabilities"]
        assert set(probabilities) == {"covid", "normal", "pneumonia"}
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)
        assert row["label"] == max(probabilities, key=probabilities.get)

    text = cli("predict", str(pngs[0]), "--model", str(artifact))
    assert "UNTRAINED" in text.stderr and "covid=" in text.stdout
    assert "UNVALIDATED MODEL - NOT FOR CLINICAL USE" in text.stderr


def test_create_refuses_bad_arguments(tmp_path: Path) -> None:
    result = cli("model", "create", "--arch", "vgg", "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "architecture" in result.stderr


def test_settings_allow_an_unvalidated_install(small_artifact: Path, tmp_path: Path) -> None:
    allowed = cli("model", "install", str(small_artifact), "--data-dir", str(tmp_path / "var"),
                  env={"DICOM_NODE_ALLOW_UNVALIDATED_MODELS": "true"})
    assert allowed.returncode == 0, allowed.stderr
    assert "validated: no" in allowed.stdout


#: Test evidence as a site supplies it for an external model (the card's ``test`` shape).
GOOD_METRICS = {
    "data_set": "hospital X 2024 chest radiographs (external)",
    "images": 900, "sources": ["hospital X"],
    "balanced_accuracy": 0.82, "balanced_accuracy_95": [0.79, 0.85], "overall_accuracy": 0.84,
    "per_class": {"covid": {"sensitivity": 0.8, "sensitivity_95": [0.72, 0.87],
                            "specificity": 0.97, "specificity_95": [0.96, 0.98],
                            "roc_auc": 0.95, "roc_auc_95": [0.93, 0.97]}},
    "operating_points": {"covid": {"threshold": 0.31, "target_sensitivity": 0.9,
                                   "validation_images": 400,
                                   "validation_sensitivity": 0.91}},
}


@pytest.fixture(scope="module")
def keras2_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small whole Keras model in the legacy HDF5 format (what model import reads)."""
    import keras

    inputs = keras.Input((32, 32, 3))
    outputs = keras.layers.Dense(3, activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(inputs))
    path = tmp_path_factory.mktemp("h5") / "authors.h5"
    keras.Model(inputs, outputs).save(path)
    return path


def _metrics_file(folder: Path, metrics: dict[str, object]) -> Path:
    path = folder / "metrics.json"
    path.write_text(json.dumps(metrics))
    return path


def test_import_with_signed_metrics_is_validated(keras2_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "imported"
    result = cli("model", "import", str(keras2_file), "--out", str(out), "--metrics",
                 str(_metrics_file(tmp_path, GOOD_METRICS)), "--signed-by", "Dr. A. Reader")
    assert result.returncode == 0, result.stderr
    assert "validated: yes (balanced accuracy 0.790-0.850 (95 %) on 900 test images" \
        in result.stdout
    saved = json.loads((out / "model-card.json").read_text())
    assert saved["test"]["evaluated_by"] == "import"
    assert saved["test"]["signed_by"] == "Dr. A. Reader"
    assert saved["operating_points"]["covid"]["threshold"] == 0.31
    assert saved["training"]["starting_weights"] == "file:authors.h5"
    shown = json.loads(cli("model", "show", str(out)).stdout)
    assert shown["validated"] is True
    installed = cli("model", "install", str(out), "--data-dir", str(tmp_path / "var"))
    assert installed.returncode == 0, installed.stderr
    assert "validated: yes" in installed.stdout


def test_import_metrics_need_a_signature(keras2_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "imported"
    result = cli("model", "import", str(keras2_file), "--out", str(out), "--metrics",
                 str(_metrics_file(tmp_path, GOOD_METRICS)))
    assert result.returncode == 2 and "--signed-by" in result.stderr
    assert not out.exists()
    unsigned = cli("model", "import", str(keras2_file), "--out", str(out), "--metrics",
                   str(_metrics_file(tmp_path, GOOD_METRICS)), "--signed-by", "  ")
    assert unsigned.returncode == 2 and not out.exists()
    bad_class = cli("model", "import", str(keras2_file), "--out", str(out), "--metrics",
                    str(_metrics_file(tmp_path, {**GOOD_METRICS, "per_class": {"flu": {}}})),
                    "--signed-by", "Dr. A. Reader")
    assert bad_class.returncode == 2 and "flu" in bad_class.stderr and not out.exists()


def test_imported_metrics_without_a_test_size_stay_unvalidated(keras2_file: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "imported"
    sizeless = {k: v for k, v in GOOD_METRICS.items() if k != "images"}
    result = cli("model", "import", str(keras2_file), "--out", str(out), "--metrics",
                 str(_metrics_file(tmp_path, sizeless)), "--signed-by", "Dr. A. Reader")
    assert result.returncode == 0, result.stderr
    assert "validated: no (the card has test metrics but no test size)" in result.stdout
    assert json.loads((out / "model-card.json").read_text())["test"]["images"] is None
    refused = cli("model", "install", str(out), "--data-dir", str(tmp_path / "var"))
    assert refused.returncode == 1 and "no test size" in refused.stderr
