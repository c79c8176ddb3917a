"""Every SR the node can produce is valid: pydicom strict, dciodvfy, dsrdump."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.report import Classification, build_sr, write_sr
from model.card import ModelCard

from conftest import require_tool
from dicom_factory import cr_monochrome1, dx_16bit, jpeg2000

CARD = ModelCard(version="1.2.0", architecture="concatenated", input_size=300,
                 sha256="0123456789abcdef" * 4, trained=False)
RESULT = Classification("covid", {"covid": 0.81, "normal": 0.07, "pneumonia": 0.12})


@pytest.fixture(autouse=True)
def strict_pydicom() -> Iterator[None]:
    """Every object built here must be standard-valid (as highdicom's own tests do)."""
    reading = pydicom_config.settings.reading_validation_mode
    writing = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.reading_validation_mode = pydicom_config.RAISE
    pydicom_config.settings.writing_validation_mode = pydicom_config.RAISE
    try:
        yield
    finally:
        pydicom_config.settings.reading_validation_mode = reading
        pydicom_config.settings.writing_validation_mode = writing


def sources(shared: Path | None) -> list[Dataset]:
    made = [dx_16bit(), cr_monochrome1(), jpeg2000()]
    if shared is not None:
        with pydicom_config.disable_value_validation():
            made += [dcmread(p, force=True) for p in sorted(shared.glob("*.dcm"))]
    return made


def check(path: Path, source: Dataset, sr_uid: str, series_uid: str) -> None:
    with pydicom_config.strict_reading():
        sr = dcmread(path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.SOPInstanceUID == sr_uid and sr.SeriesInstanceUID == series_uid
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.ContributingEquipmentSequence[0].DeviceUID == CARD.device_uid
    referenced = sr.CurrentRequestedProcedureEvidenceSequence[0] \
        .ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
    text = str(sr.ContentSequence)
    assert "840539006" in text and "0.81" in text and "0.07" in text and "0.12" in text

    dciodvfy = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True,
                              text=True, timeout=60)
    errors = [line for line in dciodvfy.stderr.splitlines() if line.startswith("Error")]
    assert errors == [], dciodvfy.stderr
    dsrdump = subprocess.run([require_tool("dsrdump"), str(path)], capture_output=True,
                             text=True, timeout=60)
    assert dsrdump.returncode == 0 and "Imaging Measurement Report" in dsrdump.stdout
    assert "W:" not in dsrdump.stderr and "E:" not in dsrdump.stderr, dsrdump.stderr


def test_every_sr_is_valid(tmp_path: Path) -> None:
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom"
    for i, source in enumerate(sources(shared if shared.is_dir() else None)):
        sr_uid, series_uid = generate_uid(), generate_uid()
        with pydicom_config.disable_value_validation():
            sr = build_sr(source, RESULT, CARD, sr_uid, series_uid, generate_uid())
        path = tmp_path / f"sr{i}.dcm"
        write_sr(sr, path)
        check(path, source, sr_uid, series_uid)


def test_invalid_patient_age_is_left_out() -> None:
    source = dx_16bit()
    with pydicom_config.disable_value_validation():
        source.PatientAge = "62"
        sr = build_sr(source, RESULT, CARD, generate_uid(), generate_uid(), generate_uid())
    assert "PatientAge" not in sr
    source.PatientAge = "062Y"
    assert build_sr(source, RESULT, CARD, generate_uid(), generate_uid(),
                    generate_uid()).PatientAge == "062Y"
