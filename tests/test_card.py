"""Model artifacts: card contents, hash verification, atomic install, Keras 2 HDF5 import."""

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
    first = card.install(small_artifact, models)
    assert card.active(models) == first.resolve()
    assert card.install(small_artifact, models) == first
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
