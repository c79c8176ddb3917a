"""dicom-node model create / install / show and predict, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_factory import dx_16bit, save

pytestmark = pytest.mark.slow


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_node", *args], capture_output=True,
                          text=True, timeout=600)


def test_create_install_show_predict(tmp_path: Path, shared_cxr: Path) -> None:
    artifact = tmp_path / "demo"
    created = cli("model", "create", "--arch", "concatenated", "--input-size", "96",
                  "--out", str(artifact))
    assert created.returncode == 0, created.stderr
    assert "untrained" in created.stdout
    data = tmp_path / "var"
    assert cli("model", "show", "--data-dir", str(data)).returncode == 1
    installed = cli("model", "install", str(artifact), "--data-dir", str(data))
    assert installed.returncode == 0, installed.stderr
    shown = json.loads(cli("model", "show", "--data-dir", str(data)).stdout)
    assert shown["trained"] is False and shown["input_size"] == 96

    pngs = sorted(shared_cxr.glob("*.png"))[:4]
    dicom = save(dx_16bit(rows=300, columns=240), tmp_path / "dx.dcm")
    result = cli("predict", *map(str, pngs), str(dicom), "--json", "--data-dir", str(data))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["trained"] is False
    assert len(report["results"]) == 5
    for row in report["results"]:
        probabilities = row["probabilities"]
        assert set(probabilities) == {"covid", "normal", "pneumonia"}
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)
        assert row["label"] == max(probabilities, key=probabilities.get)

    text = cli("predict", str(pngs[0]), "--model", str(artifact))
    assert "UNTRAINED" in text.stderr and "covid=" in text.stdout


def test_create_refuses_bad_arguments(tmp_path: Path) -> None:
    result = cli("model", "create", "--arch", "vgg", "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "architecture" in result.stderr
